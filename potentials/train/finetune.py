"""Fine-tuning: start training from an existing checkpoint (``init_from=PATH``: ours, or one written by
``scripts/import_mace.py``).

* Architecture, ``avg_num_neighbors`` and scale/shift come from the checkpoint (the function it learnt is kept).
* The element table may grow (``finetune.new_elements=true``): new elements are appended, their embedding /
  skip / product-basis rows are freshly initialised; the rows of the old elements are copied, and e3nn's
  ``1/√fan_in`` normalisation of the one-hot inputs is compensated (×√(n_new/n_old)), so structures of old
  elements get exactly the old predictions.
* E0s: ``finetune.e0s`` = ``keep`` (the checkpoint's; new elements fitted on the new data), ``fit`` (refitted on the
  new training data, ``data.e0s``), or ``{element: eV}``.
* ``finetune.freeze=[prefix, …]``: parameters of the model whose name starts with a prefix are not trained
  (``embedding``, ``radial_embedding``, ``interactions.0``, ``products``, ``readouts.1`` …).
* Replay (``finetune.replay``): a sample of the original training data — ``files: [...]`` (any ase-readable file) or
  ``data: {format: mptrj, root: ..., ...}`` (a data config) — with loss weight ``weight`` is mixed into every
  training epoch, against forgetting.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset

from potentials.errors import PotentialsError

try:
    from ase.data import atomic_numbers as _Z, chemical_symbols
except ImportError:  # pragma: no cover
    _Z, chemical_symbols = {}, [str(i) for i in range(119)]


def _z(key) -> int:
    if isinstance(key, str) and not key.isdigit():
        if key not in _Z:
            raise PotentialsError(f"finetune.e0s: unknown element {key!r}")
        return int(_Z[key])
    return int(key)


def finetune_stats(init_stats: dict, data_stats: dict, e0s: Any = "keep", new_elements: bool = True,
                   path: str = "") -> dict:
    """Statistics of a fine-tune run: the checkpoint's, with the element table grown by the new data's elements
    (appended, old order kept) and E0s per ``e0s`` (``keep`` | ``fit`` | {element: eV})."""
    old = [int(z) for z in init_stats["atomic_numbers"]]
    new = [int(z) for z in data_stats["atomic_numbers"] if int(z) not in old]
    if new and not new_elements:
        names = [chemical_symbols[z] for z in new]
        raise PotentialsError(
            f"init_from {path}: the new data has element(s) {names} missing from the checkpoint's element table "
            f"{[chemical_symbols[z] for z in old]} (set finetune.new_elements=true to add them)"
        )
    old_e0 = {int(k): float(v) for k, v in init_stats.get("e0s", {}).items()}
    fitted = {int(k): float(v) for k, v in data_stats.get("e0s", {}).items()}
    if isinstance(e0s, str) and e0s == "keep":
        e0 = {**fitted, **old_e0}
    elif isinstance(e0s, str) and e0s == "fit":
        e0 = {**old_e0, **fitted}
    elif isinstance(e0s, dict):
        e0 = {**old_e0, **fitted, **{_z(k): float(v) for k, v in e0s.items()}}
    else:
        raise PotentialsError(f"finetune.e0s must be 'keep', 'fit' or {{element: eV}}, got {e0s!r}")
    table = old + new
    missing = [chemical_symbols[z] for z in table if z not in e0]
    if missing:
        raise PotentialsError(f"finetune: no E0 for element(s) {missing}")
    return {**init_stats, "atomic_numbers": table, "e0s": {z: e0[z] for z in table}}


def _rows(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    return t.narrow(dim, 0, n)


def grown_state(model: torch.nn.Module, old_state: dict[str, torch.Tensor], n_old: int) -> dict[str, torch.Tensor]:
    """State dict for ``model`` (built with the grown table, first ``n_old`` elements = the old table) from the
    checkpoint's ``old_state``: equal shapes are copied; element-indexed tensors get the old rows (new rows keep
    ``model``'s fresh initialisation); ``e0s`` is ``model``'s (set from the fine-tune statistics)."""
    from e3nn import o3

    new_state = model.state_dict()
    n_new = int(getattr(model, "num_elements", n_old))
    out = {}
    modules = dict(model.named_modules())
    for key, target in new_state.items():
        if key == "e0s":
            out[key] = target
            continue
        if key not in old_state:
            raise PotentialsError(f"init_from: checkpoint has no tensor {key!r} for this model")
        src = old_state[key].to(target.dtype)
        if src.shape == target.shape:
            out[key] = src
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        grown = target.clone()
        factor = math.sqrt(n_new / n_old)  # e3nn: one-hot inputs enter with 1/√fan_in, fan_in ∝ num_elements
        if leaf in ("scale", "shift") and target.shape[-1] == n_new:  # [n_el] or [heads, n_el]
            grown[..., :n_old] = src
        elif isinstance(owner, o3.Linear) and leaf == "weight" and owner.irreps_in == o3.Irreps(f"{n_new}x0e"):
            c = owner.irreps_out.num_irreps
            grown.view(n_new, c)[:n_old] = src.view(n_old, c) * factor
        elif isinstance(owner, o3.FullyConnectedTensorProduct) and leaf == "weight" \
                and owner.irreps_in2 == o3.Irreps(f"{n_new}x0e"):
            start_new = start_old = 0
            for ins in owner.instructions:
                m1, _, m3 = ins.path_shape
                size_new, size_old = m1 * n_new * m3, m1 * n_old * m3
                block = grown[start_new:start_new + size_new].view(m1, n_new, m3)
                block[:, :n_old] = src[start_old:start_old + size_old].view(m1, n_old, m3) * factor
                start_new += size_new
                start_old += size_old
        elif ".contraction.weights." in key and target.dim() == 3 and target.shape[0] == n_new:
            grown[:n_old] = src
        else:
            raise PotentialsError(
                f"init_from: cannot add elements to tensor {key!r} ({tuple(src.shape)} -> {tuple(target.shape)})"
            )
        out[key] = grown
    return out


def apply_freeze(model: torch.nn.Module, prefixes: list[str] | None) -> list[str]:
    """``requires_grad=False`` for parameters whose name starts with a prefix; returns the frozen names."""
    prefixes = [str(p) for p in (prefixes or [])]
    names = [n for n, _ in model.named_parameters()]
    frozen = []
    for prefix in prefixes:
        hit = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hit:
            tops = sorted({n.split(".")[0] for n in names})
            raise PotentialsError(f"finetune.freeze: no parameter under {prefix!r} (model has: {tops})")
        frozen.extend(hit)
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


class WeightedSubset(Dataset):
    """Structures ``indices`` of ``dataset`` with their loss weights (energy/forces/stress) multiplied by ``weight``."""

    def __init__(self, dataset, indices: list[int], weight: float):
        self.dataset, self.indices, self.weight = dataset, list(indices), float(weight)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        g = self.dataset[self.indices[i]]
        return g.replace(**{k: g[k] * self.weight for k in ("energy_weight", "forces_weight", "stress_weight") if k in g})


def build_replay(replay: dict | None, r_max: float, seed: int, keys: dict, numbers: list[int]):
    """The replay set (or None): ``files`` or ``data`` (a data config), ``sample`` structures drawn with ``seed``
    (all when null), loss ``weight``. Its elements must be in the model's table ``numbers``."""
    replay = dict(replay or {})
    files, data = replay.get("files") or [], replay.get("data")
    if not files and not data:
        return None
    if files and data:
        raise PotentialsError("finetune.replay: give either files or data, not both")
    weight = float(replay.get("weight", 1.0))
    if weight <= 0:
        raise PotentialsError(f"finetune.replay.weight must be > 0, got {weight}")
    if files:
        from potentials.data.dataset import GraphDataset

        dataset = GraphDataset.from_files(list(files), r_max, **keys)
        where = f"replay files {list(files)}"
    else:
        data = dict(data)
        for key in ("r_max", "cutoff"):
            value = data.pop(key, None)
            if value is not None and float(value) != float(r_max):
                raise PotentialsError(
                    f"finetune.replay.data: {key}={value} differs from the model's r_max {r_max}; "
                    f"replay graphs must be built with the model's cutoff"
                )
        from potentials.train.run import build_datamodule  # noqa: PLC0415  (same-layer helper)

        dm = build_datamodule({"batch_size": 1, **data}, r_max, seed)
        dm.load()
        dataset = dm.train_set
        where = f"replay data {data.get('format', 'ase')}"
    n = len(dataset)
    if n == 0:
        raise PotentialsError(f"finetune: {where} is empty")
    sample = replay.get("sample")
    if sample is None or int(sample) >= n:
        indices = list(range(n))
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()[: int(sample)]
        indices.sort()
    table = set(numbers)
    for i in indices[: min(len(indices), 10000)]:
        extra = set(dataset[i]["numbers"].tolist()) - table
        if extra:
            raise PotentialsError(
                f"finetune: {where} structure {i} has element(s) {[chemical_symbols[z] for z in sorted(extra)]} "
                f"outside the model's element table"
            )
    return WeightedSubset(dataset, indices, weight)
