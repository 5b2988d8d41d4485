#!/usr/bin/env bash
# The seeded fault campaign against the session manager, over real processes and the real,
# release-built `baton` binary (with its journal failpoints): a real etcd, two managers each
# reaching it through a fault proxy, a client session process and server session processes. The
# faults: SIGKILL of the primary or the standby, the double failure, SIGSTOP of the primary past
# its lease, etcd stalled or restarted, the primary cut, blackholed or slowed on its way to etcd,
# a journal write error, slow fsyncs, server session kills. Afterwards the recorded history is
# checked (every acknowledged request answered exactly once, terms never going back, one
# acknowledger per term, restart data never stale).
#
#   scripts/chaos.sh manager [--faults N] [--seed S] [--ttl SECONDS] [--managers M]
#                            [--sessions K] [--servers K] [--kinds kill-primary,double-failure,…]
#
# Prints one line per fault, one per kind (count, takeover or recovery p50/p99/max), then
#   chaos: faults=N kinds=K acked=A lost=L duplicated=D takeover_p99=Xms seed=S
# The seed is printed when not given; the same seed replays the same schedule. Exits 1 on any
# loss, duplicate or violation. `--ttl 1` starts etcd with a 10 ms heartbeat and a 100 ms
# election timeout (its minimum lease TTL is then 1 s).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

area="${1:-}"
case "$area" in
  manager) shift ;;
  *) echo "usage: scripts/chaos.sh manager [--faults N] [--seed S] [--ttl SECONDS] [--kinds K,…]" >&2; exit 64 ;;
esac

baton_setup_tools
cargo build --release --quiet -p baton --features failpoints
cargo build --release --quiet -p baton-tests --bin baton-bench
BATON_BIN="$PWD/target/release/baton" exec target/release/baton-bench chaos-manager "$@"
