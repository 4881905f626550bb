#!/usr/bin/env bash
# One-shot GPU check for whoever has a CUDA machine for a few minutes (finishes in < 8 min on one GPU).
#
#   bash scripts/gpu_check.sh            # from the repository root, on the GPU machine
#
# Writes docs/benchmarks/gpu/: nvidia-smi.txt, tests.txt (the CUDA-marked tests), precision.{json,md}
# (fp32 / TF32 / bf16 / fp16 training), train.{json,md} (training throughput, eager vs compiled) and md.{json,md}
# (ASE-calculator inference at GPU sizes, eager vs compiled), and summary.txt with the exit code of each step.
# mace-torch is not run there (it pins e3nn 0.4 and needs its own venv; compare on the CPU with make peer-venv).
#
# Python: $PYTHON (default python3) must have torch with CUDA, e3nn 0.6, lightning. Missing pure-Python packages
# (ase, hydra-core, omegaconf, vesin, torchdata, ijson, lmdb, pymatgen, wandb) can travel as wheels in .whl/
# (download them where pip works: see the device tool's README); they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-docs/benchmarks/gpu}
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
summary="$OUT_DIR/summary.txt"
{ date -u; $PY -c "import torch, e3nn; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'e3nn', e3nn.__version__, torch.cuda.get_device_name(0))"; } > "$summary"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

step() {  # step NAME SECONDS CMD...: run with a time limit, log, record the exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s ($*)" | tee -a "$summary"
}

step tests 80 $PY -m pytest -q -m cuda tests/test_compile.py
step precision 80 $PY scripts/bench_precision.py --device cuda --steps 10 --json "$OUT_DIR/precision.json"
step train 120 $PY scripts/bench_train.py --device cuda --no-peer --datasets demo --dtypes float32 \
  --only mace/cg,facet --modes eager,compile --steps 20 --warmup 3 --json "$OUT_DIR/train.json"
step md 120 $PY scripts/bench_md.py --device cuda --no-peer --systems cu --sizes 2048,10976 --dtypes float32 \
  --only mace/cg --modes eager,compile --warmup 3 --repeat 5 --json "$OUT_DIR/md.json"
cp "$OUT_DIR/tests.log" "$OUT_DIR/tests.txt" 2>/dev/null || true
echo "gpu_check: done in $SECONDS s; see $OUT_DIR/" | tee -a "$summary"
