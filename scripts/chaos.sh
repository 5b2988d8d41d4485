#!/usr/bin/env bash
# Chaos runs against the real, release-built `baton` binary.
#
#   scripts/chaos.sh manager [COUNT]   # a primary and a standby on a real etcd (TTL 2s): SIGKILL
#                                      # the primary COUNT times (default 50) while a client
#                                      # session sends; prints takeover times (p50/p99) and
#                                      # lost/duplicated counts, and fails if any was lost
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

area="${1:-}"
count="${2:-50}"
case "$area" in
  manager) ;;
  *) echo "usage: scripts/chaos.sh manager [COUNT]" >&2; exit 64 ;;
esac

baton_setup_tools
cargo build --release --quiet -p baton -p baton-tests --bin baton --bin baton-bench
BATON_BIN="$PWD/target/release/baton" exec target/release/baton-bench chaos-manager "$count"
