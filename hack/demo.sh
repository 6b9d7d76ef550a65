#!/usr/bin/env bash
# The README's first command (after `make setup tools`): EdgeLLM's main job on its embedded
# default. A federation of three local clusters, each with its operator; the generated tiny
# model served by a llama.cpp worker that joins as a peer; the example InferenceRequest
# applied, and its answer printed; then the same model asked through the OpenAI-compatible
# router with the official `openai` client. Everything keeps running until `make down`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE=${EDGELLM_CACHE:-$HOME/.cache/edgellm}
DEV=$CACHE/dev
KUBECTL=$CACHE/bin/kubectl
PIDS=$DEV/demo.pids
export KUBECONFIG=$DEV/kubeconfig

hack/demo-down.sh
edgellm dev up --clusters 3
mkdir -p "$DEV/demo"
background() { # name, command...: runs it in the background, logging to $DEV/demo/<name>.log
  local name=$1
  shift
  "$@" >"$DEV/demo/$name.log" 2>&1 &
  echo $! >>"$PIDS"
}

for cluster in edge-1 edge-2 edge-3; do
  "$KUBECTL" config view --minify --flatten --context "$cluster" >"$DEV/demo/$cluster.kubeconfig"
done
for cluster in edge-2 edge-3; do
  token=$(edgellm federation token create --kubeconfig "$DEV/demo/edge-1.kubeconfig" 2>/dev/null)
  edgellm federation join "$token" --kubeconfig "$DEV/demo/$cluster.kubeconfig"
done
for cluster in edge-1 edge-2 edge-3; do
  background "operator-$cluster" edgellm operator --cluster "$cluster" \
    --kubeconfig "$DEV/demo/$cluster.kubeconfig" --metrics-port 0
done

edgellm model tiny --out "$CACHE/models/tiny-random.gguf" >/dev/null
background worker edgellm worker --model "$CACHE/models/tiny-random.gguf" --port 8600
background peer edgellm join --kubeconfig "$DEV/demo/edge-1.kubeconfig" --name edge-1-demo-worker \
  --endpoint http://127.0.0.1:8600 --models-dir "$CACHE/models"
echo "waiting for the worker's peer to be Ready..."
"$KUBECTL" --context edge-1 wait --for=create peer/edge-1-demo-worker --timeout=120s >/dev/null
"$KUBECTL" --context edge-1 wait --for=condition=Ready peer/edge-1-demo-worker --timeout=120s

"$KUBECTL" --context edge-1 apply -f examples/inference.yaml
"$KUBECTL" --context edge-1 wait --for=jsonpath='{.status.phase}'=Succeeded ir/hello --timeout=120s
"$KUBECTL" --context edge-1 get peer,ir --namespace default
echo
echo "The answer (random weights: noise, but a real model's tokens and timings):"
"$KUBECTL" --context edge-1 get ir hello -o jsonpath='{.status.output.text}{"\n"}'

"$KUBECTL" --context edge-1 create secret generic edgellm-router-api-keys \
  --from-literal=demo=sk-edgellm-demo --dry-run=client -o yaml | "$KUBECTL" --context edge-1 apply -f - >/dev/null
background router edgellm router --kubeconfig "$DEV/demo/edge-1.kubeconfig" --cluster edge-1 --port 8080
echo
echo "The same model through the router (http://127.0.0.1:8080/v1, key sk-edgellm-demo):"
python - <<'PYTHON'
import time

import httpx
from openai import OpenAI

deadline = time.monotonic() + 60
while True:  # the router lists the federation's peers when it starts
    try:
        if "tiny-random" in httpx.get("http://127.0.0.1:8080/healthz").json()["models"]:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("the router did not come up: see ~/.cache/edgellm/dev/demo/router.log")
    time.sleep(0.5)
client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-edgellm-demo")
answer = client.chat.completions.create(
    model="tiny-random", messages=[{"role": "user", "content": "Why pool machines?"}], max_tokens=16
)
print(f"{answer.choices[0].message.content!r} ({answer.usage.completion_tokens} tokens)")
PYTHON
echo
echo "Everything keeps running (KUBECONFIG=$KUBECONFIG); stop it with: make down"
