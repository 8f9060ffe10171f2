#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the test suite (Debian's
# package, installed if missing) and print its URL. Used by .ci/run:
#   export HANLIN_TEST_POSTGRES_URL=$(scripts/start_postgres.sh)
set -euo pipefail
PORT="${HANLIN_PG_PORT:-5433}"
DATA="${HANLIN_PG_DATA:-/tmp/hanlin-pg}"
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
if ! pg_isready -q -h 127.0.0.1 -p "$PORT" 2>/dev/null; then
  rm -rf "$DATA" && mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres "$DATA"
  as_pg "$bin/initdb -D $DATA -A trust -U hanlin >/dev/null"
  as_pg "$bin/pg_ctl -D $DATA -l $DATA/log -w -o '-p $PORT -k /tmp -c listen_addresses=127.0.0.1' start >/dev/null"
fi
psql -h 127.0.0.1 -p "$PORT" -U hanlin -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'hanlin_test'" | grep -q 1 ||
  psql -h 127.0.0.1 -p "$PORT" -U hanlin -d postgres -qc "CREATE DATABASE hanlin_test" >&2
echo "postgres://hanlin@127.0.0.1:$PORT/hanlin_test"
