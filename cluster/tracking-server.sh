#!/usr/bin/env bash
# The tracking server a team's runs log to (`make tracking-server`): `mlflow server` with a PostgreSQL
# backend store and proxied artifacts (--serve-artifacts: runs upload and download through the server,
# so workers on other nodes need no shared disk). It runs in the foreground until stopped.
#
#   TRACKING_DB         postgresql://USER:PASSWORD@HOST:PORT/DB of an existing database; unset: Debian's
#                       local PostgreSQL cluster is started (as root, or with sudo) and given a role and
#                       a database named distswitch
#   TRACKING_HOST/PORT  where the server listens (127.0.0.1:5001; the head's private address for a
#                       cluster's nodes, cluster/README.md)
#   TRACKING_ARTIFACTS  where the server keeps artifacts (./mlflow-server-artifacts)
#   MLFLOW              the mlflow command (uv run --locked mlflow)
set -euo pipefail
host=${TRACKING_HOST:-127.0.0.1}
port=${TRACKING_PORT:-5001}
artifacts=${TRACKING_ARTIFACTS:-$PWD/mlflow-server-artifacts}
db=${TRACKING_DB:-}

as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

if [ -z "$db" ]; then
    read -r version cluster pg_port status _ < <(pg_lsclusters --no-header 2>/dev/null | head -1) || {
        echo "tracking-server: no PostgreSQL cluster here; run \`make setup\` (it installs postgresql) or set TRACKING_DB" >&2
        exit 2
    }
    [ "$status" = online ] || pg_ctlcluster "$version" "$cluster" start
    as_postgres psql -p "$pg_port" -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'distswitch'" | grep -q 1 ||
        as_postgres psql -p "$pg_port" -qc "CREATE ROLE distswitch LOGIN PASSWORD 'distswitch'"
    as_postgres psql -p "$pg_port" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'distswitch'" | grep -q 1 ||
        as_postgres createdb -p "$pg_port" -O distswitch distswitch
    db="postgresql://distswitch:distswitch@127.0.0.1:$pg_port/distswitch"
fi
mkdir -p "$artifacts"
echo "tracking-server: http://$host:$port (store ${db%%://*}://…${db##*@}, artifacts $artifacts)" >&2
# One server worker: MLflow's default 4 take a minute to start on 2 cores. Hosts beyond loopback must
# be allowed by name (MLflow's DNS-rebinding guard) when the server listens for a cluster's nodes.
exec ${MLFLOW:-uv run --locked mlflow} server --backend-store-uri "$db" --serve-artifacts \
    --artifacts-destination "$artifacts" --host "$host" --port "$port" --workers 1 \
    ${TRACKING_ALLOWED_HOSTS:+--allowed-hosts "$TRACKING_ALLOWED_HOSTS"}
