#!/usr/bin/env python
"""Train a potential from the Hydra configs in ``configs/``.

    python scripts/train.py                                   # demo data, MACE (cg), CPU
    python scripts/train.py trainer.max_epochs=5 model.channels=32
    python scripts/train.py data=files data.train_files=[my.xyz] run_name=mine
    python scripts/train.py hydra.run.dir=runs/x               # rerun the same command to resume

Writes ``<run dir>/checkpoints/{last,best}.ckpt``, ``metrics.csv`` and ``parity.png``.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import PotentialsError  # noqa: E402


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from potentials.train.run import train

    logging.getLogger("potentials").setLevel(logging.INFO)
    try:
        result = train(cfg, HydraConfig.get().runtime.output_dir)
    except PotentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"checkpoint: {result['last']}")
    if result.get("metrics"):
        print(f"metrics:    {result['metrics']}")
    if result.get("parity"):
        print(f"parity:     {result['parity']}")
        e = result["val_errors"]
        print("validation RMSE: " + ", ".join(
            f"{k.replace('_rmse', '')} {v:.2f}" for k, v in e.items() if k.endswith("_rmse")
        ) + "  (meV/atom, meV/Å, meV/Å³)")


if __name__ == "__main__":
    main()
