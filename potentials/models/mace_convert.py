"""mace-torch tensors + hyper-parameters (from :func:`~potentials.models.mace_reader.read_mace`) → this project's
``cg`` MACE: ``(model_cfg, stats, state_dict)`` that :func:`~potentials.models.build_model` rebuilds exactly.

Supported: ``MACE`` / ``ScaleShiftMACE`` with ``RealAgnosticResidualInteractionBlock`` in every layer, or a
non-residual ``RealAgnosticInteractionBlock`` first (``model.first_interaction=plain``); Bessel radial basis with
the polynomial cutoff, SiLU gate, natural-parity hidden irreps ``C x (0e+1o+…)`` with one multiplicity, one
correlation order for all layers, at least two layers, any number of heads (one is imported: ``head``).
Everything else raises :class:`PotentialsError` naming the feature.

Three non-obvious steps (see docs/design notes, ``mace-import.md``):

* mace sorts the edge-TP instructions by output irrep; ours keep loop order: the last radial-MLP layer's column
  blocks (one ``C`` block per path) are permuted accordingly;
* mace's product-basis coupling tensors ``U`` (from the file) are not our orthogonal symmetric basis: only their
  symmetrisation acts on ``A^{⊗ν}``, so the weights are projected, ``W'[z,η,c] = Σ_k M[η,k] W[z,k,c]`` with
  ``M = <U'_η, Sym(U_k)> / (2L+1)``; the residual of ``Sym(U_k)`` outside our span is checked (< 1e-10);
* the opposite edge-vector sign (mace: receiver − sender) is harmless: energies are O(3)-invariant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from e3nn import o3

from potentials.errors import PotentialsError

SUPPORTED_CLASSES = ("MACE", "ScaleShiftMACE")
RESIDUAL = "RealAgnosticResidualInteractionBlock"
PLAIN = "RealAgnosticInteractionBlock"
PROJECTION_TOL = 1e-10


def _refuse(meta: dict[str, Any]) -> None:
    """Raise for every mace-torch variant the project's MACE cannot express."""
    inter = meta["interaction_classes"]
    checks = [
        (meta["class"] not in SUPPORTED_CLASSES, f"model class {meta['class']} (supported: {', '.join(SUPPORTED_CLASSES)})"),
        (inter[0] not in (RESIDUAL, PLAIN), f"first interaction block {inter[0]} (supported: {RESIDUAL}, {PLAIN})"),
        (any(c != RESIDUAL for c in inter[1:]), f"interaction blocks {inter[1:]} (supported after the first: {RESIDUAL})"),
        (len(inter) < 2, "num_interactions = 1 (mace then has only a linear readout)"),
        (any(c != "EquivariantProductBasisBlock" for c in meta["product_classes"]), f"product blocks {meta['product_classes']}"),
        (meta["readout_classes"][-1] != "NonLinearReadoutBlock"
         or any(c != "LinearReadoutBlock" for c in meta["readout_classes"][:-1]), f"readout blocks {meta['readout_classes']}"),
        (meta["radial_class"] != "BesselBasis", f"radial basis {meta['radial_class']} (supported: bessel)"),
        (meta["cutoff_class"] != "PolynomialCutoff", f"cutoff {meta['cutoff_class']}"),
        (meta["distance_transform"], "distance transform (Agnesi/Soft radial)"),
        (meta["pair_repulsion"], "ZBL pair repulsion"),
        (not meta["apply_cutoff"], "apply_cutoff=False"),
        (meta["use_so3"], "use_so3 (pseudo-tensor features)"),
        (meta["use_agnostic_product"], "use_agnostic_product"),
        (meta["use_last_readout_only"], "use_last_readout_only"),
        (meta["has_edge_irreps"], "edge_irreps"),
        (meta["has_embedding_extras"], "charge/spin embeddings"),
        (meta["gate"] != "silu", f"readout gate {meta['gate']} (supported: silu)"),
        (len(set(meta["correlation"])) != 1, f"per-layer correlation {meta['correlation']}"),
        (len(set(meta["avg_num_neighbors"])) != 1, f"per-layer avg_num_neighbors {meta['avg_num_neighbors']}"),
    ]
    for bad, what in checks:
        if bad:
            raise PotentialsError(f"unsupported mace-torch variant: {what}")


def _hidden(meta: dict[str, Any]) -> tuple[int, int]:
    irreps = o3.Irreps(meta["interaction_node_irreps"][1])
    muls = {mul for mul, _ in irreps}
    ls = [ir.l for _, ir in irreps]
    natural = all(ir.p == (-1) ** ir.l for _, ir in irreps)
    if len(muls) != 1 or ls != list(range(len(ls))) or not natural:
        raise PotentialsError(
            f"unsupported mace-torch variant: hidden irreps {irreps} (need C x 0e + C x 1o + … with natural parity)"
        )
    return muls.pop(), max(ls)


