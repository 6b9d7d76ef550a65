#!/usr/bin/env bash
# Provides the pinned tool binaries EdgeLLM's local clusters, tests and charts need, in a cache
# outside the repository: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# KWOK, Helm, Kubo (the `ipfs` daemon), and Prometheus' `promtool` and `prometheus` (the metrics
# tests lint every /metrics page with promtool and query the dashboards' expressions through a real
# server); for a real node (`edgellm dev up --real-node`): containerd with its runc shim and `ctr`,
# runc, kubelet, kube-proxy, crictl and the sandbox (`pause`) binary of hack/pause. The node's CNI
# plugins are Debian's (hack/host-packages.sh).
#
# Each tool is downloaded as an official release where that works (EDGELLM_TOOLS_SOURCE=auto, the
# default) and otherwise built from the Go module proxy: Helm and KWOK with `go install`, the
# others through the wrapper modules in hack/tools/ (their go.mod pins the versions; their go.sum
# is committed so every build is verified). Binaries carry their real version (ldflags), since
# kube-apiserver reads it. A tool whose cached version matches is skipped, so a second
# run takes seconds.
#
# First-run cost of promtool and prometheus: the release archive (about 120 MB, both binaries)
# downloads in seconds; without GitHub, `go install` from the module proxy fetches their modules
# and compiles in about 7 minutes on two shared cores (promtool), then 80 s more (prometheus,
# sharing the module and build caches). Built so, the server lacks its web UI's assets: the tests
# use its HTTP API only.
#
# usage: hack/tools.sh [TOOL...]         (default: every tool)
#   EDGELLM_CACHE         cache root (default ~/.cache/edgellm); binaries land in $EDGELLM_CACHE/bin
#   EDGELLM_TOOLS_SOURCE  auto | download | build
set -euo pipefail

KWOK_VERSION=v0.8.0
HELM_VERSION=v3.21.4
PROMETHEUS_VERSION=v3.16.0  # the Go module's tag is v0.316.0: see prometheus_module_version
CONTAINERD_VERSION=v2.4.2
# Debian's runc 1.1.5 fails under containerd 2.4 ("can't get final child's PID from pipe").
RUNC_VERSION=v1.4.4
CRICTL_VERSION=v1.37.0  # cri-tools publishes no v1.36 module; crictl speaks CRI v1 to any kubelet

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${EDGELLM_CACHE:-$HOME/.cache/edgellm}
BIN=$CACHE/bin
LOGS=$CACHE/logs/tools
SOURCE=${EDGELLM_TOOLS_SOURCE:-auto}
ARCH=$(go env GOARCH 2>/dev/null || echo amd64)
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
mkdir -p "$BIN" "$LOGS"

ALL_TOOLS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kwok-stages.yaml helm ipfs promtool prometheus
  containerd containerd-shim-runc-v2 ctr runc kubelet kube-proxy crictl pause)
# KWOK's upstream stages (node-initialize, lease heartbeats, pod-fast): how fake nodes and pods
# change state. kwokctl embeds them; the kwok binary needs them as configuration.
KWOK_STAGES=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
  pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)

wrapper_version() { # module directory, module path -> pinned version
  (cd "$HACK_DIR/tools/$1" && go list -m -f '{{.Version}}' "$2")
}

version_of() {
  case $1 in
    etcd) wrapper_version etcd go.etcd.io/etcd/server/v3 ;;
    kube-*|kubectl|kubelet) wrapper_version kubernetes k8s.io/kubernetes ;;
    kwok|kwok-stages.yaml) echo "$KWOK_VERSION" ;;
    helm) echo "$HELM_VERSION" ;;
    ipfs) wrapper_version kubo github.com/ipfs/kubo ;;
    promtool|prometheus) echo "$PROMETHEUS_VERSION" ;;
    containerd|containerd-shim-runc-v2|ctr) echo "$CONTAINERD_VERSION" ;;
    runc) echo "$RUNC_VERSION" ;;
    crictl) echo "$CRICTL_VERSION" ;;
    pause) echo "src-$(sha256sum "$HACK_DIR/pause/main.go" | cut -c1-12)" ;;
    *) echo "unknown tool '$1' (known: ${ALL_TOOLS[*]})" >&2; return 1 ;;
  esac
}

