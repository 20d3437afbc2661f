#!/usr/bin/env bash
# The GPU checks of this repository on any CUDA host, in the order given by STEPS, each capped in time and
# logged under $OUT, so a run cut short still leaves what it finished. Run from the repository root with
# a CUDA torch, transformers, peft and accelerate installed (`make bench-gpu` runs one benchmark alone).
# An offline host installs the rest (pydantic, polars, trl, datasets, ...) from a local folder of wheels:
#   WHEELS=/path/to/wheels STEPS="cudatests full nosave qwen05 sampler" bash benchmarks/gpu_checks.sh
# (a polars runtime repacked as polars_rt.tar.xz in that folder is unpacked too). Results: benchmarks/RESULTS.md.
# rlme vs TRL (benchmarks/gpu.py, variants named there), 3 pairs x 8 iterations per case, in steps of under
# 10 minutes each; the minutes are estimates for one H200 (the pair's 2.9-5.1 s/iteration and qwen05's TRL
# 8.2 s/iteration measured before, ~15 s of start-up per case, the models built on the card by the first step):
#   full        pair:   rlme-full1 vs trl-save1-full (both write the full state every step)       ~6 min
#   nosave      pair:   rlme-full10-bg vs trl-nosave                                             ~4 min
#   weights     pair:   rlme-full10 and rlme-full10-bg vs trl-save1-model                        ~7 min
#   vllm        pair:   rlme-vllm-full10, trl-vllm-nosave, trl-nosave (needs vllm)              ~10 min
#   qwen05      qwen05: rlme-full10-bg vs trl-nosave                                             ~8 min
#   qwen05full  qwen05: rlme-full1 vs trl-save1-full, 2 pairs                                    ~9 min
# Each configuration prints its tables when done, each case a line on stderr as it finishes, each pair its ratios.
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
for s in ${STEPS:-full nosave}; do case $s in
  cudatests)  step cudatests 60 python3 -m pytest -q -p no:cacheprovider tests/unit/test_sampling.py tests/unit/test_checkpoint_optimizer.py tests/unit/test_checkpoint_stream.py ;;
  sampler)    step sampler 110 python3 -m benchmarks.sampler --device cuda --repeats 3 --old-repeats 1 ;;
  checkpoint) step checkpoint 60 python3 -m benchmarks.checkpoint --device cuda --hidden 1024 --intermediate 2816 --repeats 2 ;;
  full)       step gpu_full 500 $GPU --configs pair --variants rlme-full1,trl-save1-full ;;
  nosave)     step gpu_nosave 360 $GPU --configs pair --variants rlme-full10-bg,trl-nosave ;;
  weights)    step gpu_weights 560 $GPU --configs pair --variants rlme-full10,trl-save1-model,rlme-full10-bg ;;
  vllm)       step gpu_vllm 590 $GPU --configs pair --variants rlme-vllm-full10,trl-vllm-nosave,trl-nosave ;;
  qwen05)     step gpu_qwen05 590 $GPU --configs qwen05 --variants rlme-full10-bg,trl-nosave ;;
  qwen05full) step gpu_qwen05full 590 $GPU --configs qwen05 --variants rlme-full1,trl-save1-full --repeats 2 ;;
esac; done
