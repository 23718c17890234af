#!/usr/bin/env bash
# Builds llama-cpp-python's wheel once per (version, CMake flags) and prints its path.
#
# The one place that says how llama.cpp is compiled: the Makefile (make serve, make test), deploy/Dockerfile and
# tests/deploy use it. The wheel lands in a wheelhouse whose folder name carries a hash of the version and the
# flags, so a wheel built with other flags is never reused: pip's own wheel cache keys on the source alone, and
# is bypassed here (--no-cache-dir) so that an earlier build with other flags cannot be picked from it.
#
# Default flags: llama.cpp's portable x86-64 baseline (GGML_NATIVE=OFF: SSE4.2, AVX, AVX2, FMA, F16C, BMI2; no
# AVX-512, no AMX), so the wheel runs on any x86-64 CPU from 2013 on, whatever CPU built it. docs/portability.md
# says why, with the measurements. For one known fleet, set LLAMA_CMAKE_ARGS (README: "CPUs").
#
# Environment: LLAMA_CMAKE_ARGS, PYTHON (default python3), CACHECADE_WHEELHOUSE (default
# ~/.cache/cachecade/wheels), CMAKE_BUILD_PARALLEL_LEVEL.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
DEFAULT_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF"
args=${LLAMA_CMAKE_ARGS:-$DEFAULT_ARGS}
python=${PYTHON:-python3}
# The version pinned in pyproject.toml (one source of truth).
version=$(sed -n 's/.*"llama-cpp-python\[server\]==\([0-9][0-9.]*\)".*/\1/p' "$here/../pyproject.toml")
[ -n "$version" ] || { echo "llama_wheel.sh: no llama-cpp-python pin in pyproject.toml" >&2; exit 2; }
key=$(printf '%s\n%s\n' "$version" "$args" | sha256sum | cut -c1-16)
house=${CACHECADE_WHEELHOUSE:-$HOME/.cache/cachecade/wheels}
dir="$house/llama-cpp-python-$version-$key"

if ! compgen -G "$dir/llama_cpp_python-$version-*.whl" >/dev/null; then
    mkdir -p "$house"
    tmp=$(mktemp -d "$dir.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "llama_wheel.sh: compiling llama-cpp-python $version with: $args (a few minutes, once per flag set)" >&2
    # The source archive is checked against requirements/llama.txt's hash (the lock, deploy/lock.py) when it has one.
    sed -n '/^llama-cpp-python==/{N;s/\\\n//;p}' "$here/../requirements/llama.txt" 2>/dev/null >"$tmp/lock.txt" || true
    if grep -q "==$version .*--hash=" "$tmp/lock.txt"; then
        source=(--require-hashes -r "$tmp/lock.txt")
    else
        source=("llama-cpp-python==$version")
    fi
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
        "$python" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$tmp" "${source[@]}" >&2
    rm -f "$tmp/lock.txt"
    printf '%s\n' "$args" >"$tmp/cmake-args"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    trap - EXIT
fi
compgen -G "$dir/llama_cpp_python-$version-*.whl" | head -n 1