k8s_ldflags() {
  local v=$1 minor
  minor=$(echo "$v" | cut -d. -f2)
  local flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

# Official release locations: the binary itself, or an archive and the member to take from it.
release_url() {
  local tool=$1 v=$2
  case $tool in
    kube-*|kubectl|kubelet) echo "https://dl.k8s.io/release/$v/bin/linux/$ARCH/$tool" ;;
    etcd) echo "https://github.com/etcd-io/etcd/releases/download/$v/etcd-$v-linux-$ARCH.tar.gz etcd-$v-linux-$ARCH/etcd" ;;
    kwok) echo "https://github.com/kubernetes-sigs/kwok/releases/download/$v/kwok-linux-$ARCH" ;;
    helm) echo "https://get.helm.sh/helm-$v-linux-$ARCH.tar.gz linux-$ARCH/helm" ;;
    ipfs) echo "https://dist.ipfs.tech/kubo/$v/kubo_${v}_linux-$ARCH.tar.gz kubo/ipfs" ;;
    promtool|prometheus)
      local dir="prometheus-${v#v}.linux-$ARCH"
      echo "https://github.com/prometheus/prometheus/releases/download/$v/$dir.tar.gz $dir/$tool" ;;
    containerd|containerd-shim-runc-v2|ctr)
      echo "https://github.com/containerd/containerd/releases/download/$v/containerd-${v#v}-linux-$ARCH.tar.gz bin/$tool" ;;
    runc) echo "https://github.com/opencontainers/runc/releases/download/$v/runc.$ARCH" ;;
    crictl) echo "https://github.com/kubernetes-sigs/cri-tools/releases/download/$v/crictl-$v-linux-$ARCH.tar.gz crictl" ;;
  esac
}

download() ( # tool version out log; a subshell, so that its EXIT trap cleans up
  tool=$1 v=$2 out=$3 log=$4
  read -r url member <<<"$(release_url "$tool" "$v")"
  [[ -n $url ]] || return 1
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  curl -fsSL --connect-timeout 5 -o "$tmp/dl" "$url" >>"$log" 2>&1 || return 1
  if [[ $tool == kube-* || $tool == kubectl || $tool == kubelet ]]; then  # the only releases with a per-file checksum
    curl -fsSL --connect-timeout 5 -o "$tmp/dl.sha256" "$url.sha256" >>"$log" 2>&1 || return 1
    echo "$(cat "$tmp/dl.sha256")  $tmp/dl" | sha256sum -c - >>"$log" 2>&1 || return 1
  fi
  if [[ -n $member ]]; then
    tar -xzf "$tmp/dl" -C "$tmp" "$member" >>"$log" 2>&1 || return 1
    mv "$tmp/$member" "$out"
  else
    mv "$tmp/dl" "$out"
  fi
  chmod +x "$out"
)