def config_from_meta(tensors: dict[str, torch.Tensor], meta: dict[str, Any], head: str | None = None):
    """→ (model_cfg, stats, head_index). Raises for unsupported variants or an unknown head."""
    _refuse(meta)
    heads = meta["heads"]
    if head is None:
        if len(heads) > 1:
            raise PotentialsError(f"mace model has heads {heads}: choose one with --head")
        h = 0
    elif head not in heads:
        raise PotentialsError(f"mace model has no head {head!r} (heads: {heads})")
    else:
        h = heads.index(head)
    channels, max_L = _hidden(meta)
    n_heads = len(heads)
    mlp = o3.Irreps(meta["mlp_irreps"]).num_irreps // n_heads
    cutoff_p = meta["cutoff_p"]
    if cutoff_p is None:
        cutoff_p = int(tensors["radial_embedding.cutoff_fn.p"])
    model_cfg = {
        "name": "mace", "tp": "cg", "radial": "mlp", "dtype": "float64",
        "r_max": float(tensors["r_max"]),
        "num_interactions": len(meta["interaction_classes"]),
        "channels": channels, "max_L": max_L, "max_ell": int(meta["max_ell"]),
        "correlation": int(meta["correlation"][0]),
        "num_bessel": int(tensors["radial_embedding.bessel_fn.bessel_weights"].numel()),
        "cutoff_p": int(cutoff_p),
        "radial_hidden": list(meta["radial_mlp"]),
        "readout_hidden": int(mlp),
        "first_interaction": "plain" if meta["interaction_classes"][0] == PLAIN else "residual",
    }
    z = [int(v) for v in tensors["atomic_numbers"].tolist()]
    e0 = tensors["atomic_energies_fn.atomic_energies"].to(torch.float64)
    e0 = e0[h] if e0.dim() == 2 else e0
    scale, shift = 1.0, 0.0
    if "scale_shift.scale" in tensors:
        s, t = tensors["scale_shift.scale"].to(torch.float64), tensors["scale_shift.shift"].to(torch.float64)
        scale = float(s.reshape(-1)[h if s.numel() > 1 else 0])
        shift = float(t.reshape(-1)[h if t.numel() > 1 else 0])
    stats = {
        "atomic_numbers": z,
        "e0s": {zz: float(v) for zz, v in zip(z, e0.tolist())},
        "avg_num_neighbors": float(meta["avg_num_neighbors"][0]),
        "scale": scale,
        "shift": shift,
    }
    return model_cfg, stats, h


def _sym(x: torch.Tensor, nu: int) -> torch.Tensor:
    from potentials.nn.symmetric_contraction import _symmetrise

    return _symmetrise(x, nu)


def project_product_weights(
    mace_u: torch.Tensor, mace_w: torch.Tensor, our_u: torch.Tensor, nu: int, dim_l: int
) -> tuple[torch.Tensor, float]:
    """mace's coupling tensors ``mace_u`` ([2L+1,] d×ν, K) and weights ``mace_w`` [Z, K, C] → weights on our basis
    ``our_u`` [P, 2L+1, d×ν]: ``(W' [Z, P, C], max residual of Sym(U_k) outside our span)``."""
    u = mace_u.to(torch.float64)
    if dim_l == 1 and u.dim() == nu + 1:
        u = u.unsqueeze(0)
    k = u.shape[-1]
    u = u.movedim(-1, 0).reshape(k * dim_l, *u.shape[1:-1])  # [K(2L+1), d…d]
    s = _sym(u, nu).reshape(k, dim_l, -1)  # [K, 2L+1, d^ν]
    basis = our_u.reshape(our_u.shape[0], dim_l, -1)  # [P, 2L+1, d^ν]
    m = torch.einsum("pmx,kmx->pk", basis, s) / dim_l  # [P, K]
    recon = torch.einsum("pk,pmx->kmx", m, basis)
    residual = float((recon - s).abs().max()) if k else 0.0
    return torch.einsum("pk,zkc->zpc", m, mace_w.to(torch.float64)), residual


