"""Validation splits: by system by default for OC20/MPtrj (no trajectory or mp-id on both sides)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from potentials.data.dataset import GraphDataset, split_by_system
from potentials.errors import PotentialsError
from tests.conftest import SHARED_DATA


def _dummy(n):
    return GraphDataset([{"numbers": torch.tensor([1])} for _ in range(n)], [f"f, frame {i}" for i in range(n)])


def test_split_by_system_keeps_systems_whole():
    systems = np.repeat(np.arange(12), np.arange(1, 13))  # 78 frames, systems of 1..12 frames
    ds = _dummy(len(systems))
    train, val, report = split_by_system(ds, systems, 0.2, seed=3)
    t = {systems[int(s.rsplit(" ", 1)[1])] for s in train.sources}
    v = {systems[int(s.rsplit(" ", 1)[1])] for s in val.sources}
    assert not t & v and t | v == set(range(12))
    assert len(train) + len(val) == len(systems) and len(val) >= round(0.2 * len(systems))
    assert report == {"train_systems": len(t), "val_systems": len(v), "train_frames": len(train), "val_frames": len(val)}
    again = split_by_system(ds, systems, 0.2, seed=3)
    assert again[1].sources == val.sources  # deterministic
    with pytest.raises(PotentialsError, match="val_split=frame"):
        split_by_system(_dummy(5), np.zeros(5, int), 0.2, seed=0)


@pytest.mark.parametrize("fmt,folder", [("oc20", "OC20"), ("mptrj", "MPTrj")])
def test_real_validation_split_has_no_shared_system(fmt, folder, tmp_path, caplog):
    from potentials.data.formats import load_splits

    root = SHARED_DATA / folder
    if not root.is_dir():
        pytest.skip(f"real dataset sample absent ({root})")
    opts = dict(cutoff=4.5, seed=0, val_fraction=0.1, root=str(root), cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="potentials.data"):
        train, val = load_splits(fmt, **opts)
    sid_t = set(train.frame_arrays(["system_id"])["system_id"].tolist())
    sid_v = set(val.frame_arrays(["system_id"])["system_id"].tolist())
    assert sid_t and sid_v and not sid_t & sid_v
    rep = train.split_report
    assert rep["val_split"] == "system" and rep["val_systems"] == len(sid_v) and rep["train_systems"] == len(sid_t)
    assert f"validation {len(val)} frames of {len(sid_v)} systems" in caplog.text
    # the explicit frame split still exists, and (on these samples) mixes systems, which it reports
    train_f, val_f = load_splits(fmt, val_split="frame", **opts)
    assert len(train_f) + len(val_f) == len(train) + len(val)
    shared = set(train_f.frame_arrays(["system_id"])["system_id"].tolist()) & set(
        val_f.frame_arrays(["system_id"])["system_id"].tolist())
    assert train_f.split_report["systems_on_both_sides"] == len(shared) > 0
    with pytest.raises(PotentialsError, match="val_split"):
        load_splits(fmt, val_split="random", **opts)


def test_synthetic_oc20_split_keeps_trajectories_whole(tmp_path):
    from potentials.data.formats import load_splits
    from tests.test_evaluate_format import _synthetic_oc20

    root = _synthetic_oc20(tmp_path / "oc20", n_files=5, n_frames=4)
    opts = dict(cutoff=3.0, seed=1, val_fraction=0.2, root=str(root), cache_dir=str(tmp_path / "c"), max_force=None)
    train, val = load_splits("oc20", **opts)
    files_t = {s.split(", frame")[0] for s in train.sources}
    files_v = {s.split(", frame")[0] for s in val.sources}
    assert files_v and files_t and not files_t & files_v and len(files_t | files_v) == 5
    assert train.split_report == {"val_split": "system", "train_systems": len(files_t), "val_systems": len(files_v),
                                  "train_frames": len(train), "val_frames": len(val)}
    train_f, val_f = load_splits("oc20", val_split="frame", **opts)
    assert {s.split(", frame")[0] for s in train_f.sources} & {s.split(", frame")[0] for s in val_f.sources}
