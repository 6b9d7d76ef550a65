#!/usr/bin/env bash
# Builds llama-cpp-python with llama.cpp's RPC backend (-DGGML_RPC=on), which splitting a model
# across peers needs (`edgellm stage`, `edgellm worker --split`). PyPI has only its sources, and
# pip's own wheel cache would hand back a build without RPC, so the wheel is built once into
# the EdgeLLM cache (about 5 minutes on 2 cores) and installed from there.
#
# usage: hack/llama-wheel.sh PIP VERSION    prints the folder that holds the wheel
set -euo pipefail
PIP=$1
VERSION=$2
DIR=${EDGELLM_CACHE:-$HOME/.cache/edgellm}/wheels/llama-cpp-rpc
if ! compgen -G "$DIR/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
  echo "building llama-cpp-python $VERSION with the RPC backend (once; about 5 minutes on 2 cores)" >&2
  CMAKE_ARGS="-DGGML_RPC=on" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PIP" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python --progress-bar off \
    -w "$DIR" "llama-cpp-python==$VERSION" >&2
fi
echo "$DIR"
