"""Active-learning selection: the K most informative frames, high spread but not near-identical.

Score per frame = max_i forces_std_i (or mean). Diversity: the ``pool`` highest-scoring frames are kept, the
highest is taken first, then farthest-point sampling in a descriptor space (per-element mean of the model's
readout features, standardised), so a run of K near-identical frames yields one of them, not K. Frames whose
descriptor equals an already chosen one (distance ≤ ``min_distance``) are never chosen.
"""

from __future__ import annotations

import numpy as np
import torch

from potentials.data.graph import collate
from potentials.errors import PotentialsError
from potentials.nn.ops import scatter_sum
from potentials.uncertainty.llpr import atom_features, capture_features


def descriptor_model(estimator) -> torch.nn.Module:
    """The model whose readout features describe a frame (first committee member, or the LLPR model)."""
    return estimator.members[0] if hasattr(estimator, "members") else estimator.model


def score_frames(estimator, graphs, batch_size: int = 16, reduce: str = "max", device="cpu"):
    """Per frame: score (max or mean of forces_std, eV/Å) [F], descriptor [F, num_elements·d], forces_std per
    frame (list of [n_f])."""
    if reduce not in ("max", "mean"):
        raise PotentialsError(f"score reduction must be 'max' or 'mean', got {reduce!r}")
    model = descriptor_model(estimator)
    n_el = len(model.atomic_numbers)
    scores, descs, stds = [], [], []
    graphs = list(graphs)
    for start in range(0, len(graphs), batch_size):
        g = collate(graphs[start:start + batch_size]).to(device)
        with capture_features(model) as store:
            out = estimator.evaluate(g, stress=False)
        f = atom_features(model, store, g)  # [n, d]
        b = int(g["num_atoms"].shape[0])
        key = g["batch"] * n_el + model.species(g["numbers"])  # (frame, element) bins
        sums = scatter_sum(f, key, b * n_el)
        counts = scatter_sum(torch.ones_like(f[:, :1]), key, b * n_el).clamp_min(1.0)
        descs.append((sums / counts).reshape(b, -1).cpu().numpy())
        std = out["forces_std"].detach().cpu().to(torch.float64).numpy()
        batch = g["batch"].cpu().numpy()
        for k in range(b):
            s = std[batch == k]
            stds.append(s)
            scores.append(float(s.max() if reduce == "max" else s.mean()) if s.size else 0.0)
    return np.array(scores), np.concatenate(descs), stds


def select_diverse(scores, descriptors, k: int, pool: int | None = None, min_distance: float = 1e-8) -> list[int]:
    """Indices of up to ``k`` frames: the ``pool`` (default 5k) highest ``scores`` [F], then farthest-point
    sampling on standardised ``descriptors`` [F, D] starting from the highest score. Fewer than k are returned
    when no remaining frame is farther than ``min_distance`` from every chosen one."""
    scores = np.asarray(scores, dtype=np.float64)
    x = np.asarray(descriptors, dtype=np.float64)
    if int(k) < 1:
        raise PotentialsError(f"select: K must be ≥ 1, got {k}")
    if x.shape[0] != scores.shape[0]:
        raise PotentialsError(f"select: {scores.shape[0]} scores but {x.shape[0]} descriptors")
    if scores.size == 0:
        return []
    scale = x.std(0)
    x = (x - x.mean(0)) / np.where(scale > 0, scale, 1.0)
    pool = max(int(k), int(pool) if pool else 5 * int(k))
    cand = np.argsort(-scores, kind="stable")[:pool]
    chosen = [int(cand[0])]
    dist = np.linalg.norm(x[cand] - x[cand[0]], axis=1)
    while len(chosen) < k:
        j = int(np.argmax(dist))
        if dist[j] <= min_distance:
            break
        chosen.append(int(cand[j]))
        dist = np.minimum(dist, np.linalg.norm(x[cand] - x[cand[j]], axis=1))
    return chosen
