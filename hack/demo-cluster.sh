#!/usr/bin/env bash
# `make demo-cluster`: EdgeLLM as a home lab runs it, on this machine. A local cluster with a real
# node (containerd, runc, kubelet and kube-proxy in a network namespace of their own), the images
# `make images` built imported into it, the chart installed with Helm into a namespace that
# enforces the restricted Pod Security Standard, the example WorkerPool's worker pod registered as
# a peer, and the example InferenceRequest answered by it. The commands after `dev up` are the
# README's "Home lab with Helm"; tests/e2e/test_in_cluster.py runs the same. Needs root (network
# namespaces, cgroups, mounts). Everything keeps running until `make down`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE=${EDGELLM_CACHE:-$HOME/.cache/edgellm}
WORKDIR=$CACHE/dev-cluster
export KUBECONFIG=$WORKDIR/kubeconfig PATH=$CACHE/bin:$PATH

edgellm dev down --workdir "$WORKDIR" >/dev/null
edgellm dev up --real-node --workdir "$WORKDIR"

kubectl create namespace edgellm-system
kubectl label namespace edgellm-system pod-security.kubernetes.io/enforce=restricted
kubectl label namespace default pod-security.kubernetes.io/enforce=restricted
helm install edgellm charts/edgellm --namespace edgellm-system --set cluster.name=edge-1 \
  --wait --timeout 5m
kubectl create secret generic edgellm-router-api-keys --namespace edgellm-system \
  --from-literal=demo=sk-edgellm-demo

kubectl apply -f examples/workerpool.yaml
kubectl wait --for=condition=Available workerpool/tiny-random --timeout=300s
kubectl get pods,peernodes -o wide
kubectl apply -f examples/inference.yaml
kubectl wait --for=jsonpath='{.status.phase}'=Succeeded ir/hello --timeout=180s
kubectl get ir hello
echo
echo "The answer, generated in the worker pod (random weights: noise, but real tokens and timings):"
kubectl get ir hello -o jsonpath='{.status.output.text}{"\n"}'
echo
echo "The router (an OpenAI-compatible endpoint, key sk-edgellm-demo):"
echo "  KUBECONFIG=$KUBECONFIG kubectl port-forward -n edgellm-system service/edgellm-router 8080:8080"
echo "Stop everything with: make down"
