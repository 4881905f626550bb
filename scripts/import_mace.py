#!/usr/bin/env python
"""Convert a mace-torch model file into a ``potentials`` checkpoint (``cg`` engine, float64). No mace-torch needed.

    python scripts/import_mace.py MODEL.model OUT.ckpt [--head NAME] [--dump DIR]

``MODEL`` is the ``.model`` file ``mace_run_train`` writes (``torch.save`` of the module; ``.model.gz`` too) or a
foundation model built the same way. Converts ``MACE`` / ``ScaleShiftMACE`` with residual interaction blocks (the
first one may be the non-residual ``RealAgnosticInteractionBlock``), Bessel radial, SiLU gate; a multi-head model
imports one head (``--head``). Other variants (ZBL, Agnesi/density blocks, ``use_so3``, ``edge_irreps``, cueq
layouts, TorchScript ``*_compiled.model``, …) are refused with a one-line message.

The checkpoint is what :func:`potentials.calculator.load_checkpoint` reads: ``PotentialCalculator``,
``scripts/relax.py``, ``scripts/evaluate.py`` and ``init_from=`` fine-tuning use it directly.
``--dump DIR`` also writes the neutral intermediate (``tensors.pt`` loadable with ``weights_only=True`` +
``meta.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402


def import_mace(model_path: str, out_path: str, head: str | None = None, dump: str | None = None) -> dict:
    """Read ``model_path`` (no mace needed), convert, write ``out_path`` atomically; returns the source info."""
    import torch

    from potentials.io import atomic_open
    from potentials.models.mace_convert import convert
    from potentials.models.mace_reader import read_mace

    tensors, meta = read_mace(model_path)
    try:
        model_cfg, stats, state, info = convert(tensors, meta, head)
    except PotentialsError as exc:
        raise PotentialsError(f"{model_path}: {exc}") from exc
    with open(model_path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    info = {"file": os.path.abspath(model_path), "sha256": sha, **info}
    ckpt = {
        "hyper_parameters": {"model_cfg": model_cfg, "stats": stats, "source": {"mace_import": info}},
        "state_dict": {"model." + k: v for k, v in state.items()},
    }
    if dump:
        os.makedirs(dump, exist_ok=True)
        with atomic_open(os.path.join(dump, "tensors.pt"), "wb") as fh:
            torch.save(tensors, fh)
        with atomic_open(os.path.join(dump, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
    with atomic_open(out_path, "wb") as fh:
        torch.save(ckpt, fh)
    return info


@cli_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="mace-torch .model file (torch.save of the module; .gz accepted)")
    ap.add_argument("out", help="output checkpoint (.ckpt)")
    ap.add_argument("--head", default=None, help="head to import from a multi-head model")
    ap.add_argument("--dump", default=None, help="also write tensors.pt + meta.json here")
    args = ap.parse_args(argv)
    info = import_mace(args.model, args.out, args.head, args.dump)
    print(f"wrote {args.out}: head {info['head']!r} of {info['mace_class']} {info['interaction_classes']}, "
          f"product-basis projection residual {info['projection_residual']:.1e}")


if __name__ == "__main__":
    main()
