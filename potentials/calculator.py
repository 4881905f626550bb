"""ASE calculator for any trained checkpoint.

    from potentials import PotentialCalculator
    atoms.calc = PotentialCalculator.from_checkpoint("runs/demo/checkpoints/last.ckpt", device="cpu")

Returns ``energy``/``free_energy`` (eV), ``forces`` (eV/Å) and, for periodic cells, ``stress``
(eV/Å³, ASE sign, Voigt order xx yy zz yz xz xy).

Uncertainty (:mod:`potentials.uncertainty`): ``PotentialCalculator.from_checkpoints([...])`` (committee mean and
spread) or ``from_checkpoint(path, uncertainty="llpr")`` (one model) add ``energy_std`` (eV), ``forces_std`` [n]
(eV/Å) and ``stress_std`` [6] (eV/Å³) to ``results``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from potentials.data.neighbors import atoms_to_graph
from potentials.errors import PotentialsError

# The model code (potentials.models, e3nn) is imported inside the functions that need it, so that a calculator
# of an exported model (from_exported) runs without it.

# Compiled inference (compile=True): structures with more edges than this run the memory-lean path (chunk loops
# with compiled chunk kernels, nothing per edge stored) instead of the one compiled graph, whose per-edge tensors
# cost ~50 kB per edge in float32 (7.7 GB at 2,048 fcc Cu atoms, ~160,000 edges).
LEAN_EDGES = 20_000

# Options that change how a model computes, never which weights it has (grid_res: Facet's mixer grid).
INFERENCE_OVERRIDES = ("tp", "dtype", "grid_res")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``scripts/train.py`` (clear errors for missing/corrupt files)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PotentialsError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise PotentialsError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "model_cfg" not in hp or "stats" not in hp or "state_dict" not in ckpt:
        raise PotentialsError(f"checkpoint {path!r} was not written by potentials (no model_cfg/stats/state_dict)")
    return ckpt


def model_from_checkpoint(path: str | os.PathLike, device="cpu", head: str | None = None, **overrides) -> torch.nn.Module:
    """Rebuild the model of a checkpoint (EMA weights when EMA was used) in eval mode.

    ``head``: the head used for structures without a head index (multi-head models; default: the first head);
    an unknown name raises :class:`PotentialsError` naming the available heads.
    ``overrides`` may set options that do not change the weights: ``tp`` (tensor-product engine; only
    between engines with the same parameterisation) and ``dtype`` (``float32``/``float64``).
    """
    from potentials.models import DTYPES, build_model

    ckpt = load_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    model_cfg = dict(hp["model_cfg"])
    for key, value in overrides.items():
        if key not in INFERENCE_OVERRIDES:
            raise PotentialsError(
                f"cannot override {key!r} at inference (allowed: {list(INFERENCE_OVERRIDES)}): it would change the weights"
            )
        if key == "dtype" and value not in DTYPES:
            raise PotentialsError(f"dtype must be one of {sorted(DTYPES)}, got {value!r}")
        if key == "grid_res" and isinstance(value, str):  # e.g. "20,20" from a command line
            value = [int(v) for v in value.replace("x", ",").split(",")]
        model_cfg[key] = value
    heads = [str(h) for h in (hp["stats"].get("heads") or {})] or ["default"]
    if head is not None and str(head) not in heads:
        raise PotentialsError(f"checkpoint {os.fspath(path)!r} has no head {head!r} (heads: {heads})")
    model = build_model(model_cfg, hp["stats"])
    if head is not None:
        model.select_head(str(head))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PotentialsError(
            f"checkpoint {os.fspath(path)!r}: weights do not fit the model built with overrides {overrides}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.to(device).eval()


class PotentialCalculator(Calculator):
    """ASE calculator wrapping a ``potentials`` model."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energy_std", "forces_std", "stress_std"]

    def __init__(self, model: torch.nn.Module | None, device="cpu", compile: bool = False, estimator=None,
                 lean_edges: int | None = None, **kwargs):
        """``compile=True``: weights baked into compiled code; structures of up to ``lean_edges`` edges (default
        :data:`LEAN_EDGES`) run as one compiled graph, larger ones through the memory-lean chunk loops with compiled
        chunk kernels (:mod:`potentials.models.compiled_chunks`)."""
        super().__init__(**kwargs)
        self.device = torch.device(device)
        self.compiled = self.exported = None
        self.estimator = estimator  # potentials.uncertainty estimator (committee / LLPR), or None
        if model is None:  # from_exported sets self.exported
            return
        self.model = model.to(device).eval()
        self.r_max = float(model.r_max)
        if compile:  # weights baked in as constants; one graph for every atom count (dynamic shapes) up to
            # LEAN_EDGES edges, above it the memory-lean chunk loops with compiled chunk kernels
            from potentials.models.compiled import CompiledPotential

            for p in self.model.parameters():
                p.requires_grad_(False)
            self.compiled = CompiledPotential(self.model, backend="inductor", params_as_inputs=False,
                                              lean_edges=LEAN_EDGES if lean_edges is None else int(lean_edges))

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device="cpu", compile: bool = False, uncertainty: str | None = None,
        head: str | None = None, lean_edges: int | None = None, **overrides
    ) -> "PotentialCalculator":
        """Load a checkpoint in one line; ``head`` picks the head of a multi-head model (default: its first;
        ``calc.model.heads`` lists them); ``overrides`` as in :func:`model_from_checkpoint`; ``compile=True``
        evaluates through compiled code (one graph up to ``lean_edges`` edges, compiled chunk kernels above: see
        :meth:`__init__`); ``uncertainty="llpr"``
        adds the spread keys from the fit stored next to the checkpoint (``scripts/fit_uncertainty.py``)."""
        model = model_from_checkpoint(path, device=device, head=head, **overrides)
        if uncertainty is None:
            return cls(model, device=device, compile=compile, lean_edges=lean_edges)
        from potentials.uncertainty.llpr import load_estimator

        return cls(model, device=device, estimator=load_estimator(path, model, uncertainty, device=device))

    @classmethod
    def from_checkpoints(cls, paths, device="cpu", **overrides) -> "PotentialCalculator":
        """Committee of checkpoints (list or glob): mean energy/forces/stress plus their spread in ``results``."""
        from potentials.uncertainty.committee import Committee

        committee = Committee.from_checkpoints(paths, device=device, **overrides)
        return cls(committee.members[0], device=device, estimator=committee)

    @classmethod
    def from_exported(cls, path: str | os.PathLike, device="cpu") -> "PotentialCalculator":
        """Run a package written by ``scripts/export.py`` (AOTInductor; :mod:`potentials.exported`) — no model
        classes are imported."""
        from potentials.exported import ExportedPotential

        calc = cls(None, device=device)
        calc.exported = ExportedPotential(path, device=device)
        calc.r_max = calc.exported.r_max
        return calc

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(np.any(self.atoms.pbc))
        if ("stress" in properties or "stress_std" in properties) and not periodic:
            raise PropertyNotImplementedError("stress is only defined for periodic cells (pbc has no True)")
        if self.estimator is None and any(p.endswith("_std") for p in properties):
            raise PropertyNotImplementedError("no uncertainty: use from_checkpoints([...]) or from_checkpoint(..., uncertainty='llpr')")
        if self.exported is not None:
            energy, forces, stress = self.exported(self.atoms)
            self._store(energy, forces, stress if periodic else None)
            return
        from potentials.models import energy_forces_stress
        from potentials.nn.ops import fused_inference

        graph = atoms_to_graph(self.atoms, self.r_max, where="calculator input", require_edges=False)
        graph["batch"] = torch.zeros(len(self.atoms), dtype=torch.long)
        graph = graph.to(self.device)
        if self.estimator is not None:  # mean and spread (potentials.uncertainty)
            from potentials.uncertainty import estimator_results

            self.results.update(estimator_results(self.estimator, graph, periodic))
            return
        if self.compiled is not None:
            with torch.no_grad():  # the compiled graph computes forces and stress itself
                out = self.compiled(graph, forces=True, stress=periodic)
        else:
            with fused_inference():  # memory-lean kernels: only input derivatives are needed here
                out = energy_forces_stress(self.model, graph, forces=True, stress=periodic)
        self._store(out["energy"], out["forces"], out["stress"] if periodic else None)

    def _store(self, energy: torch.Tensor, forces: torch.Tensor, stress: torch.Tensor | None) -> None:
        """energy [1] (eV), forces [n, 3] (eV/Å), stress [1, 3, 3] (eV/Å³) or None → ``results`` (stress in Voigt
        order xx yy zz yz xz xy)."""
        self.results["energy"] = self.results["free_energy"] = float(energy.detach().cpu()[0])
        self.results["forces"] = forces.detach().cpu().to(torch.float64).numpy()
        if stress is not None:
            s = stress.detach().cpu().to(torch.float64).numpy()[0]
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
