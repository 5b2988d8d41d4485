#!/usr/bin/env bash
# Runs one benchmark against the real, release-built `baton` binary and prints its figures; the
# last line is a one-line summary. BENCH_SECONDS sets how long each load runs (default 5).
#
#   scripts/bench.sh intake    # real-time upsert throughput and p50/p99, 1 and 200 records,
#                              # on SQLite and PostgreSQL
#   scripts/bench.sh sync      # events applied per second between two deployments (median of
#                              # BENCH_SYNC_RUNS, 3, drains of a BENCH_SYNC_EVENTS backlog,
#                              # 300000), on PostgreSQL beside its logical replication of the
#                              # same changes (two clusters made with pg_createcluster, dropped
#                              # after) and on SQLite; replication lag p50/p99 at a fixed write
#                              # rate (BENCH_SYNC_RATE, default 10000 events/s); the idle link's
#                              # change-log reads
#   scripts/bench.sh manager   # round trips/s relayed through a primary manager with sync
#                              # replication to its standby, p50/p99 (the median of
#                              # BENCH_MANAGER_ROUNDS, 3, rounds), beside core NATS
#                              # request/reply (nats-server on loopback) with the same clients;
#                              # and SIGTERM handover time
#   scripts/bench.sh sessions  # sessions at scale on one manager pair: churn (BENCH_SESSIONS_CHURN,
#                              # 10000, sessions opened, used and closed per round, for
#                              # BENCH_SESSIONS_ROUNDS, 20) with the journal and RSS per round;
#                              # then BENCH_SESSIONS_SCALE (100000) sessions held open: open rate,
#                              # RSS, round trips/s, and the takeover after SIGKILL of the primary
#   scripts/bench.sh batch     # records committed per second for a 1,000,000-record batch
#                              # (BENCH_BATCH_RECORDS) on SQLite and PostgreSQL, beside the raw
#                              # sqlite3 / psql insert of the same rows, and peak RSS
#   scripts/bench.sh export    # a 10,000,000-record export on SQLite (BENCH_EXPORT_RECORDS):
#                              # first portion p50/p99 over BENCH_EXPORT_REPEATS exports (50),
#                              # rows/s beside a raw sqlite3 scan of the same rows (medians of
#                              # BENCH_EXPORT_RUNS, 3, of each), one `baton export` to a
#                              # file timed, peak RSS
#   scripts/bench.sh all       # every area above in turn
#
# Every run ends with a Markdown table of its headline figures: each beside the peer measured in
# the same run, with the ratio and the target it meets or not (docs/performance.md keeps the
# latest). BENCH_MANAGER_HANDOVERS (50: the tail is the figure) sets how many SIGTERM handovers
# `manager` times.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

area="${1:-}"
case "$area" in
  intake|sync|manager|sessions|batch|export|all) ;;
  *) echo "usage: scripts/bench.sh intake|sync|manager|sessions|batch|export|all" >&2; exit 64 ;;
esac

baton_setup_tools
baton_setup_postgres
if [[ "$area" == manager || "$area" == all ]]; then baton_setup_nats; fi
# leftover test databases make PostgreSQL checkpoints (and so the figures) noisy
baton_drop_test_databases
cargo build --release --quiet -p baton -p baton-tests --bin baton --bin baton-bench
BATON_BIN="$PWD/target/release/baton" exec target/release/baton-bench "$area"