def convert(tensors: dict[str, torch.Tensor], meta: dict[str, Any], head: str | None = None):
    """→ (model_cfg, stats, state_dict of our MACE, info). ``info`` holds the head and projection residual."""
    from potentials.models import build_model
    from potentials.nn.symmetric_contraction import symmetric_basis

    model_cfg, stats, h = config_from_meta(tensors, meta, head)
    n_heads = len(meta["heads"])
    model = build_model(model_cfg, stats)
    ours = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    C = model_cfg["channels"]

    def put(key: str, value: torch.Tensor) -> None:
        if key not in ours:
            raise PotentialsError(f"internal: no key {key} in the project model")
        value = value.to(torch.float64).reshape(ours[key].shape) if value.numel() == ours[key].numel() else None
        if value is None:
            raise PotentialsError(f"mace tensor for {key} does not fit {tuple(ours[key].shape)} (unsupported layout?)")
        new[key] = value

    def get(key: str) -> torch.Tensor:
        if key not in tensors:
            raise PotentialsError(f"mace model lacks tensor {key!r} (unsupported layout)")
        return tensors[key]

    put("radial_embedding.basis.freqs", get("radial_embedding.bessel_fn.bessel_weights"))
    put("radial_embedding.basis.prefactor", get("radial_embedding.bessel_fn.prefactor"))
    put("embedding.linear.weight", get("node_embedding.linear.weight"))
    n_layers = model_cfg["num_interactions"]
    for i in range(n_layers):
        inter = model.interactions[i]
        put(f"interactions.{i}.linear_up.weight", get(f"interactions.{i}.linear_up.weight"))
        put(f"interactions.{i}.linear.weight", get(f"interactions.{i}.linear.weight"))
        put(f"interactions.{i}.skip.weight", get(f"interactions.{i}.skip_tp.weight"))
        n_radial = len(model_cfg["radial_hidden"]) + 1
        for k in range(n_radial):
            w = get(f"interactions.{i}.conv_tp_weights.layer{k}.weight")
            if k == n_radial - 1:  # columns: one C block per path; mace orders paths by output irrep
                order = [ins.i_out for ins in inter.tp.tp.instructions]
                w = torch.cat([w[:, o * C:(o + 1) * C] for o in order], dim=1)
            put(f"interactions.{i}.radial.net.layer{k}.weight", w)
        put(f"products.{i}.linear.weight", get(f"products.{i}.linear.weight"))

    residual = 0.0
    corr = model_cfg["correlation"]
    for i in range(n_layers):
        sc = model.products[i].product.contraction
        channel_irreps = "+".join(str(ir) for _, ir in sc.irreps_in)
        targets = "+".join(str(ir) for ir in sorted({ir for _, ir in sc.irreps_out}))
        basis = symmetric_basis(channel_irreps, corr, targets)
        for j, ((_, ir), slices) in enumerate(zip(sc.irreps_out, sc.path_slices)):
            prefix = f"products.{i}.symmetric_contractions.contractions.{j}."
            w_new = torch.zeros_like(ours[f"products.{i}.product.contraction.weights.{j}"])
            for nu in range(1, corr + 1):
                mace_w = get(prefix + ("weights_max" if nu == corr else f"weights.{corr - 1 - nu}"))
                mace_u = get(prefix + f"U_matrix_{nu}")
                if nu not in slices:
                    if mace_u.abs().max() > 0 and mace_w.abs().max() > 0:
                        raise PotentialsError(f"mace product layer {i} irrep {ir} ν={nu}: path absent from our basis")
                    continue
                w_proj, res = project_product_weights(mace_u, mace_w, basis[nu][ir], nu, ir.dim)
                residual = max(residual, res)
                w_new[:, slices[nu], :] = w_proj
            new[f"products.{i}.product.contraction.weights.{j}"] = w_new
    if residual > PROJECTION_TOL:
        raise PotentialsError(
            f"mace product basis is not spanned by ours (residual {residual:.2e} > {PROJECTION_TOL:g}): "
            f"unsupported coupling basis"
        )

    for i in range(n_layers - 1):  # linear readouts: Linear(hidden → H x 0e), keep column h
        w = get(f"readouts.{i}.linear.weight").reshape(-1, n_heads)[:, h]
        put(f"readouts.{i}.linear.weight", w)
    last = n_layers - 1
    mlp = model_cfg["readout_hidden"]
    w1 = get(f"readouts.{last}.linear_1.weight").reshape(-1, n_heads * mlp)[:, h * mlp:(h + 1) * mlp]
    put(f"readouts.{last}.linear_1.weight", w1)
    # linear_2: (H·MLP)x0e → Hx0e; our fan-in is MLP, not H·MLP (e3nn divides by √fan_in): × 1/√H
    w2 = get(f"readouts.{last}.linear_2.weight").reshape(n_heads * mlp, n_heads)[h * mlp:(h + 1) * mlp, h]
    put(f"readouts.{last}.linear_2.weight", w2 / math.sqrt(n_heads))

    state = dict(ours)
    state.update(new)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover - shapes were checked by put()
        raise PotentialsError(f"converted weights do not fit: {str(exc).splitlines()[0]}") from exc
    info = {"head": meta["heads"][h], "heads": meta["heads"], "projection_residual": residual,
            "mace_class": meta["class"], "interaction_classes": meta["interaction_classes"]}
    return model_cfg, stats, model.state_dict(), info
