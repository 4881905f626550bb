"""Last-layer prediction rigidity (LLPR; Bigi et al., MLST 5, 045018 (2024)): uncertainty from one trained model.

The energy is linear in the readout features: E = Σ_i f_i·w + Σ_i (shift + E0)(z_i), with f_i [d] the inputs of
each readout's final linear layer (scalars of ``LinearReadout``, SiLU activations of ``NonLinearReadout``) times
the per-element ``ScaleShift`` scale of atom i. Fitted after training on the training set (structure features
per atom, as in the energy loss):

    A = Σ_s (f_s/n_s)(f_s/n_s)ᵀ + ς² I,   C = A⁻¹ [d, d],   f_s = Σ_{i∈s} f_i

and at inference

    energy_std  = α_E √(f_sᵀ C f_s)                       (eV; posterior σ of the total energy)
    forces_std  = α_F √(f_iᵀ C f_i)  per atom             (eV/Å; method "llpr": local rigidity, no extra backward)
    forces_std  = α_J √(Σ_α J_iαᵀ C J_iα), J_iα = ∂f_s/∂x_iα  (method "llpr-jacobian": the posterior force σ;
                                                           d extra backward passes, for evaluation and selection)
    stress_std  = α_S √(f_sᵀ C f_s) / V  (all components) (eV/Å³; a proxy with its own calibration)

α_E, α_F, α_J, α_S are fitted on held-out data: α² = mean(residual² / σ̃²) (NLL-optimal), with σ̃ the uncalibrated
value. The cost over a plain call is one d×d quadratic form per atom (features are captured by forward hooks,
no change to the model). The fit is stored next to the checkpoint as ``CKPT.llpr.pt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from potentials.data.graph import AtomicGraph, collate
from potentials.errors import PotentialsError
from potentials.models import energy_forces_stress
from potentials.nn.blocks import LinearReadout, NonLinearReadout
from potentials.nn.ops import fused_inference, scatter_sum

SUFFIX = ".llpr.pt"
METHODS = ("llpr", "llpr-jacobian")


def llpr_path(checkpoint: str | os.PathLike) -> Path:
    return Path(os.fspath(checkpoint) + SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _scalar_index(irreps) -> list[int]:
    """Positions of the 0e components in a feature vector with ``irreps``."""
    idx: list[int] = []
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        if ir.l == 0 and ir.p == 1:
            idx.extend(range(sl.start, sl.stop))
    return idx


def last_linears(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[int] | None]]:
    """The final linear layer of every readout, with the input components it reads (None = all)."""
    layers = []
    for mod in model.modules():
        if isinstance(mod, LinearReadout):
            layers.append((mod.linear, _scalar_index(mod.linear.irreps_in)))
        elif isinstance(mod, NonLinearReadout):
            layers.append((mod.linear_2, None))
    if not layers:
        raise PotentialsError(f"LLPR: model {type(model).__name__} has no LinearReadout/NonLinearReadout to take features from")
    return layers


@contextlib.contextmanager
def capture_features(model: torch.nn.Module):
    """Within the context, each forward of ``model`` stores the inputs of its readouts' final linear layers;
    yields a dict filled as ``{layer index: [n, d_l]}`` (first call of each layer only)."""
    store: dict[int, torch.Tensor] = {}
    hooks = []
    for k, (layer, idx) in enumerate(last_linears(model)):
        def hook(module, inputs, output, k=k, idx=idx):
            if k not in store:
                x = inputs[0]
                store[k] = x if idx is None else x[:, idx]
        hooks.append(layer.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def atom_features(model: torch.nn.Module, store: dict, graph: AtomicGraph, detach: bool = True) -> torch.Tensor:
    """Captured features → f_i [n, d] (float64), scaled by the per-element ``ScaleShift`` scale."""
    if not store:
        raise PotentialsError("LLPR: no readout features were captured (did the model run?)")
    f = torch.cat([store[k] for k in sorted(store)], dim=-1).to(torch.float64)
    f = f.detach() if detach else f
    species = model.species(graph["numbers"])
    if model.scale_shift.scale.dim() != 1:
        raise PotentialsError(f"LLPR: multi-head models (heads {model.heads}) are not supported yet")
    return f * model.scale_shift.scale[species].to(torch.float64)[:, None]


def readout_weights(model: torch.nn.Module) -> torch.Tensor:
    """w [d] with node energy = Σ_k w_k f_ik before scale/shift (probes each final linear with unit vectors)."""
    ws = []
    with torch.no_grad():
        for layer, idx in last_linears(model):
            dim = layer.irreps_in.dim
            eye = torch.eye(dim, dtype=next(layer.parameters()).dtype)
            w = layer(eye)[:, 0].to(torch.float64)
            ws.append(w if idx is None else w[idx])
    return torch.cat(ws)


class LLPR(torch.nn.Module):
    """Single-model uncertainty estimator: ``evaluate`` = the model's prediction + calibrated LLPR spreads."""

    def __init__(self, model: torch.nn.Module, inverse: torch.Tensor, alpha_energy=1.0, alpha_forces=1.0, alpha_stress=1.0,
                 forces: str = "local"):
        super().__init__()
        if forces not in ("local", "jacobian"):
            raise PotentialsError(f"LLPR forces must be 'local' or 'jacobian', got {forces!r}")
        self.model = model.eval()
        self.r_max = float(model.r_max)
        self.register_buffer("inverse", inverse.to(torch.float64))
        self.alpha_energy, self.alpha_forces, self.alpha_stress = float(alpha_energy), float(alpha_forces), float(alpha_stress)
        self.forces = forces

    def evaluate(self, graph: AtomicGraph, stress: bool = False) -> dict[str, torch.Tensor]:
        """``energy`` [B], ``forces`` [n, 3], ``stress`` [B, 3, 3] of the model and ``energy_std`` [B],
        ``forces_std`` [n], ``stress_std`` [B, 3, 3] (calibrated); ``*_raw`` = uncalibrated σ̃."""
        if self.forces == "jacobian":
            return self._evaluate_jacobian(graph, stress)
        with capture_features(self.model) as store, fused_inference():
            out = energy_forces_stress(self.model, graph, forces=True, stress=stress)
        out = {k: v.detach() for k, v in out.items()}
        out.update(self.spreads(atom_features(self.model, store, graph), graph))
        return out

    def _evaluate_jacobian(self, graph: AtomicGraph, stress: bool) -> dict[str, torch.Tensor]:
        """As :meth:`evaluate`, with forces_std from the feature Jacobian J = ∂f_s/∂x [d, n, 3] (d backward passes;
        plain kernels, which allow repeated backward passes through one graph)."""
        from potentials.uncertainty.committee import members_one_pass

        x = graph["positions"].detach().requires_grad_(True)
        with capture_features(self.model) as store:
            out = members_one_pass([self.model], graph.replace(positions=x), stress, retain_graph=True, leaves=[x])
        out = {k: v[0] for k, v in out.items()}
        f = atom_features(self.model, store, graph, detach=False)
        fs = scatter_sum(f, graph["batch"], int(graph["num_atoms"].shape[0])).sum(0)  # [d]: structures are independent
        d = fs.shape[0]
        jac = torch.stack([
            torch.autograd.grad(fs[k], x, retain_graph=k < d - 1, allow_unused=True)[0] if fs[k].requires_grad
            else torch.zeros_like(x) for k in range(d)
        ]).to(torch.float64)  # [d, n, 3]
        var = torch.einsum("kia,kl,lia->i", jac, self.inverse.to(jac.device), jac).clamp_min(0.0)
        out.update(self.spreads(f.detach(), graph))
        out["forces_std_raw"] = var.sqrt()
        out["forces_std"] = self.alpha_forces * out["forces_std_raw"]
        return out

    def spreads(self, f: torch.Tensor, graph: AtomicGraph) -> dict[str, torch.Tensor]:
        num_graphs = int(graph["num_atoms"].shape[0])
        c = self.inverse.to(f.device)
        var_atom = torch.einsum("nd,de,ne->n", f, c, f).clamp_min(0.0)
        fs = scatter_sum(f, graph["batch"], num_graphs)
        var_struct = torch.einsum("bd,de,be->b", fs, c, fs).clamp_min(0.0)
        raw_e, raw_f = var_struct.sqrt(), var_atom.sqrt()
        volume = torch.linalg.det(graph["cell"].to(torch.float64)).abs()
        periodic = graph["pbc"].any(dim=1) & (volume > 0)
        raw_s = torch.where(periodic, raw_e / torch.where(periodic, volume, torch.ones_like(volume)), torch.zeros_like(raw_e))
        return {
            "energy_std": self.alpha_energy * raw_e, "forces_std": self.alpha_forces * raw_f,
            "stress_std": (self.alpha_stress * raw_s)[:, None, None].expand(num_graphs, 3, 3).clone(),
            "energy_std_raw": raw_e, "forces_std_raw": raw_f, "stress_std_raw": raw_s,
        }


