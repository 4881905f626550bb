"""Published dataset formats (3BPA, OC20, MPtrj) → cached :class:`GraphDataset`.

    from potentials.data.formats import load_dataset
    ds = load_dataset("oc20", root="../shared/data/OC20", cutoff=5.0)          # all frames, filtered
    test = load_dataset("3bpa", root="data/dataset_3BPA", split="test_600K", cutoff=5.0)

The first call converts the source files once into a versioned on-disk cache (:mod:`potentials.data.cache`);
later calls with the same files (size + mtime), cutoff, options and code version open it directly.

Options common to every format (everything else is format-specific; see each module's ``DEFAULTS``):

================  ===========  ==========================================================================
root              (required)   a directory or a single file; the loader detects the layout
split             ``train``    which part to load (3BPA: ``train`` or a test set; others: a cache label)
cutoff            (required)   neighbour-list radius r_max (Å)
cache_dir         data/cache   where caches live
convert_workers   0            processes for the first conversion (0 = in this process)
on_bad_frame      raise        ``raise`` or ``skip`` frames with a missing/NaN target, unknown element, ...
fingerprint       stat         key the cache by size+mtime (``stat``) or the files' SHA-256 (``sha256``)
rebuild           false        convert again even if a valid cache exists
progress          null         progress bar: null = when stderr is a terminal
require_edges     true         a frame whose atoms have no neighbour within the cutoff is a bad frame
================  ===========  ==========================================================================
"""

from __future__ import annotations

import importlib
import logging
import re

import numpy as np
from typing import Any

from potentials.data.cache_build import build_cache, open_or_build
from potentials.data.cache_layout import cache_size, fingerprint_files
from potentials.data.cache_read import CachedGraphDataset
from potentials.data.dataset import GraphDataset, split_by_system, split_indices
from potentials.data.formats.base import check_options, choice, outlier_mask, outlier_options, require_root
from potentials.errors import PotentialsError

log = logging.getLogger("potentials.data")

FORMATS = {"3bpa": "three_bpa", "oc20": "oc20", "mptrj": "mptrj"}

COMMON_DEFAULTS: dict[str, Any] = {
    "root": None,
    "split": "train",
    "cutoff": None,
    "cache_dir": "data/cache",
    "convert_workers": 0,
    "on_bad_frame": "raise",
    "fingerprint": "stat",
    "rebuild": False,
    "progress": None,
    "require_edges": True,
}


def available_formats() -> list[str]:
    return sorted(FORMATS)


def get_format(name: str):
    """The format module for ``name`` (``3bpa``, ``oc20``, ``mptrj``)."""
    key = str(name).strip().lower()
    if key not in FORMATS:
        raise PotentialsError(
            f"unknown data format {name!r}; available: {available_formats()} (or 'ase' for plain files)"
        )
    return importlib.import_module(f"potentials.data.formats.{FORMATS[key]}")


