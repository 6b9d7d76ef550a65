#!/usr/bin/env bash
# Builds EdgeLLM's CPU images (operator, router, worker) from images/Dockerfile with podman, no
# Docker engine needed, named as the chart expects them (ghcr.io/edgellm/<component>:<version>),
# and saves each as an OCI archive in $EDGELLM_CACHE/images/ for a node's containerd to import
# (`edgellm dev up --real-node` does; on k3s: `k3s ctr images import <archive>`). With them, the
# sandbox image of a local real node (localhost/edgellm/pause:1, hack/pause, built by
# hack/tools.sh), as registry.k8s.io cannot be reached from everywhere.
#
# - Base: PYTHON_IMAGE (default: the Dockerfile's python:3.11.16-slim-bookworm) if podman has it
#   or can pull it; otherwise a base of the same Debian release and Python minor built from
#   Debian's packages with mmdebstrap (about a minute, once).
# - llama.cpp is not compiled again: the wheel `make setup` built (hack/llama-wheel.sh) is mounted
#   into the build. So is this machine's CA bundle, for downloads behind a TLS-inspecting proxy;
#   neither ends up in an image.
# - An image whose inputs (Dockerfile, pyproject.toml, README.md, src/, the wheel, the base) have
#   not changed since its archive was saved is not built again.
#
# usage: hack/images.sh PIP [COMPONENT...]    (PIP: the venv's pip, for the wheel; default: all)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PIP=$1
shift
COMPONENTS=("$@")
[[ ${#COMPONENTS[@]} -gt 0 ]] || COMPONENTS=(operator router worker)
CACHE=${EDGELLM_CACHE:-$HOME/.cache/edgellm}
OUT=$CACHE/images
LOGS=$CACHE/logs/images
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
LLAMA_CPP_PYTHON=$(sed -n 's/^LLAMA_CPP_PYTHON ?= //p' Makefile)
DEFAULT_BASE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' images/Dockerfile)
PYTHON_IMAGE=${PYTHON_IMAGE:-$DEFAULT_BASE}
LOCAL_BASE=localhost/edgellm/python:3.11-bookworm
CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$OUT" "$LOGS"

# podman's default rlimits (nofile and nproc at 1M) exceed what this kernel lets an unprivileged
# sandbox set; ask for what this shell may have.
ULIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=32768:32768")

base_image() { # the base to build on: the pinned one where it can be had, else a local one
  if podman image exists "$PYTHON_IMAGE" ||
      timeout 60 podman pull --quiet "$PYTHON_IMAGE" >>"$LOGS/base.log" 2>&1; then
    echo "$PYTHON_IMAGE"
    return
  fi
  if ! podman image exists "$LOCAL_BASE"; then
    echo "base: $PYTHON_IMAGE cannot be pulled; building $LOCAL_BASE from Debian's packages" >&2
    local rootfs start=$SECONDS
    rootfs=$(mktemp --suffix=.tar)
    # Debian 12's Python is 3.11, as in python:3.11-slim-bookworm; docs and locales left out.
    mmdebstrap --variant=minbase \
      --include=python3,python3-venv,python-is-python3,ca-certificates \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
      bookworm "$rootfs" http://deb.debian.org/debian >>"$LOGS/base.log" 2>&1 ||
      { echo "base: mmdebstrap failed; see $LOGS/base.log" >&2; rm -f "$rootfs"; return 1; }
    podman import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
      "$rootfs" "$LOCAL_BASE" >>"$LOGS/base.log"
    rm -f "$rootfs"
    echo "base: $LOCAL_BASE built in $((SECONDS - start))s" >&2
  fi
  echo "$LOCAL_BASE"
}

inputs_hash() { # what an image is made of: a change to any of these builds it again
  local base=$1 wheel=$2
  {
    sha256sum images/Dockerfile pyproject.toml README.md
    find src -name '*.py' -o -name '*.typed' | sort | xargs sha256sum
    basename "$wheel"
    podman image inspect --format '{{.Id}}' "$base"
  } | sha256sum | cut -c1-16
}

WHEELS=$(hack/llama-wheel.sh "$PIP" "$LLAMA_CPP_PYTHON")
WHEEL=$(compgen -G "$WHEELS/llama_cpp_python-$LLAMA_CPP_PYTHON-*.whl" | head -n1)
BASE=$(base_image)
HASH=$(inputs_hash "$BASE" "$WHEEL")

# The build context: only what the builder copies (a repository's .venv would be gigabytes).
CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
cp -r pyproject.toml README.md src "$CONTEXT/"
find "$CONTEXT" -name __pycache__ -prune -exec rm -r {} +

for component in "${COMPONENTS[@]}"; do
  image=ghcr.io/edgellm/$component:$VERSION
  archive=$OUT/$component.oci.tar
  if [[ -f $archive && $(cat "$archive.inputs" 2>/dev/null) == "$HASH" ]]; then
    podman image exists "$image" || podman load --quiet --input "$archive" >/dev/null
    echo "$image: cached ($archive)"
    continue
  fi
  start=$SECONDS
  echo "$image: building (log: $LOGS/$component.log)"
  if ! podman build --quiet --network host "${ULIMITS[@]}" \
      --file images/Dockerfile --target "$component" \
      --build-arg "PYTHON_IMAGE=$BASE" --build-arg "LLAMA_CPP_PYTHON=$LLAMA_CPP_PYTHON" \
      --build-arg "VERSION=$VERSION" \
      --volume "$WHEELS:/wheels:ro" \
      --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
      --tag "$image" "$CONTEXT" >"$LOGS/$component.log" 2>&1; then
    echo "$image: FAILED; last lines of $LOGS/$component.log:" >&2
    tail -n 20 "$LOGS/$component.log" >&2
    exit 1
  fi
  rm -f "$archive" "$archive.inputs"
  podman save --quiet --format oci-archive --output "$archive" "$image"
  echo "$HASH" >"$archive.inputs"
  echo "$image: built in $((SECONDS - start))s"
done
# The sandbox image: hack/pause's static binary alone.
PAUSE=$CACHE/bin/pause
PAUSE_HASH=$(sha256sum "$PAUSE" | cut -c1-16)
if [[ $(cat "$OUT/pause.oci.tar.inputs" 2>/dev/null) != "$PAUSE_HASH" ]]; then
  mkdir "$CONTEXT/pause"
  cp "$PAUSE" "$CONTEXT/pause/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' \
    >"$CONTEXT/pause/Containerfile"
  podman build --quiet "${ULIMITS[@]}" --tag localhost/edgellm/pause:1 "$CONTEXT/pause" \
    >"$LOGS/pause.log" 2>&1 || { echo "pause: FAILED; see $LOGS/pause.log" >&2; exit 1; }
  rm -f "$OUT/pause.oci.tar"
  podman save --quiet --format oci-archive --output "$OUT/pause.oci.tar" localhost/edgellm/pause:1
  echo "$PAUSE_HASH" >"$OUT/pause.oci.tar.inputs"
fi
echo "localhost/edgellm/pause:1: $OUT/pause.oci.tar"

for component in "${COMPONENTS[@]}"; do
  image=ghcr.io/edgellm/$component:$VERSION
  size=$(podman image inspect --format '{{.Size}}' "$image")
  echo "$image: $((size / 1000000)) MB ($OUT/$component.oci.tar)"
done
