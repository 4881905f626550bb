"""Multi-head training: one backbone, one readout (+ E0s, scale/shift) per head, each dataset mapped to a head.

``data=multi`` (``configs/data/multi.yaml``)::

    data:
      name: multi
      batch_size: 4                 # loader settings shared by every head
      heads:
        mptrj:                      # head name (the calculator's head="mptrj")
          weight: 1.0               # loss weight of this head's structures
          data: {format: mptrj, root: PATH, e0s: fit}   # one dataset config (the keys of data/*.yaml)
        mine:
          weight: 2.0
          data: {train_files: [my.xyz], e0s: {H: -13.6, O: -2041.8}}

Each structure carries its head index (``graph["head"]`` [1], batched to [B]); the model picks that head's
readout column, E0s and scale/shift (:class:`~potentials.models.base.PotentialModel`). Statistics: E0s, scale and
shift per head (each from its own training set); ``avg_num_neighbors`` over all heads; the element table is the
union. Fine-tuning with ``finetune.replay_head=NAME`` puts the replay data on a head of its own
(:func:`head_grown_state` copies the starting checkpoint's head into every new head).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset

from potentials.errors import PotentialsError
from potentials.train.datamodule import PotentialDataModule

LOADER_KEYS = ("batch_size", "val_batch_size", "num_workers", "shuffle")
FILLABLE = {"forces_mask": lambda g: torch.ones_like(g["numbers"], dtype=torch.float64),
            "tags": lambda g: torch.zeros_like(g["numbers"])}


class HeadDataset(Dataset):
    """``dataset`` with ``graph["head"] = [head]`` added, loss weights multiplied by ``weight`` (1: untouched) and
    the optional per-atom fields ``fill`` (``forces_mask``/``tags``, present in another head) given defaults."""

    def __init__(self, dataset, head: int, weight: float = 1.0, fill: tuple[str, ...] = ()):
        self.dataset, self.head, self.weight, self.fill = dataset, int(head), float(weight), tuple(fill)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        g = self.dataset[i]
        extra = {"head": torch.tensor([self.head], dtype=torch.long)}
        if self.weight != 1.0:
            extra.update({k: g[k] * self.weight for k in ("energy_weight", "forces_weight", "stress_weight") if k in g})
        extra.update({k: FILLABLE[k](g) for k in self.fill if k not in g})
        return g.replace(**extra)


def parse_heads(data_cfg: dict) -> tuple[list[tuple[str, dict, float]], dict]:
    """``data.heads`` → ([(head name, dataset config, loss weight)], loader settings). Every dataset must sit under
    a head: other dataset keys at the top level, an empty ``heads`` or an entry without ``data`` raise one line."""
    data_cfg = dict(data_cfg)
    heads = data_cfg.pop("heads", None)
    data_cfg.pop("name", None)
    loader = {k: data_cfg.pop(k) for k in LOADER_KEYS if k in data_cfg}
    if data_cfg:
        raise PotentialsError(
            f"data (multi-head): key(s) {sorted(data_cfg)} are mapped to no head; put each dataset under "
            "data.heads.<head>.data (top-level keys: heads, name, " + ", ".join(LOADER_KEYS) + ")"
        )
    if not isinstance(heads, dict) or not heads:
        raise PotentialsError("data.heads: give at least one head, e.g. data.heads.mine={data: {train_files: [my.xyz]}}")
    out = []
    for name, entry in heads.items():
        where = f"data.heads.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
            raise PotentialsError(f"{where}: needs a dataset config under {where}.data (e.g. {{train_files: [my.xyz]}})")
        unknown = set(entry) - {"data", "weight"}
        if unknown:
            raise PotentialsError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: data, weight)")
        weight = float(entry.get("weight", 1.0))
        if not math.isfinite(weight) or weight <= 0:
            raise PotentialsError(f"{where}.weight must be > 0, got {entry.get('weight')}")
        out.append((str(name), dict(entry["data"]), weight))
    return out, loader


class MultiHeadDataModule(PotentialDataModule):
    """One :class:`PotentialDataModule` per head; the training and validation sets are their concatenations, each
    structure tagged with its head. ``statistics()`` gives the per-head statistics under ``heads``."""

    def __init__(self, heads: list[tuple[str, PotentialDataModule, float]], seed: int = 0, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 0, shuffle: bool = True):
        first = heads[0][1]
        super().__init__(r_max=first.r_max, seed=seed, batch_size=batch_size, val_batch_size=val_batch_size,
                         num_workers=num_workers, shuffle=shuffle)
        self.keys = dict(first.keys)  # replay files are read with the first head's keys
        self.head_modules = heads

    @property
    def head_names(self) -> list[str]:
        return [name for name, _, _ in self.head_modules]

    def load(self) -> None:
        if self.train_set is not None:
            return
        for _, dm, _ in self.head_modules:
            dm.load()
        fields = {name: set(dm.train_set[0]) for name, dm, _ in self.head_modules if len(dm.train_set)}
        union = set().union(*fields.values())
        for name, keys in fields.items():
            missing = union - keys - set(FILLABLE)
            if missing:
                raise PotentialsError(
                    f"data.heads.{name}: its structures lack {sorted(missing)} that another head's have; heads are "
                    "batched together, so give every head the same targets (e.g. stress_key: null everywhere)"
                )
        fill = tuple(sorted(union & set(FILLABLE)))
        self.train_set = ConcatDataset([HeadDataset(dm.train_set, i, w, fill) for i, (_, dm, w) in enumerate(self.head_modules)])
        self.val_set = ConcatDataset([HeadDataset(dm.val_set, i, w, fill) for i, (_, dm, w) in enumerate(self.head_modules)])

    def statistics(self) -> dict[str, Any]:
        """The union element table, ``avg_num_neighbors`` averaged over the heads (weighted by their training
        structures), and ``heads`` = ``{name: {e0s, scale, shift}}``; top-level ``e0s``/``scale``/``shift`` are the
        first head's."""
        self.load()
        per = [(name, dm.statistics(), len(dm.train_set)) for name, dm, _ in self.head_modules]
        return merge_head_stats(per)


