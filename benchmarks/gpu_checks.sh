#!/usr/bin/env bash
# The GPU checks of this repository on any CUDA host, in the order given by STEPS, each capped in time and
# logged under $OUT, so a run cut short still leaves what it finished. Run from the repository root with
# a CUDA torch, transformers, peft and accelerate installed (`make bench-gpu` runs one benchmark alone).
# An offline host installs the rest (pydantic, polars, trl, datasets, ...) from a local folder of wheels:
#   WHEELS=/path/to/wheels STEPS="cudatests pair checkpoint qwen05 sampler" bash benchmarks/gpu_checks.sh
# (a polars runtime repacked as polars_rt.tar.xz in that folder is unpacked too). Results: benchmarks/RESULTS.md.
# rlme vs TRL (benchmarks/gpu.py), 3 pairs x 8 iterations per case; estimated on one H200 (from the 2.9-5.1
# s/iteration of the pair and 8.2 of qwen05's TRL side, ~15 s of start-up per case), each step under 10 min:
#   pair       rlme-full1 vs trl-save1-full, rlme-full10-bg vs trl-nosave (the headline)    ~9 min
#   weights    rlme-full10 vs trl-save1-model (and rlme-full10-bg vs the same) on the pair  ~5 min
#   vllm       rlme-vllm-full10, trl-vllm-nosave, trl-nosave on the pair (needs vllm)       ~7 min + engine starts
#   qwen05     rlme-full10-bg vs trl-nosave on the Qwen2.5-0.5B shape                       ~8 min
#   qwen05full rlme-full1 vs trl-save1-full on the Qwen2.5-0.5B shape                       ~10 min
# Each prints its tables when its configuration is done, each case's line on stderr as it finishes.
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
GPU="python3 -m benchmarks.gpu --repeats 3 --steps 8 --models /tmp/models"
for s in ${STEPS:-pair}; do case $s in
  cudatests)  step cudatests 60 python3 -m pytest -q -p no:cacheprovider tests/unit/test_sampling.py tests/unit/test_checkpoint_optimizer.py tests/unit/test_checkpoint_stream.py ;;
  sampler)    step sampler 110 python3 -m benchmarks.sampler --device cuda --repeats 3 --old-repeats 1 ;;
  checkpoint) step checkpoint 60 python3 -m benchmarks.checkpoint --device cuda --hidden 1024 --intermediate 2816 --repeats 2 ;;
  pair)       step gpu_pair 590 $GPU --configs pair --variants rlme-full1,trl-save1-full,rlme-full10-bg,trl-nosave ;;
  weights)    step gpu_weights 590 $GPU --configs pair --variants rlme-full10,trl-save1-model,rlme-full10-bg ;;
  vllm)       step gpu_vllm 590 $GPU --configs pair --variants rlme-vllm-full10,trl-vllm-nosave,trl-nosave ;;
  qwen05)     step gpu_qwen05 590 $GPU --configs qwen05 --variants rlme-full10-bg,trl-nosave ;;
  qwen05full) step gpu_qwen05full 590 $GPU --configs qwen05 --variants rlme-full1,trl-save1-full ;;
esac; done