def load_dataset(format: str, **options) -> GraphDataset:
    """Load ``split`` of a dataset in a published format as a lazily read, cached :class:`GraphDataset`.

    Converts on first use (see the module docstring for the common options), then applies the format's
    read-time options (fixed-atom force mask, tags) and the outlier filter, logging how many frames it drops.
    The returned dataset has ``filter_report`` (or None) and its cache's ``meta`` (counts, throughput).
    """
    fmt = str(format).strip().lower()
    mod = get_format(fmt)
    common = {k: options.pop(k, v) for k, v in COMMON_DEFAULTS.items()}
    opts = check_options(fmt, options, mod.DEFAULTS)
    if common["cutoff"] is None:
        raise PotentialsError(f"data format {fmt!r}: no cutoff (r_max) given")
    cutoff = float(common["cutoff"])
    if not cutoff > 0:
        raise PotentialsError(f"data format {fmt!r}: cutoff must be > 0, got {cutoff}")
    on_bad = choice(fmt, "on_bad_frame", common["on_bad_frame"], ("raise", "skip"))
    fingerprint = choice(fmt, "fingerprint", common["fingerprint"], ("stat", "sha256"))
    split = str(common["split"])
    root = require_root(fmt, common["root"])
    plan = mod.plan(root, split, opts)
    spec = {
        "format": fmt,
        "split": split,
        "files": fingerprint_files(plan.files, fingerprint),
        "cutoff": cutoff,
        "options": plan.convert_options,
        "require": [plan.require_energy, plan.require_forces, bool(common["require_edges"])],
        "on_bad_frame": on_bad,
    }
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{fmt}-{split}")
    label = f"{fmt}/{split}"

    def build(final):
        return build_cache(
            final, spec, plan.units, plan.convert, plan.convert_options, cutoff, extras=plan.extras,
            workers=int(common["convert_workers"]), require_energy=plan.require_energy,
            require_forces=plan.require_forces, require_edges=bool(common["require_edges"]),
            on_bad_frame=on_bad, total_frames=plan.total_frames, progress=common["progress"], label=label,
        )

    path = open_or_build(common["cache_dir"], name, spec, build, rebuild=bool(common["rebuild"]))
    ds = CachedGraphDataset(path, name=label, **plan.read_options)
    ds.filter_report = None
    if ds.meta.get("skipped"):
        log.warning("%s: %d bad frame(s) were skipped at conversion; first: %s",
                    label, ds.meta["skipped"], (ds.meta.get("skipped_first") or ["?"])[0])
    filters = outlier_options(fmt, plan.filters)
    if any(filters[k] is not None for k in ("max_force", "max_energy_deviation", "energy_per_atom_range")):
        arr = ds.frame_arrays(["energy", "natoms", "fmax", "system_id"])
        keep, report = outlier_mask(
            arr["energy"], arr["natoms"], arr["fmax"], arr["system_id"], **filters,
            describe=lambda i: ds.describe(int(ds.indices[i])),
        )
        ds = ds.select_frames(keep)
        ds.filter_report = report
        reasons = ", ".join(f"{k}: {v}" for k, v in report.reasons.items())
        log.info("%s: outlier filter dropped %d of %d frames (%s)%s", label, report.dropped, report.total, reasons,
                 f"; first: {'; '.join(report.first)}" if report.first else "")
    log.info("%s: %d frames (cache %s, %.1f MB)", label, len(ds), path, cache_size(path) / 1e6)
    return ds


#: How the validation set is carved out of the training data when no ``val_root`` is given: ``system`` keeps
#: every system (OC20 relaxation trajectory, MPtrj mp-id) on one side; ``frame`` picks random frames.
VAL_SPLIT_DEFAULTS = {"3bpa": "frame", "oc20": "system", "mptrj": "system"}


def load_splits(format: str, *, cutoff: float, seed: int = 0, val_fraction: float = 0.1, val_root=None,
                val_split: str | None = None, **options) -> tuple[GraphDataset, GraphDataset]:
    """(train, validation) for training: ``val_root`` loaded as its own dataset if given, else a seeded
    ``val_fraction`` split of the training data: by whole systems (``val_split="system"``, the default for
    OC20 and MPtrj, so no trajectory or mp-id is on both sides) or by frames (``"frame"``, the default for
    3BPA: 450/50 of the 500 training frames). Logs how many systems and frames each side has; the datasets
    get ``split_report``."""
    fmt = str(format).strip().lower()
    mode = choice(fmt, "val_split", val_split or VAL_SPLIT_DEFAULTS.get(fmt, "frame"), ("system", "frame"))
    train = load_dataset(format, cutoff=cutoff, split=options.pop("split", "train"), **options)
    if val_root:
        opts = dict(options, root=val_root)
        val = load_dataset(format, cutoff=cutoff, split="val", **opts)
        report = {"val_split": "val_root", "train_frames": len(train), "val_frames": len(val),
                  "train_systems": _num_systems(train), "val_systems": _num_systems(val)}
    elif mode == "system":
        train, val, report = split_by_system(train, train.frame_arrays(["system_id"])["system_id"], val_fraction, seed)
        report["val_split"] = "system"
    else:
        sid = train.frame_arrays(["system_id"])["system_id"]
        train_idx, val_idx = split_indices(len(train), val_fraction, seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
        shared = np.intersect1d(sid[train_idx], sid[val_idx]).size
        report = {"val_split": "frame", "train_frames": len(train), "val_frames": len(val),
                  "train_systems": int(np.unique(sid[train_idx]).size), "val_systems": int(np.unique(sid[val_idx]).size),
                  "systems_on_both_sides": int(shared)}
    log.info("%s: validation split by %s: train %d frames of %d systems, validation %d frames of %d systems%s",
             fmt, report["val_split"], report["train_frames"], report["train_systems"], report["val_frames"],
             report["val_systems"], f" ({report['systems_on_both_sides']} systems on both sides)"
             if report.get("systems_on_both_sides") else "")
    train.split_report = val.split_report = report
    return train, val


def _num_systems(ds) -> int:
    return int(np.unique(ds.frame_arrays(["system_id"])["system_id"]).size)


__all__ = ["available_formats", "get_format", "load_dataset", "load_splits"]
