#!/usr/bin/env bash
# Stops what hack/demo.sh and hack/demo-cluster.sh started: the demo's background processes, then
# the local clusters (a real node's pods, network and mounts with them).
set -uo pipefail
CACHE=${EDGELLM_CACHE:-$HOME/.cache/edgellm}
PIDS=$CACHE/dev/demo.pids
if [[ -f $PIDS ]]; then
  while read -r pid; do kill "$pid" 2>/dev/null; done <"$PIDS"
  rm -f "$PIDS"
fi
edgellm dev down >/dev/null
edgellm dev down --workdir "$CACHE/dev-cluster" >/dev/null