def _batches(graphs, batch_size: int):
    graphs = list(graphs)
    for start in range(0, len(graphs), batch_size):
        yield collate(graphs[start:start + batch_size])


def fit_llpr(model: torch.nn.Module, train_graphs, val_graphs=None, batch_size: int = 16, regularizer: float | None = None,
             device="cpu") -> dict:
    """Fit C = (FᵀF + ς²I)⁻¹ on ``train_graphs`` and α_E, α_F, α_J, α_S on ``val_graphs`` (labelled; the training set
    when None — then σ is under-estimated out of sample). ς² = ``regularizer`` or, if None, the smallest of
    1e-12·tr(A)/d × 10^k for which the Cholesky factorisation succeeds. Returns the state to save."""
    model = model.to(device).eval()
    train_graphs = list(train_graphs)
    if not train_graphs:
        raise PotentialsError("LLPR: the training set is empty")
    a = None
    for g in _batches(train_graphs, batch_size):
        g = g.to(device)
        with torch.no_grad(), capture_features(model) as store:
            model(g)
        fs = scatter_sum(atom_features(model, store, g), g["batch"], int(g["num_atoms"].shape[0]))
        fs = fs / g["num_atoms"].to(torch.float64)[:, None]
        a = fs.T @ fs if a is None else a + fs.T @ fs
    d = a.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=a.device)
    if regularizer is not None:
        reg = float(regularizer)
        chol, info = torch.linalg.cholesky_ex(a + reg * eye)
        if int(info) != 0:
            raise PotentialsError(f"LLPR: FᵀF + {reg:g}·I is not positive definite; raise --regularizer")
    else:
        if not bool(torch.isfinite(a).all()):
            raise PotentialsError("LLPR: the training-set features are not finite (NaN/inf in the model output?)")
        scale = float(torch.trace(a)) / d or 1e-8
        reg = 1e-12 * scale
        while True:
            chol, info = torch.linalg.cholesky_ex(a + reg * eye)
            if int(info) == 0:
                break
            reg *= 10.0
            if reg > 1e3 * scale:
                raise PotentialsError("LLPR: FᵀF could not be factorised with any regulariser; give --regularizer")
    inverse = torch.cholesky_inverse(chol)
    calib = val_graphs if val_graphs is not None else train_graphs
    alphas = calibrate(LLPR(model, inverse), calib, batch_size, device)
    alphas["alpha_forces_jacobian"] = calibrate(LLPR(model, inverse, forces="jacobian"), calib, batch_size, device)["alpha_forces"]
    return {
        "method": "llpr", "inverse": inverse.cpu(), "regularizer": reg, "dim": d, "n_train": len(train_graphs),
        "n_calibration": len(val_graphs) if val_graphs is not None else len(train_graphs),
        "calibrated_on": "validation" if val_graphs is not None else "training", **alphas,
    }


