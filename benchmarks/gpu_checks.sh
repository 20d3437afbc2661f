#!/usr/bin/env bash
# The GPU checks of this repository on any CUDA host, in the order given by STEPS, each capped in time and
# logged under $OUT, so a run cut short still leaves what it finished. Run from the repository root with
# a CUDA torch, transformers, peft and accelerate installed (`make bench-gpu` runs one benchmark alone).
# An offline host installs the rest (pydantic, polars, trl, datasets, ...) from a local folder of wheels:
#   WHEELS=/path/to/wheels STEPS="cudatests pair checkpoint qwen05 sampler" bash benchmarks/gpu_checks.sh
# (a polars runtime repacked as polars_rt.tar.xz in that folder is unpacked too). Results: benchmarks/RESULTS.md.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site
if [ -n "${WHEELS:-}" ]; then
  [ -f "$WHEELS/polars_rt.tar.xz" ] && tar xJf "$WHEELS/polars_rt.tar.xz" -C /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, transformers, trl, polars, pydantic; print(torch.__version__, transformers.__version__, trl.__version__, polars.__version__)" | tee -a "$OUT/card.txt"
step() { local name=$1 t=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log"; echo "=== $name rc=${PIPESTATUS[0]}"; }
for s in ${STEPS:-sampler pair qwen05}; do case $s in
  cudatests)  step cudatests 60 python3 -m pytest -q -p no:cacheprovider tests/unit/test_sampling.py tests/unit/test_checkpoint_optimizer.py tests/unit/test_checkpoint_stream.py ;;
  sampler)    step sampler 110 python3 -m benchmarks.sampler --device cuda --repeats 3 --old-repeats 1 ;;
  checkpoint) step checkpoint 60 python3 -m benchmarks.checkpoint --device cuda --hidden 1024 --intermediate 2816 --repeats 2 ;;
  pair)       step gpu_pair 130 python3 -m benchmarks.gpu --configs pair --steps 4 --case-timeout 60 --models /tmp/models ;;
  qwen05)     step gpu_qwen05 160 python3 -m benchmarks.gpu --configs qwen05 --steps 4 --case-timeout 75 --models /tmp/models ;;
esac; done
