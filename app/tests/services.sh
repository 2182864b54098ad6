#!/usr/bin/env bash
# Prepare the loopback-only PostgreSQL and Redis used by the app tests.
# Idempotent; run as root on a machine with the Debian packages
# postgresql-15 (or any version) and redis-server installed.
set -euo pipefail

PG_PORT="${XAGENT_TEST_PG_PORT:-5432}"
REDIS_PORT="${XAGENT_TEST_REDIS_PORT:-6379}"

# --- PostgreSQL ------------------------------------------------------------
cluster_line="$(pg_lsclusters --no-header | awk -v p="$PG_PORT" '$3 == p' | head -n1)"
if [ -z "$cluster_line" ]; then
    ver="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
    pg_createcluster "$ver" main --port "$PG_PORT" -- --auth-local=peer --auth-host=scram-sha-256
    cluster_line="$(pg_lsclusters --no-header | awk -v p="$PG_PORT" '$3 == p' | head -n1)"
fi
ver="$(echo "$cluster_line" | awk '{print $1}')"
name="$(echo "$cluster_line" | awk '{print $2}')"
status="$(echo "$cluster_line" | awk '{print $4}')"
if [ "$status" != "online" ]; then
    # listen on loopback only
    pg_conftool "$ver" "$name" set listen_addresses 'localhost'
    pg_ctlcluster "$ver" "$name" start
fi
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 1
done
pg_isready -h 127.0.0.1 -p "$PG_PORT"

psql_pg() { runuser -u postgres -- psql -p "$PG_PORT" -v ON_ERROR_STOP=1 -qAt "$@"; }
if [ "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname = 'xagent'")" != "1" ]; then
    psql_pg -c "CREATE ROLE xagent LOGIN PASSWORD 'xagent'"
fi
if [ "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname = 'xagent_test'")" != "1" ]; then
    psql_pg -c "CREATE DATABASE xagent_test OWNER xagent"
fi
# tests create a scratch database per session
psql_pg -c "ALTER ROLE xagent CREATEDB"

# --- Redis -------------------------------------------------------------------
if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save '' --appendonly no --protected-mode yes \
        --logfile /tmp/xagent-test-redis-"$REDIS_PORT".log
    for _ in $(seq 1 30); do
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.2
    done
fi
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
