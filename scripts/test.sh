#!/usr/bin/env bash
# Runs every baton test: unit, in-process gRPC, store suite on SQLite and PostgreSQL, the
# end-to-end tests that start the real `baton` binary, a Python client of that binary
# (tests/python), the protos' lint and breaking-change check (`buf lint`, and `buf breaking`
# against the previous commit; proto/buf.yaml) and the check of the Kubernetes manifests
# (scripts/k8s-check.sh). Installs what it needs first.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -p baton-store  # extra arguments go to `cargo nextest run` (or `cargo test`)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

baton_setup_tools
baton_setup_s3
baton_setup_proto_tools
baton_setup_postgres
baton_setup_promtool
baton_drop_test_databases

echo "test: buf lint" >&2
(cd proto && "$BATON_BUF" lint)
# the contract against the previous commit's: a client generated from it must keep working
if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null 2>&1; then
  echo "test: buf breaking against HEAD~1" >&2
  (cd proto && "$BATON_BUF" breaking --against '../.git#ref=HEAD~1,subdir=proto')
else
  echo "test: buf breaking skipped: no previous commit in this clone" >&2
fi
echo "test: cargo fmt --check" >&2
cargo fmt --all --check
echo "test: cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings

# the end-to-end tests start this binary, with the failpoints their fault tests set (FAILPOINTS)
cargo build --quiet -p baton --features failpoints
# the Kubernetes manifests, rendered and validated offline, against this binary's flags
echo "test: scripts/k8s-check.sh" >&2
scripts/k8s-check.sh
scripts/k8s-check.sh --self-test
# the alert rules: valid, and firing on the histories they are for (tests/metrics.rs checks that
# they and the dashboard name only metrics the binary exports)
echo "test: promtool check rules, test rules" >&2
promtool check rules deploy/prometheus/alerts.yaml
(cd deploy/prometheus && promtool test rules alerts.test.yaml)
# a client in another language: Python stubs generated from proto/ drive this binary
echo "test: tests/python/client_test.py" >&2
python3 tests/python/client_test.py
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
