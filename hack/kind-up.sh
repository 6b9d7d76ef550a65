#!/usr/bin/env bash
# For people who have Docker and kind: a kind cluster from kind-config.yaml with EdgeLLM's CRDs
# installed. Machines without Docker use `edgellm dev up` instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for command in kind kubectl docker; do
  command -v "$command" >/dev/null || { echo "kind-up: $command is not installed" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "kind-up: the Docker engine is not running" >&2; exit 1; }

kind create cluster --config kind-config.yaml
kubectl --context kind-edgellm apply -f crds/
kubectl --context kind-edgellm wait --for condition=Established crd/peernodes.edgellm.io \
  crd/inferencerequests.edgellm.io --timeout=60s
echo "kind cluster 'edgellm' is up: kubectl --context kind-edgellm get nodes"
