"""Read a mace-torch model file without mace-torch: its tensors and hyper-parameters.

A mace ``.model`` file is a ``torch.save`` of the whole ``nn.Module`` (pickled classes of ``mace``, ``e3nn``,
``torch.nn`` and ``torch.fx``). :func:`read_mace` unpickles it with an allow-list: tensors, storages and a few
plain containers are rebuilt for real, every ``mace.*`` / ``e3nn.*`` / ``torch.nn.*`` / ``torch.fx.*`` class
becomes an inert stub that keeps its ``__dict__`` (no pickled code ever runs), and any other global (``os.system``
…) is refused. Walking the stub tree gives the state dict and the hyper-parameters (the way mace's own
``extract_config_mace_model`` reads them). A TorchScript file (``*_compiled.model``) is read through
``torch.jit.load`` and its ``config.yaml`` extra file.

Returns ``(tensors, meta)``: ``tensors`` {state-dict key: tensor}, ``meta`` a JSON-able dict (class names, irreps
strings, numbers) — see :func:`read_mace`.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import zipfile
from typing import Any

import torch

from potentials.errors import PotentialsError

_STUB_PREFIXES = ("mace.", "e3nn.", "torch.nn.modules.", "torch.fx.", "torch.nn.parameter", "opt_einsum")
_REAL = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("_codecs", "encode"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float64"),
    ("torch", "float32"),
    ("torch", "int64"),
    ("torch", "int32"),
    ("torch", "bool"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.functional", "silu"),
    ("torch.nn.functional", "tanh"),
    ("torch", "tanh"),
    ("torch", "sigmoid"),
    ("torch.nn.functional", "sigmoid"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
}


class _Stub:
    """Inert stand-in for a pickled class instance: keeps the pickled state, runs nothing."""

    _stub_name = "?"

    def __init__(self, *args, **kwargs):
        self._stub_args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state

    def __reduce_ex__(self, protocol):  # pragma: no cover - never re-pickled
        raise TypeError("stub objects cannot be pickled")


class _StubTuple(tuple):
    """Stand-in for tuple subclasses (e3nn ``Irrep``, ``_MulIr``, ``Irreps``): a plain tuple with a name."""

    _stub_name = "?"

    def __new__(cls, *args):
        if len(args) == 1 and isinstance(args[0], (tuple, list)):
            return super().__new__(cls, args[0])
        return super().__new__(cls, args)

    def __setstate__(self, state):
        pass


_stub_classes: dict[str, type] = {}
_TUPLE_CLASSES = {"e3nn.o3._irreps.Irrep", "e3nn.o3._irreps._MulIr", "e3nn.o3._irreps.Irreps"}


def _stub_class(module: str, name: str) -> type:
    full = f"{module}.{name}"
    if full not in _stub_classes:
        base = _StubTuple if full in _TUPLE_CLASSES else _Stub
        _stub_classes[full] = type(name, (base,), {"_stub_name": full})
    return _stub_classes[full]


def _fx_reducer(*args, **kwargs):
    """torch.fx graph modules pickle as a reducer call; return an inert stub (their code is never run)."""
    return _stub_class("torch.fx", "GraphModule")()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if (module, name) in _REAL:
            mod = __import__(module, fromlist=[name])
            return getattr(mod, name)
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module.startswith("torch.fx") and name.startswith("reduce_"):
            return _fx_reducer
        if module.startswith(_STUB_PREFIXES) or module in ("mace", "e3nn"):
            return _stub_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a mace/e3nn/torch class)")


class _PickleShim:
    """The ``pickle_module`` handed to ``torch.load``."""

    Unpickler = _Unpickler
    load = pickle.load
    __name__ = "potentials_mace_pickle_shim"


def _open_bytes(path: str) -> io.BytesIO:
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return io.BytesIO(data)


def load_stub_tree(path: str | os.PathLike) -> Any:
    """Unpickle a mace ``.model`` file (optionally gzipped) into a tree of stubs (no mace needed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PotentialsError(f"mace model {path!r} does not exist")
    try:
        return torch.load(_open_bytes(path), map_location="cpu", weights_only=False, pickle_module=_PickleShim)
    except pickle.UnpicklingError as exc:
        raise PotentialsError(f"mace model {path!r}: {exc}") from exc
    except Exception as exc:
        raise PotentialsError(f"mace model {path!r} cannot be read ({type(exc).__name__}: {exc})") from exc


def stub_state_dict(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``module.state_dict()`` of a stub tree: parameters, persistent buffers and sub-modules, in order."""
    out: dict[str, torch.Tensor] = {}
    d = getattr(module, "__dict__", {})
    for k, v in (d.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v.detach()
    skip = set(d.get("_non_persistent_buffers_set") or ())
    for k, v in (d.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            out[prefix + k] = v
    for k, v in (d.get("_modules") or {}).items():
        if v is not None:
            out.update(stub_state_dict(v, prefix + k + "."))
    return out


def class_name(obj: Any) -> str:
    """Fully qualified name of a stub's class (``mace.modules.blocks.RealAgnosticInteractionBlock``)."""
    return getattr(obj, "_stub_name", type(obj).__name__)


def short_name(obj: Any) -> str:
    return class_name(obj).rsplit(".", 1)[-1]


def irreps_str(irreps: Any) -> str:
    """A stubbed e3nn ``Irreps`` (tuple of (mul, (l, p))) → ``"8x0e+8x1o"``."""
    if irreps is None:
        return ""
    if isinstance(irreps, str):
        return irreps
    parts = []
    for mul_ir in irreps:
        mul, ir = mul_ir
        l, p = ir
        parts.append(f"{int(mul)}x{int(l)}{'e' if int(p) == 1 else 'o'}")
    return "+".join(parts)


def _sub(module: Any, name: str) -> Any:
    return (getattr(module, "__dict__", {}).get("_modules") or {}).get(name)


def _attr(module: Any, name: str, default=None):
    d = getattr(module, "__dict__", {})
    if name in d:
        return d[name]
    for store in ("_buffers", "_parameters", "_modules"):
        if name in (d.get(store) or {}):
            return d[store][name]
    return default


def _children(module: Any) -> list[Any]:
    mods = getattr(module, "__dict__", {}).get("_modules") or {}
    return [mods[k] for k in sorted(mods, key=lambda s: int(s) if s.isdigit() else s)]


def _meta_from_stubs(root: Any) -> dict[str, Any]:
    """Hyper-parameters of a stub tree, as mace's ``extract_config_mace_model`` reads them."""
    interactions = _children(_sub(root, "interactions"))
    products = _children(_sub(root, "products"))
    readouts = _children(_sub(root, "readouts"))
    if not interactions or not products or not readouts:
        raise PotentialsError("not a mace model (no interactions/products/readouts)")
    radial = _sub(root, "radial_embedding")
    bessel = _sub(radial, "bessel_fn")
    cutoff = _sub(radial, "cutoff_fn")
    sh = _sub(root, "spherical_harmonics")
    last = readouts[-1]
    gate = None
    act = _sub(last, "non_linearity")
    if act is not None:
        acts = _attr(act, "acts")
        acts = _children(acts) if isinstance(acts, _Stub) else list(acts or [])
        fns = [getattr(a, "__name__", None) or getattr(_attr(a, "f"), "__name__", None) for a in acts]
        gate = next((f for f in fns if f), None)
    correlations = []
    for p in products:
        sc = _sub(p, "symmetric_contractions")
        contr = _children(_sub(sc, "contractions"))
        correlations.append(int(_attr(contr[0], "correlation", 0)) or len([k for k in _attr(contr[0], "_buffers", {}) if k.startswith("U_matrix_")]))
    heads = _attr(root, "heads")
    meta = {
        "class": short_name(root),
        "interaction_classes": [short_name(i) for i in interactions],
        "product_classes": [short_name(p) for p in products],
        "readout_classes": [short_name(r) for r in readouts],
        "radial_class": short_name(bessel) if bessel is not None else None,
        "cutoff_class": short_name(cutoff) if cutoff is not None else None,
        "distance_transform": _sub(radial, "distance_transform") is not None,
        "pair_repulsion": bool(_attr(root, "pair_repulsion", False)) or _sub(root, "pair_repulsion_fn") is not None,
        "apply_cutoff": bool(_attr(radial, "apply_cutoff", True)) if radial is not None else True,
        "use_so3": bool(_attr(root, "use_so3", False)),
        "use_reduced_cg": bool(_attr(root, "use_reduced_cg", False)),
        "use_agnostic_product": bool(_attr(root, "use_agnostic_product", False)),
        "use_last_readout_only": bool(_attr(root, "use_last_readout_only", False)),
        "has_edge_irreps": _attr(root, "edge_irreps") is not None or any(
            _attr(i, "edge_irreps") is not None
            and irreps_str(_attr(i, "edge_irreps")) != irreps_str(_attr(i, "node_feats_irreps")) for i in interactions
        ),
        "has_embedding_extras": any(_sub(root, k) is not None for k in ("joint_embedding", "embedding_readout")),
        "max_ell": int(_attr(sh, "_lmax", _attr(sh, "lmax", -1))),
        "hidden_irreps": irreps_str(_attr(products[0], "irreps_out", None) or _attr(_sub(products[0], "linear"), "irreps_out")),
        "interaction_target_irreps": [irreps_str(_attr(i, "target_irreps")) for i in interactions],
        "interaction_node_irreps": [irreps_str(_attr(i, "node_feats_irreps")) for i in interactions],
        "mlp_irreps": irreps_str(_attr(last, "hidden_irreps")),
        "gate": gate,
        "radial_mlp": [int(v) for v in (_attr(interactions[0], "radial_MLP") or [])],
        "avg_num_neighbors": [float(_attr(i, "avg_num_neighbors", 1.0)) for i in interactions],
        "correlation": correlations,
        "heads": list(heads) if heads is not None else ["Default"],
        "cutoff_p": int(_attr(cutoff, "p")) if cutoff is not None and not torch.is_tensor(_attr(cutoff, "p")) else None,
    }
    return meta


def _tensor_items(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if "._compiled_main" not in k and "_w3j_" not in k}


def read_mace(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A mace-torch model file → (state-dict tensors, hyper-parameter meta). See the module docstring."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PotentialsError(f"mace model {path!r} does not exist")
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        raise PotentialsError(
            f"mace model {path!r} is a TorchScript (compiled) file; import the plain .model file that mace_run_train "
            f"writes next to it"
        )
    root = load_stub_tree(path)
    if not short_name(root).endswith("MACE"):
        raise PotentialsError(f"mace model {path!r}: top-level object is {class_name(root)}, not a mace MACE model")
    try:
        meta = _meta_from_stubs(root)
    except PotentialsError as exc:
        raise PotentialsError(f"mace model {path!r}: {exc}") from exc
    return _tensor_items(stub_state_dict(root)), meta


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(re.search(r"(^|/)code/", n) for n in zf.namelist())