def merge_head_stats(per_head: list[tuple[str, dict, int]]) -> dict[str, Any]:
    """[(head, statistics of its training set, its number of structures)] → multi-head statistics."""
    numbers = sorted({int(z) for _, s, _ in per_head for z in s["atomic_numbers"]})
    total = sum(n for _, _, n in per_head) or 1
    avg = sum(float(s["avg_num_neighbors"]) * n for _, s, n in per_head) / total
    heads = {name: {"e0s": {int(k): float(v) for k, v in s["e0s"].items()}, "scale": float(s["scale"]),
                    "shift": float(s["shift"])} for name, s, _ in per_head}
    first = next(iter(heads.values()))
    return {"atomic_numbers": numbers, "e0s": dict(first["e0s"]), "avg_num_neighbors": avg,
            "scale": first["scale"], "shift": first["shift"], "heads": heads}


def build_multi_datamodule(data_cfg: dict, r_max: float, seed: int, build_one) -> MultiHeadDataModule:
    """``data.heads`` → :class:`MultiHeadDataModule`; ``build_one(cfg, r_max, seed)`` builds one head's data."""
    heads, loader = parse_heads(data_cfg)
    modules = []
    for name, cfg, weight in heads:
        try:
            dm = build_one({**cfg, **{k: v for k, v in loader.items() if k != "shuffle"}}, r_max, seed)
        except PotentialsError as exc:
            raise PotentialsError(f"data.heads.{name}.data: {exc}") from None
        modules.append((name, dm, weight))
    return MultiHeadDataModule(modules, seed=seed, **loader)


def head_names(stats: dict) -> list[str]:
    """Head names of a model's statistics (``["default"]`` for a single-head model)."""
    return [str(h) for h in (stats.get("heads") or {})] or ["default"]


