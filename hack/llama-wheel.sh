#!/usr/bin/env bash
# Builds llama-cpp-python with llama.cpp's RPC backend (-DGGML_RPC=on), which splitting a model
# across peers needs (`edgellm stage`, `edgellm worker --split`). PyPI has only its sources, and
# pip's own wheel cache would hand back a build without RPC, so the wheel is built once into
# the EdgeLLM cache (about 12 minutes on 2 cores) and installed from there: into `.venv` by
# `make setup`, and into the container images by `make images`, which must run on other machines
# than this one. So the build is portable rather than tuned to this CPU (llama.cpp's default,
# -march=native): on x86-64 it targets x86-64-v3 (AVX2, FMA, F16C: Intel Haswell and AMD Zen
# onwards), the same flags as images/worker/Dockerfile; elsewhere llama.cpp's portable baseline.
#
# usage: hack/llama-wheel.sh PIP VERSION    prints the folder that holds the wheel
set -euo pipefail
PIP=$1
VERSION=$2
FLAGS="-DGGML_RPC=on -DGGML_NATIVE=OFF"
TARGET=portable
if [[ $(uname -m) == x86_64 ]]; then
  FLAGS+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  TARGET=x86-64-v3
fi
DIR=${EDGELLM_CACHE:-$HOME/.cache/edgellm}/wheels/llama-cpp-rpc-$TARGET
if ! compgen -G "$DIR/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
  echo "building llama-cpp-python $VERSION with the RPC backend for $TARGET (once; about 12 minutes on 2 cores)" >&2
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PIP" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python --progress-bar off \
    -w "$DIR" "llama-cpp-python==$VERSION" >&2
fi
echo "$DIR"
