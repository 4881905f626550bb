#!/usr/bin/env python
"""Export a trained checkpoint as a self-contained AOTInductor package (compiled code + weights).

    python scripts/export.py CKPT OUT.pt2 [--dtype float32|float64] [--tp ENGINE] [--device cpu|cuda]

The package runs without this project's model code: ``PotentialCalculator.from_exported(OUT)`` in Python,
``torch::inductor::AOTIModelPackageLoader`` in C++. Inputs, outputs and metadata: ``potentials/models/export.py``.
Compile on the machine (and device) that will run it; it needs a C++17 compiler.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="output package (.pt2)")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="model dtype (default: the checkpoint's)")
    parser.add_argument("--tp", help="tensor-product engine to export with (same weights)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from potentials.calculator import model_from_checkpoint
    from potentials.errors import PotentialsError
    from potentials.models.export import export_model

    overrides = {k: v for k, v in (("dtype", args.dtype), ("tp", args.tp)) if v}
    try:
        model = model_from_checkpoint(args.checkpoint, device=args.device, **overrides)
        t0 = time.perf_counter()
        export_model(model, args.out, device=args.device)
    except PotentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s to trace, export and compile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
