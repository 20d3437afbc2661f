#!/usr/bin/env bash
# One lent-GPU session (the `device` tool): install the carried wheels, then the GPU checks in order of
# importance, each capped, each logging under $OUT so a cut-off run still returns what it finished.
#   carry: .whl (pydantic, polars runtime as .tar.xz, trl, datasets, ...; see dev/README.md)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site
tar xJf .whl/polars_rt.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, transformers, trl, polars, pydantic; print(torch.__version__, transformers.__version__, trl.__version__, polars.__version__)" | tee -a "$OUT/card.txt"
step() { local name=$1 t=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log"; echo "=== $name rc=${PIPESTATUS[0]}"; }
step sampler "${SAMPLER_S:-110}" python3 -m benchmarks.sampler --device cuda --repeats 3 --old-repeats 1
step gpu_pair "${PAIR_S:-180}" python3 -m benchmarks.gpu --configs pair --steps 4 --case-timeout 90 --models /tmp/models
step gpu_qwen05 "${QWEN_S:-150}" python3 -m benchmarks.gpu --configs qwen05 --steps 4 --case-timeout 70 --models /tmp/models