def finetune_heads(init_stats: dict, stats: dict, data_stats: dict, replay_head: str | None, e0s: Any = "keep",
                   new_elements: bool = True, path: str = "") -> tuple[dict, list[str]]:
    """Fine-tune statistics with heads. ``stats``: :func:`~potentials.train.finetune.finetune_stats` of the whole
    data; ``data_stats``: the new data's (``heads`` when ``data=multi``, else one head ``"default"``). Each data head
    gets the E0s rule ``e0s`` applied against its source head, which is the checkpoint head of the same name, else
    its first head; scale/shift are the source head's. ``replay_head`` (if given) is one more head, a copy of the
    source head (E0s, scale, shift). Returns (stats with ``heads``, source head name of each new head)."""
    from potentials.train.finetune import finetune_stats

    old_names = head_names(init_stats)
    old_heads = init_stats.get("heads") or {old_names[0]: {k: init_stats[k] for k in ("e0s", "scale", "shift")
                                                           if k in init_stats}}
    data_heads = data_stats.get("heads") or {"default": data_stats}
    table = list(stats["atomic_numbers"])
    new, sources = {}, []
    for name, h in data_heads.items():
        src = name if name in old_heads else old_names[0]
        base = {**init_stats, **old_heads[src]}
        fitted = {"atomic_numbers": [int(z) for z in h.get("e0s", {})], "e0s": h.get("e0s", {})}
        e0 = finetune_stats(base, fitted, e0s, new_elements, path)["e0s"]
        new[name] = {"e0s": {z: float(e0.get(z, 0.0)) for z in table}, "scale": float(base.get("scale", 1.0)),
                     "shift": float(base.get("shift", 0.0))}
        sources.append(src)
    if replay_head is not None:
        replay_head = str(replay_head)
        if replay_head in new:
            raise PotentialsError(f"finetune.replay_head={replay_head!r} is also a data head; give it its own name")
        src = replay_head if replay_head in old_heads else old_names[0]
        base = {**init_stats, **old_heads[src]}
        old_e0 = {int(k): float(v) for k, v in base.get("e0s", {}).items()}
        new[replay_head] = {"e0s": {z: old_e0.get(z, 0.0) for z in table}, "scale": float(base.get("scale", 1.0)),
                            "shift": float(base.get("shift", 0.0))}
        sources.append(src)
    first = next(iter(new.values()))
    return {**stats, **first, "heads": new}, sources


def head_grown_state(model: torch.nn.Module, old_state: dict[str, torch.Tensor], old_heads: int,
                     sources: list[int]) -> dict[str, torch.Tensor]:
    """``old_state`` with its readouts, E0s and scale/shift widened from ``old_heads`` heads to the model's heads:
    new head k starts as old head ``sources[k]`` (same function: the last Linear is rescaled by √(H/H_old) for its
    wider, masked fan-in). Tensors of other modules are returned unchanged."""
    from e3nn import o3

    H, Ho = len(sources), int(old_heads)
    if H == Ho and sources == list(range(Ho)):
        return dict(old_state)
    src = torch.as_tensor(sources)
    out = dict(old_state)
    modules = dict(model.named_modules())
    for key, target in model.state_dict().items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if key not in old_state or old_state[key].shape == target.shape and H == Ho:
            continue
        old = old_state[key]
        if key == "e0s" or (leaf in ("scale", "shift") and owner_name.endswith("scale_shift")):
            rows = old if old.dim() == 2 else old[None]  # [H_old, n_el_old]: the element table grows later
            out[key] = rows[src] if H > 1 else rows[src[0]]
        elif leaf in ("output_mask", "bias") and old.shape != target.shape:
            out[key] = target
        elif isinstance(owner, o3.Linear) and leaf == "weight" and owner.irreps_out == o3.Irreps(f"{H}x0e"):
            if ".linear_2" in key:  # per-head MLP blocks [hidden·H, H], block-diagonal in use
                hidden = old.numel() // (Ho * Ho)
                w_old = old.view(hidden * Ho, Ho)
                w = torch.zeros(hidden * H, H, dtype=old.dtype)
                for k, s in enumerate(sources):
                    w[k * hidden:(k + 1) * hidden, k] = w_old[s * hidden:(s + 1) * hidden, s] * math.sqrt(H / Ho)
                out[key] = w.reshape(-1)
            else:  # a Linear readout: one column per head
                out[key] = old.view(-1, Ho)[:, src].reshape(-1)
        elif isinstance(owner, o3.Linear) and leaf == "weight" and ".linear_1" in key:
            hidden = owner.irreps_out.num_irreps // H
            out[key] = old.view(-1, Ho, hidden)[:, src].reshape(-1)
    return out
