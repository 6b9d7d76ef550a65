#!/usr/bin/env bash
# Stops what hack/demo.sh started: its background processes, then the local clusters.
set -uo pipefail
CACHE=${EDGELLM_CACHE:-$HOME/.cache/edgellm}
PIDS=$CACHE/dev/demo.pids
if [[ -f $PIDS ]]; then
  while read -r pid; do kill "$pid" 2>/dev/null; done <"$PIDS"
  rm -f "$PIDS"
fi
edgellm dev down >/dev/null
