#!/usr/bin/env bash
# Runs the whole baton mesh in one process on embedded defaults (`baton dev`): SQLite under
# .baton-dev/, gRPC on 127.0.0.1:7400. Installs what the build needs first.
#
#   scripts/dev.sh                       # extra arguments go to `baton dev`, for example:
#   scripts/dev.sh --listen 127.0.0.1:0  # a free port
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

baton_setup_tools
# the first build takes a while (several minutes on two cores): cargo shows its progress
echo "dev: building baton (release)" >&2
cargo build --release -p baton
exec target/release/baton dev "$@"