def calibrate(est: LLPR, graphs, batch_size: int = 16, device="cpu") -> dict[str, float]:
    """α² = mean(residual²/σ̃²) for energy (per structure), forces (|ΔF_i|², per atom) and stress (mean square
    over components, per structure with stress); 1.0 where the data has no such label."""
    num = {"energy": [], "forces": [], "stress": []}
    for g in _batches(list(graphs), batch_size):
        g = g.to(device)
        has_stress = "stress" in g and bool((g["stress_weight"] > 0).any())
        out = est.evaluate(g, stress=has_stress)
        if "energy" in g:
            r = (out["energy"].to(torch.float64) - g["energy"]) / out["energy_std_raw"].clamp_min(1e-300)
            num["energy"].append(r**2)
        if "forces" in g:
            keep = g["forces_weight"][g["batch"]] > 0
            if "forces_mask" in g:
                keep = keep & (g["forces_mask"] > 0)
            r2 = ((out["forces"].to(torch.float64) - g["forces"]) ** 2).sum(-1)
            num["forces"].append((r2 / out["forces_std_raw"].clamp_min(1e-300) ** 2)[keep])
        if has_stress:
            keep = g["stress_weight"] > 0
            r2 = ((out["stress"].to(torch.float64) - g["stress"]) ** 2).mean((-1, -2))
            num["stress"].append((r2 / out["stress_std_raw"].clamp_min(1e-300) ** 2)[keep])
    alphas = {}
    for key, parts in num.items():
        vals = torch.cat(parts) if parts else torch.zeros(0)
        alphas[f"alpha_{key}"] = float(vals.mean().sqrt()) if vals.numel() else 1.0
    return alphas


def load_estimator(checkpoint: str | os.PathLike, model: torch.nn.Module, method: str = "llpr", device="cpu") -> LLPR:
    """The single-model estimator ``method`` for ``model`` (loaded from ``checkpoint``), from ``CKPT.llpr.pt``."""
    if method not in METHODS:
        raise PotentialsError(f"unknown uncertainty method {method!r}; available: {list(METHODS)} (or a committee)")
    path = llpr_path(checkpoint)
    if not path.is_file():
        raise PotentialsError(
            f"{path}: no LLPR fit for this checkpoint; run scripts/fit_uncertainty.py {os.fspath(checkpoint)} --train FILE"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PotentialsError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    missing = {"inverse", "alpha_energy", "alpha_forces", "alpha_stress", "checkpoint_sha256"} - set(state)
    if missing:
        raise PotentialsError(f"{path}: not an LLPR fit (missing {sorted(missing)})")
    if state["checkpoint_sha256"] != file_sha256(checkpoint):
        raise PotentialsError(f"{path} was fitted for another version of {os.fspath(checkpoint)}; refit it")
    d = sum(len(idx) if idx is not None else layer.irreps_in.dim for layer, idx in last_linears(model))
    if state["inverse"].shape != (d, d):
        raise PotentialsError(f"{path}: covariance is {tuple(state['inverse'].shape)}, the model has {d} readout features")
    if method == "llpr-jacobian":
        if "alpha_forces_jacobian" not in state:
            raise PotentialsError(f"{path}: fitted without the Jacobian calibration; refit with scripts/fit_uncertainty.py")
        return LLPR(model, state["inverse"], state["alpha_energy"], state["alpha_forces_jacobian"], state["alpha_stress"],
                    forces="jacobian").to(device)
    return LLPR(model, state["inverse"], state["alpha_energy"], state["alpha_forces"], state["alpha_stress"]).to(device)
