#!/usr/bin/env bash
# One lent-GPU session (the `device` tool): install the carried wheels, then the GPU checks in the order
# given by STEPS, each capped, each logging under $OUT so a cut-off run still returns what it finished.
#   carry: .whl (pydantic, the polars runtime as a .tar.xz, trl, datasets, ...; see dev/README.md)
#   STEPS="cudatests pair checkpoint qwen05 sampler" bash dev/gpu_session.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site
tar xJf .whl/polars_rt.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
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
