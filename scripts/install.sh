#!/usr/bin/env bash
# Install verm-local with everything it needs into a virtual environment (default .venv):
# torch 2.14.1 + torchvision 0.29.1 (pip takes them from this machine's disk), and
# llama-cpp-python 0.3.36 built once from its sdist (about 4-7 minutes on 2 cores) and
# kept as a wheel under the cache, so later installs take seconds. The same sdist is where
# `verm-local convert` finds llama.cpp's converter, so converter and runtime match.
# GPTQModel's CPU kernels are compiled once too, into GPTQModel's own cache.
#
# Environment: VENV (target venv), PYTHON (interpreter for a new venv),
# VERM_LOCAL_CACHE (cache dir, default ~/.cache/verm-local), CMAKE_ARGS (e.g.
# "-DGGML_CUDA=on" or "-DGGML_METAL=on").
#
# The wheel is built for this machine's CPU (llama.cpp's default GGML_NATIVE), so the cache
# is keyed by the version, CMAKE_ARGS, the CPU architecture and its instruction-set
# extensions (scripts/wheel_key.py): a cache shared between machines (a CI cache, a network
# home) never hands an AVX-512 build to a CPU without AVX-512 (SIGILL).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${VERM_LOCAL_CACHE:-$HOME/.cache/verm-local}
SDIST_DIR=$CACHE/sdist
SDIST=$SDIST_DIR/llama_cpp_python-$LLAMA_VERSION.tar.gz
FLAVOUR=$("$PYTHON" scripts/wheel_key.py --version "$LLAMA_VERSION" --cmake-args="${CMAKE_ARGS:-}")
WHEEL_DIR=$CACHE/wheels/$FLAVOUR

step() { printf '\n== %s\n' "$*" >&2; }

# A fresh install needs about 9 GB: torch's x86_64 wheels from PyPI are a CUDA build
# (5.6 GB in the venv), llama-cpp-python's build tree about 1 GB, the rest of the
# dependencies about 1 GB. Say so in one line before pip fails half-way with ENOSPC.
need_gb() {
    local dir=$1 need=$2 free
    mkdir -p "$dir"
    free=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "$free" -lt "$need" ]; then
        echo "install.sh: $free GB free under $dir, a fresh install needs about $need GB; free some space or set VENV (and VERM_LOCAL_CACHE) to a larger disk" >&2
        exit 1
    fi
}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    need_gb "$(dirname "$VENV")" 9
fi

if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

step "torch 2.14.1 + torchvision 0.29.1"
"${PIP[@]}" install -q torch==2.14.1 torchvision==0.29.1

if [ ! -f "$SDIST" ]; then
    step "fetching the llama-cpp-python $LLAMA_VERSION sdist"
    mkdir -p "$SDIST_DIR"
    "${PIP[@]}" download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -d "$SDIST_DIR"
fi

# The wheel is built from the sdist with verm-local's patches to its llama.cpp applied
# (scripts/patches/: batch-invariant CPU kernels, so one request gets one answer on every
# path); the cache key (FLAVOUR) includes their digest, so a wheel built before a patch
# changed is never taken.
WHEEL=$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHEEL" ]; then
    step "building llama-cpp-python $LLAMA_VERSION from its sdist with scripts/patches/ (CMAKE_ARGS='${CMAKE_ARGS:-}'), once"
    mkdir -p "$WHEEL_DIR"
    BUILD=$(mktemp -d "${TMPDIR:-/tmp}/verm-llama-build.XXXXXX")
    trap 'rm -rf "$BUILD"' EXIT
    tar -xzf "$SDIST" -C "$BUILD"
    SRC=$BUILD/llama_cpp_python-$LLAMA_VERSION
    for p in scripts/patches/*.patch; do
        [ -f "$p" ] || continue
        patch -p1 -s --forward -d "$SRC/vendor/llama.cpp" < "$p" || {
            echo "install.sh: $p does not apply to llama-cpp-python $LLAMA_VERSION's llama.cpp" >&2
            exit 1
        }
    done
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "${PIP[@]}" wheel --no-deps -w "$WHEEL_DIR" "$SRC"
    WHEEL=$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
fi

# Model-written code (chart code, SVG, HTML tables) renders only in a sandbox: bubblewrap
# on Linux, and Chromium for the authors' table renderer. Installed where this script may
# (root, or passwordless sudo, with apt-get); otherwise it says what is missing and
# `verm-local doctor` shows the sandbox level verm-local falls back to.
want=()
command -v bwrap >/dev/null 2>&1 || want+=(bubblewrap)
command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || want+=(chromium)
if [ "${#want[@]}" -gt 0 ] && [ "$(uname -s)" = Linux ]; then
    sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo -n)
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
        step "system packages for the render sandbox: ${want[*]}"
        "${sudo[@]}" apt-get install -y -q "${want[@]}" >/dev/null 2>&1 || {
            "${sudo[@]}" apt-get update -q >/dev/null 2>&1 &&
                "${sudo[@]}" apt-get install -y -q "${want[@]}" >/dev/null 2>&1
        } || echo "install.sh: could not install ${want[*]}; rendering falls back (verm-local doctor)" >&2
    else
        echo "install.sh: ${want[*]} not installed (needs root or sudo with apt-get): model-written code renders in a weaker sandbox (verm-local doctor says which), tables need Chromium" >&2
    fi
fi

step "verm-local and its dependencies"
# --force-reinstall: a venv that holds another build of the same version (an unpatched
# wheel) gets this one.
"${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
"${PIP[@]}" install -q -e ".[convert,gptq,onnx,bench,test,ray]"
"$VENV/bin/verm-local" version

# GPTQModel compiles its CPU kernels (torch C++ extensions) on first use, into its own
# cache (~/.cache/gptqmodel): the packer of `convert gptq` and, on AVX512-BF16 CPUs, the
# fused int4 kernel its loader compiles as it loads any GPTQ checkpoint. Built here once
# (about 75 s on 2 cores), not silently inside a user's first GPTQ judgement.
step "GPTQModel's CPU kernels for this machine (once)"
"$VENV/bin/python" -m verm_local.backends.gptq_kernels

# llama.cpp's own llama-server, the baseline `bench serve` measures verm-local's engine
# against (and its test): built once from the same sdist, unpatched, and cached by version,
# flags and CPU. VERM_LOCAL_LLAMA_SERVER=0 skips it (bench serve then builds it on first use).
if [ "${VERM_LOCAL_LLAMA_SERVER:-1}" != 0 ]; then
    step "llama.cpp's llama-server for bench serve (once; minutes on 2 cores)"
    "$VENV/bin/verm-local" -q bench llama-server --cmake-args="${CMAKE_ARGS:-}" >/dev/null
fi
