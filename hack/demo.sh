#!/usr/bin/env bash
# The README's first command (after `make setup tools`): a local federation of three clusters,
# EdgeLLM's CRDs installed, and the example InferenceRequest applied and shown.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE=${EDGELLM_CACHE:-$HOME/.cache/edgellm}
KUBECTL=$CACHE/bin/kubectl
export KUBECONFIG=$CACHE/dev/kubeconfig

edgellm dev down >/dev/null
edgellm dev up --clusters "${CLUSTERS:-3}"
"$KUBECTL" apply -f examples/peernode.yaml -f examples/inference.yaml
"$KUBECTL" get peer,ir --namespace default
echo
echo "The federation keeps running. Try: KUBECONFIG=$KUBECONFIG $KUBECTL get nodes"
echo "Stop it with: make down"
