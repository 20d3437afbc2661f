#!/usr/bin/env bash
# Start a Prefect worker that runs rlme flow runs as local processes.
#
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   bash infra/start-worker.sh                    # pool rlme-process (created if missing)
#   RLME_POOL=rlme-gpu bash infra/start-worker.sh # e.g. on a GPU host
#
# The worker needs this checkout with the package installed from it (pip install ., or `.[vllm]` on GPU
# hosts): prefect.yaml's entrypoints are its files (flows/train.py), found under RLME_HOME (default: this
# repository). For s3:// configs and runs, credentials in its environment (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for MinIO, AWS_DEFAULT_REGION): each flow run is a child process
# that inherits them.
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api}"
POOL="${RLME_POOL:-rlme-process}"
export RLME_HOME="${RLME_HOME:-$(cd "$(dirname "$0")/.." && pwd)}"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
exec prefect worker start --pool "$POOL" --type process ${RLME_WORKER_NAME:+--name "$RLME_WORKER_NAME"}