go_install() { # package@version, version variable=value, out, [build flag]: a plain `go install`, moved to out
  local gobin
  gobin=$(mktemp -d)
  GOBIN=$gobin GOFLAGS= go install -trimpath ${4:+"$4"} -ldflags "-s -w -X $2" "$1" &&
    mv "$gobin"/* "$3" && rmdir "$gobin"
}

prometheus_module_version() { # v3.16.0 -> v0.316.0, the tag of the release's Go module
  local major minor patch
  IFS=. read -r major minor patch <<<"${1#v}"
  printf 'v0.%d%02d.%s\n' "$major" "$minor" "$patch"
}

build() { # tool version out log
  local tool=$1 v=$2 out=$3 log=$4
  case $tool in
    kube-*|kubectl|kubelet)
      (cd "$HACK_DIR/tools/kubernetes" &&
        go build -trimpath -ldflags "$(k8s_ldflags "$v")" -o "$out" "k8s.io/kubernetes/cmd/$tool") ;;
    etcd)
      (cd "$HACK_DIR/tools/etcd" &&
        go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=release-$v" \
          -o "$out" go.etcd.io/etcd/server/v3) ;;
    ipfs)
      (cd "$HACK_DIR/tools/kubo" && go build -trimpath -ldflags "-s -w" -o "$out" github.com/ipfs/kubo/cmd/ipfs) ;;
    kwok)
      go_install "sigs.k8s.io/kwok/cmd/kwok@$v" "sigs.k8s.io/kwok/pkg/consts.Version=${v#v}" "$out" ;;
    kwok-stages.yaml)
      local dir
      dir=$(GOFLAGS= go mod download -json "sigs.k8s.io/kwok@$v" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
      for stage in "${KWOK_STAGES[@]}"; do
        echo "---"
        cat "$dir/kustomize/stage/$stage"
      done >"$out" ;;
    helm)
      go_install "helm.sh/helm/v3/cmd/helm@$v" "helm.sh/helm/v3/internal/version.version=$v" "$out" ;;
    promtool|prometheus)
      go_install "github.com/prometheus/prometheus/cmd/$tool@$(prometheus_module_version "$v")" \
        "github.com/prometheus/common/version.Version=${v#v}" "$out" ;;
    containerd|containerd-shim-runc-v2|ctr)
      go_install "github.com/containerd/containerd/v2/cmd/$tool@$v" \
        "github.com/containerd/containerd/v2/version.Version=$v" "$out" ;;
    runc)  # seccomp filters (the RuntimeDefault profile) need libseccomp through cgo
      CGO_ENABLED=1 go_install "github.com/opencontainers/runc@$v" "main.version=${v#v}" "$out" -tags=seccomp ;;
    crictl)
      go_install "sigs.k8s.io/cri-tools/cmd/crictl@$v" "sigs.k8s.io/cri-tools/pkg/version.Version=$v" "$out" ;;
    pause)  # static: the sandbox image holds nothing else
      (cd "$HACK_DIR/pause" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out" .) ;;
  esac >>"$log" 2>&1
}

provide() { # step total tool
  local step=$1 total=$2 tool=$3 v out log start how
  v=$(version_of "$tool")
  out=$BIN/$tool
  log=$LOGS/$tool.log
  if [[ -f $out && $(cat "$BIN/.$tool.version" 2>/dev/null) == "$v" ]]; then
    echo "[$step/$total] $tool $v: cached"
    return 0
  fi
  start=$SECONDS
  : >"$log"
  rm -f "$BIN/.$tool.version"
  if [[ $SOURCE != build ]] && echo "$tool $v: downloading the official release" >>"$log" &&
      download "$tool" "$v" "$out.tmp" "$log"; then
    how=downloaded
  elif [[ $SOURCE == download ]]; then
    echo "[$step/$total] $tool $v: FAILED to download; log: $log" >&2
    tail -n 20 "$log" >&2
    return 1
  else
    echo "[$step/$total] $tool $v: building from the Go module proxy (log: $log)"
    echo "$tool $v: building" >>"$log"
    if ! build "$tool" "$v" "$out.tmp" "$log"; then
      echo "[$step/$total] $tool $v: FAILED to build; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    how=built
  fi
  mv "$out.tmp" "$out"
  echo "$v" >"$BIN/.$tool.version"
  echo "[$step/$total] $tool $v: $how in $((SECONDS - start))s"
}

tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=("${ALL_TOOLS[@]}")
for i in "${!tools[@]}"; do
  provide "$((i + 1))" "${#tools[@]}" "${tools[$i]}"
done
echo "tools are in $BIN"
