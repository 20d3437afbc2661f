#!/usr/bin/env bash
# Start a local Prefect server (SQLite under $PREFECT_HOME; set PREFECT_API_DATABASE_CONNECTION_URL for
# Postgres, as infra/compose.yaml does).
#
#   bash infra/start-server.sh                # http://127.0.0.1:4200, UI and API (/api)
#   PREFECT_SERVER_PORT=4300 bash infra/start-server.sh
#
# Clients (deploy, worker, `prefect flow-run ls`) find it through PREFECT_API_URL=http://HOST:PORT/api.
set -euo pipefail
HOST="${PREFECT_SERVER_HOST:-127.0.0.1}"
PORT="${PREFECT_SERVER_PORT:-4200}"
# Analytics off: no phone-home, and no "database is locked" tracebacks from its background service on SQLite.
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
exec prefect server start --host "$HOST" --port "$PORT"
