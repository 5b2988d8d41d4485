#!/usr/bin/env bash
# Checks the Kubernetes manifests under deploy/k8s offline: renders each overlay with
# `kubectl kustomize`, validates every object against the Kubernetes schemas (PyPI
# kubernetes-validate), checks the deployment's rules (probes, security contexts, PDBs,
# NetworkPolicies, the manager's readiness), and checks every baton container's command, flags and
# BATON_* variables against the built binary. scripts/k8s_check.py has the details.
# Installs what it needs (see baton_setup_k8s_tools in setup.sh).
#
#   scripts/k8s-check.sh               # every overlay under deploy/k8s/overlays
#   scripts/k8s-check.sh DIR...        # these kustomization directories
#   scripts/k8s-check.sh --self-test   # feeds it broken manifests; fails unless each is caught
#
# BATON_BIN is the binary to check against (default target/debug/baton); KUBECTL picks a kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

baton_setup_k8s_tools
exec python3 scripts/k8s_check.py --kubectl "$BATON_KUBECTL" "$@"
