"""Shared helpers of the benchmark scripts: models, the mace-torch peer, structures, worker subprocesses.

* the reference hyper-parameters, shared by this project's models and the mace-torch peer;
* the list of this project's model/back-end variants available at run time, building them, counting parameters;
* structures and data (Cu bulk cells, 3BPA isolated-atom energies), timed relaxations and predictions through an
  ASE calculator (the same code on both sides);
* running a worker as a subprocess with a JSON task on stdin and one ``MARKER {json}`` line on stdout —
  the mace-torch peer (``scripts/peer_mace.py`` in ``peer-venv/``) and this project's own isolated workers.

The machine description, timing statistics and the report writers are in ``bench_report.py``. Units: times in
seconds unless a key says otherwise (``*_ms``, ``*_us``), memory in MB (2**20 bytes).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bench_report import REPO, peak_rss_mb  # the repository on sys.path too

PEER_VENV = REPO / "peer-venv"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_SCRIPT = REPO / "scripts" / "peer_mace.py"
# the real data samples: ../shared/data beside the checkout, or $POTENTIALS_SHARED_DATA (as the tests read them)
SHARED_DATA = Path(os.environ.get("POTENTIALS_SHARED_DATA") or REPO.parent / "shared" / "data")
DEFAULT_3BPA = SHARED_DATA / "3BPA" / "train_300K.xyz"
DEFAULT_DEMO = REPO / "data" / "demo" / "cuau_emt.extxyz"
DOCS = REPO / "docs" / "benchmarks"


# The reference configuration of the mace-torch run (ScaleShiftMACE, mace_run_train defaults
# otherwise): identical on both sides of every comparison. Names are this project's model options;
# mace-torch's are in PEER_NAMES.
REFERENCE_HP: dict[str, Any] = {
    "channels": 32,
    "max_L": 1,
    "max_ell": 3,
    "correlation": 3,
    "num_interactions": 2,
    "r_max": 5.0,
    "num_bessel": 8,
    "cutoff_p": 5,
    "radial_hidden": [64, 64, 64],
    "readout_hidden": 16,
}
REFERENCE_BATCH_SIZE = 5
PEER_NAMES = {
    "channels": "num_channels",
    "max_L": "max_L",
    "max_ell": "max_ell",
    "correlation": "correlation",
    "num_interactions": "num_interactions",
    "r_max": "r_max",
    "num_bessel": "num_radial_basis",
    "cutoff_p": "num_cutoff_basis",
    "radial_hidden": "radial_MLP",
    "readout_hidden": "MLP_irreps (Kx0e)",
}
PEER_FIXED = (
    "ScaleShiftMACE, RealAgnosticResidualInteractionBlock (first and later layers), gate silu, "
    "radial_type bessel, use_reduced_cg False (mace_run_train defaults)"
)



# -------------------------------------------------------------------------------- relaxation, prediction
def timed_relaxation(atoms, task: dict[str, Any]) -> dict[str, Any]:
    """Relax ``atoms`` (calculator attached) as ``task`` says (optimizer FIRE|BFGS|LBFGS, fmax, steps, cell) and
    time it; the same code runs on both sides (this project and, in the peer venv, mace-torch)."""
    import numpy as np
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE, LBFGS

    calls = {"n": 0}
    orig = atoms.calc.calculate

    def counted(*args, **kwargs):
        calls["n"] += 1
        return orig(*args, **kwargs)

    atoms.calc.calculate = counted
    target = FrechetCellFilter(atoms) if task.get("cell") else atoms
    opt = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}[task.get("optimizer", "FIRE")](target, logfile=None)
    t0, c0 = time.perf_counter(), time.process_time()
    converged = bool(opt.run(fmax=float(task.get("fmax", 0.05)), steps=int(task.get("steps", 200))))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall, "cpu_s": cpu, "steps": int(opt.nsteps), "calls": calls["n"], "converged": converged,
        "final_energy": float(atoms.get_potential_energy()),
        "final_fmax": float(np.linalg.norm(target.get_forces(), axis=1).max()), "num_atoms": len(atoms),
        "peak_rss_mb": peak_rss_mb(),
    }


def voigt_to_full(v):
    """ASE Voigt stress (xx, yy, zz, yz, xz, xy) → 3×3 numpy array."""
    import numpy as np

    xx, yy, zz, yz, xz, xy = (float(x) for x in v)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def predict_frames(calc, path: str) -> dict[str, Any]:
    """Energy, forces and (periodic frames) 3×3 stress of every frame of ``path`` with the ASE calculator ``calc``;
    the same code on both sides (validation RMSEs of the models a relaxation benchmark uses)."""
    import ase.io
    import numpy as np

    out: dict[str, Any] = {"energy": [], "forces": [], "stress": []}
    for atoms in ase.io.read(path, index=":"):
        atoms.calc = calc
        out["energy"].append(float(atoms.get_potential_energy()))
        out["forces"].append(np.asarray(atoms.get_forces()).tolist())
        out["stress"].append(voigt_to_full(atoms.get_stress(voigt=True)).tolist() if atoms.pbc.any() else None)
    return out


# --------------------------------------------------------------------------------------------- variants
def parse_hp_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["channels=8", "radial_hidden=[16,16]"]`` → dict (values parsed as JSON, else kept as strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--hp expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key not in REFERENCE_HP:
            raise SystemExit(f"--hp: unknown key {key!r}; known: {sorted(REFERENCE_HP)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def hyperparameters(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    hp = dict(REFERENCE_HP)
    hp.update(overrides or {})
    return hp


def hp_description(hp: dict[str, Any], batch_size: int | None = None) -> dict[str, Any]:
    """The hyper-parameters as both sides name them, for the report."""
    desc = {
        "values": dict(hp),
        "mace_torch_names": {PEER_NAMES[k]: v for k, v in hp.items() if k in PEER_NAMES},
        "mace_torch_fixed": PEER_FIXED,
        "this_project_fixed": "model.radial=mlp (unless the variant says otherwise), SiLU, residual skip in every layer",
        "is_reference": all(hp.get(k) == v for k, v in REFERENCE_HP.items()),
    }
    if batch_size is not None:
        desc["batch_size"] = batch_size
    return desc


MODES = ("eager", "compile", "graph", "export")


def with_modes(variants: list[dict[str, Any]], modes: Sequence[str]) -> list[dict[str, Any]]:
    """Each variant once per execution mode: ``eager``; ``compile`` (the calculator's ``compile=True``: one traced +
    compiled energy/forces/stress graph up to ``LEAN_EDGES`` edges, the memory-lean chunk loops with compiled chunk
    kernels above, :mod:`potentials.models.compiled` / ``compiled_chunks``); ``graph`` (always the one compiled
    graph, whatever the size); ``export`` (AOTInductor package, :mod:`potentials.models.export`).
    Labels get ``+compile`` / ``+graph`` / ``+export``."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; known: {list(MODES)}")
    return [{**v, "label": v["label"] if m == "eager" else f"{v['label']}+{m}", "mode": m} for v in variants for m in modes]


