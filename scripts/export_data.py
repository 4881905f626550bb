#!/usr/bin/env python
"""Export exactly the frames training sees as extxyz (after unit/sign conversion, referencing and filters).

    python scripts/export_data.py data=oc20 data.root=PATH out=oc20_train.extxyz
    python scripts/export_data.py data=mptrj data.root=PATH data.energy=corrected out=mp.extxyz split=all

Arguments are Hydra overrides of ``configs/train.yaml`` (the same ones ``scripts/train.py`` takes: ``data=``,
``data.*``, ``model.r_max=``, ``seed=``), plus ``out=FILE.extxyz`` (required) and ``split=train|val|all``
(default ``train``: the training split after the validation split is taken out).

Per frame: ``energy`` (eV), ``forces`` (eV/Å), ``stress`` (eV/Å³, ASE sign, Voigt) where training has them,
fixed atoms as an ASE ``FixAtoms`` constraint, ``tags``, and ``info``: ``source_file``, ``source_index``,
``split`` (and ``label``/``system`` when the format records them).
"""

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402

SPLITS = ("train", "val", "all")


def parse_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """(out, split, the remaining Hydra overrides)."""
    out, split, rest = None, "train", []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise PotentialsError(f"argument {arg!r} is not a KEY=VALUE override (see --help)")
        if key == "out":
            out = value
        elif key == "split":
            split = value
        else:
            rest.append(arg)
    if not out:
        raise PotentialsError("no output file: give out=FILE.extxyz")
    if split not in SPLITS:
        raise PotentialsError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return out, split, rest


def export(argv: list[str]) -> dict[str, int]:
    """Compose the config, load the data as training does, write the extxyz; returns frames per split."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from potentials.data.export import write_extxyz
    from potentials.train.run import build_datamodule

    out, split, overrides = parse_args(argv)
    try:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except HydraException as exc:
        detail = " ".join(str(exc).split("Config search path")[0].split())  # Hydra's message spans lines
        raise PotentialsError(f"bad override: {detail}") from None
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = build_datamodule(data_cfg, float(cfg.model.r_max), int(cfg.seed))
    dm.load()
    parts = {"train": dm.train_set, "val": dm.val_set}
    if split != "all":
        parts = {split: parts[split]}
    counts = write_extxyz(parts, out)
    print(f"wrote {out}: " + ", ".join(f"{n} {name} frames" for name, n in counts.items())
          + f" (data={cfg.data.name}, r_max={cfg.model.r_max}, seed={cfg.seed})")
    return counts


@cli_errors
def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("potentials").setLevel(logging.INFO)
    export(sys.argv[1:])


if __name__ == "__main__":
    main()