def our_variants(only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every model/back-end combination of this project available now: MACE with each registered
    tensor-product engine (``auto`` and aliases excluded), Facet if registered, the spline radial if registered."""
    from potentials.models import MODELS
    from potentials.nn.tp import available_engines, get_engine

    variants = []
    for engine in available_engines():
        if engine == "auto":
            continue
        try:  # an alias (``grid`` → ``gaunt_grid``) builds the same engine: benchmark it once, by its own name
            if getattr(get_engine(engine), "name", engine) not in (engine, "", None):
                continue
        except Exception:  # an engine that cannot even be instantiated still gets a row (with its error)
            pass
        variants.append({"label": f"mace/{engine}", "cfg": {"name": "mace", "tp": engine}})
    if "facet" in MODELS:
        variants.append({"label": "facet", "cfg": {"name": "facet"}})
    try:
        from potentials.nn.radials import _RADIALS

        if "spline" in _RADIALS:
            variants.append({"label": "mace/cg+spline", "cfg": {"name": "mace", "tp": "cg", "radial": "spline"}})
    except ImportError:  # pragma: no cover
        pass
    if only:
        wanted = set(only)
        variants = [v for v in variants if v["label"] in wanted]
    return variants


def model_config(variant: dict[str, Any], hp: dict[str, Any], dtype: str) -> tuple[dict[str, Any], list[str]]:
    """The ``build_model`` config of ``variant`` at hyper-parameters ``hp``.

    A model whose constructor does not take some of the hyper-parameters (e.g. Facet) gets only those it
    takes; the names it dropped are returned so the report can say so.
    """
    from potentials.models import MODELS

    cfg = dict(variant["cfg"])
    cls = MODELS[cfg.get("name", "mace")]
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    dropped = []
    for key, value in hp.items():
        if takes_any or key in params:
            cfg.setdefault(key, value)
        else:
            dropped.append(key)
    cfg["dtype"] = dtype
    return cfg, dropped


def build_our_model(cfg: dict[str, Any], stats: dict[str, Any], seed: int = 0):
    import torch

    from potentials.models import build_model

    torch.manual_seed(seed)
    return build_model(cfg, stats)


def make_stats(atomic_numbers: Sequence[int], avg_num_neighbors: float, e0s: dict | None = None) -> dict[str, Any]:
    return dict(
        atomic_numbers=[int(z) for z in atomic_numbers], e0s=dict(e0s or {}),
        avg_num_neighbors=float(avg_num_neighbors), scale=1.0, shift=0.0,
    )


def num_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# mace-torch's top-level module names that hold the same block as ours under another name
PEER_MODULE_NAMES = {"node_embedding": "embedding"}


def parameters_by_module(model, rename: dict[str, str] | None = None) -> dict[str, int]:
    """Parameter count per top-level submodule (``interactions``, ``products``, ...), names mapped by ``rename``."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        top = (rename or {}).get(top, top)
        out[top] = out.get(top, 0) + int(p.numel())
    return out


def parameter_comparison(ours: dict[str, int] | None, peer: dict[str, int] | None) -> str:
    """One sentence comparing per-module parameter counts of this project's model and mace-torch's (computed
    from both models of the run; empty when either side is missing)."""
    if not ours or not peer:
        return ""
    peer = {PEER_MODULE_NAMES.get(k, k): v for k, v in peer.items()}
    names = sorted(set(ours) | set(peer))
    differ = [f"`{n}` {ours.get(n, 0):,} vs {peer.get(n, 0):,}" for n in names if ours.get(n, 0) != peer.get(n, 0)]
    same = [f"`{n}`" for n in names if ours.get(n, 0) == peer.get(n, 0)]
    total = f"{sum(ours.values()):,} vs {sum(peer.values()):,} parameters (this project vs mace-torch)"
    if not differ:
        return f"Parameters: {total}; every top-level module has the same count."
    return (f"Parameters: {total}; modules that differ: {'; '.join(differ)}"
            + (f"; same count: {', '.join(same)}." if same else "."))


# ------------------------------------------------------------------------------------------------- data
def read_3bpa_e0s(train_path: Path) -> dict[int, float]:
    """Isolated-atom energies from ``iso_atoms.xyz`` beside the 3BPA training file ({} if absent)."""
    iso = Path(train_path).with_name("iso_atoms.xyz")
    if not iso.is_file():
        return {}
    import ase.io

    out = {}
    for atoms in ase.io.read(str(iso), index=":"):
        energy = atoms.info.get("energy")
        if energy is None and atoms.calc is not None:
            energy = atoms.calc.results.get("energy")
        if energy is not None and len(atoms) == 1:
            out[int(atoms.numbers[0])] = float(energy)
    return out


def cu_bulk(n_cells: int, a: float = 3.61, rattle: float = 0.05, seed: int = 1):
    """fcc Cu, cubic cell repeated ``n_cells``³ (4 n³ atoms), rattled so that forces are non-zero."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((n_cells, n_cells, n_cells))
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def cells_for_sizes(sizes: Sequence[int]) -> list[int]:
    """Target atom counts → cubic repeat counts n (4 n³ atoms, the nearest)."""
    out = []
    for s in sizes:
        n = max(1, round((float(s) / 4.0) ** (1.0 / 3.0)))
        if n not in out:
            out.append(n)
    return out


# ----------------------------------------------------------------------------------------- subprocesses
def peer_status() -> tuple[bool, str]:
    """(available, reason): whether ``peer-venv`` holds a Python that can run the peer."""
    if not PEER_PYTHON.exists():
        return False, f"peer venv absent ({PEER_PYTHON} missing): run `make peer-venv`"
    return True, "ok"


def run_json_worker(
    cmd: Sequence[str], task: dict[str, Any], marker: str, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd`` with ``task`` as JSON on stdin; parse the last ``MARKER {json}`` line of its stdout.

    Never raises for the worker's failures: returns ``{"error": ...}`` (non-zero exit, timeout, no answer).
    """
    full_env = dict(os.environ)
    threads = str(task.get("threads", 1))
    full_env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            list(cmd), input=json.dumps(task), capture_output=True, text=True, timeout=timeout, env=full_env,
            cwd=str(REPO),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    answer = None
    for line in proc.stdout.splitlines():
        if line.startswith(marker + " "):
            answer = line[len(marker) + 1:]
    if answer is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"worker exited {proc.returncode} without an answer: {' | '.join(tail)}"}
    try:
        result = json.loads(answer)
    except json.JSONDecodeError as exc:
        return {"error": f"worker answer is not JSON ({exc})"}
    result.setdefault("process_wall_s", wall)
    return result


def run_peer(task: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    ok, reason = peer_status()
    if not ok:
        return {"error": reason, "skipped": True}
    return run_json_worker([str(PEER_PYTHON), str(PEER_SCRIPT)], task, "PEER_JSON", timeout)


def run_self_worker(script: Path, task: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``script --worker`` with this interpreter (an isolated process: own peak memory, own allocator)."""
    return run_json_worker([sys.executable, str(script), "--worker"], task, "BENCH_JSON", timeout)


def worker_main(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Body of ``script --worker``: task JSON on stdin → ``BENCH_JSON {...}`` on stdout."""
    import traceback
    import warnings

    warnings.filterwarnings("ignore")
    task = json.loads(sys.stdin.read())
    try:
        result = handler(task)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print("BENCH_JSON " + json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print("BENCH_JSON " + json.dumps(result))
    return 0


def peer_info(threads: int) -> dict[str, Any]:
    """Versions of the peer venv (or the reason it is unavailable)."""
    ok, reason = peer_status()
    if not ok:
        return {"error": reason}
    return run_peer({"kind": "info", "threads": threads}, timeout=300)


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-"))
