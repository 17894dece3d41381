#!/usr/bin/env bash
# Installs what building, serving and testing need on a fresh Debian machine that has the
# Rust toolchain: a C toolchain, libclang (bindgen reads triton_headers/), python3-venv, and
# a virtualenv .venv-triton with the real tritonserver 2.51 (PyPI wheel nvidia-pytriton)
# and the pinned tritonclient (its perf_analyzer too), langchain-core and the LangChain chat
# model of clients/python, genai-perf in .venv-genai-perf; cargo-fuzz for the fuzz targets.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "setup: cargo is required (install Rust with rustup)" >&2
    exit 1
fi

packages=()
command -v cc >/dev/null || packages+=(build-essential)
# tests/sampling_kernel.rs runs kernels/sampling.cu on CPU threads, built with c++.
command -v c++ >/dev/null || packages+=(g++)
dpkg -s libclang-dev >/dev/null 2>&1 || packages+=(libclang-dev)
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
command -v curl >/dev/null || packages+=(curl)
# perf_analyzer (the tritonclient wheel's, which genai-perf drives) links libb64.
dpkg -s libb64-0d >/dev/null 2>&1 || packages+=(libb64-0d)
# docker-compose validates docker/compose.yaml (tests/e2e/test_deploy.py; no engine needed).
command -v docker-compose >/dev/null || packages+=(docker-compose)
if [ ${#packages[@]} -gt 0 ]; then
    echo "setup: installing ${packages[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi

if [ ! -x .venv-triton/bin/python ]; then
    python3 -m venv .venv-triton
fi
if ! .venv-triton/bin/python -c 'import tritonclient.grpc, tritonclient.http, pytest' 2>/dev/null; then
    .venv-triton/bin/pip install -q -r scripts/requirements-triton.txt
fi
# The LangChain chat model (tests/e2e/test_langchain.py): its pinned dependencies, then the
# package itself, editable from this checkout (reinstalled if the venv has another's).
if ! .venv-triton/bin/python -c 'import langchain_core' 2>/dev/null; then
    .venv-triton/bin/pip install -q -r scripts/requirements-langchain.txt -c scripts/requirements-triton.txt
fi
if ! .venv-triton/bin/python -c 'import sys, triton_llm_langchain as m; sys.exit(not m.__file__.startswith(sys.argv[1]))' \
        "$PWD/clients/python/" 2>/dev/null; then
    .venv-triton/bin/pip install -q --no-deps -e clients/python
fi
source scripts/env.sh
if [ ! -x "$TRITONSERVER_BIN" ]; then
    .venv-triton/bin/pip install -q --no-deps nvidia-pytriton==0.7.0
fi
# NVRTC and ptxas (no GPU needed): the tests compile kernels/*.cu as the engine does and
# assemble them for sm_80 and sm_90, so a kernel that does not build fails here, not on a GPU.
if [ ! -x "$TRITON_LLM_PTXAS" ] || [ ! -d "$TRITON_LLM_NVRTC_LIB" ]; then
    .venv-triton/bin/pip install -q --no-deps nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88
fi
# The same of CUDA 12.6 (Triton 24.10's) for the `cuda-12` build.
if [ ! -x "$TRITON_LLM_PTXAS12" ] || [ ! -d "$TRITON_LLM_NVRTC12_LIB" ]; then
    .venv-triton/bin/pip install -q --no-deps nvidia-cuda-nvrtc-cu12==12.6.77 nvidia-cuda-nvcc-cu12==12.6.77
fi
# perf_analyzer links CUDA 12's runtime library (loaded, not used: no GPU needed).
if [ ! -e "$PERF_ANALYZER_LIB/libcudart.so.12" ]; then
    .venv-triton/bin/pip install -q --no-deps nvidia-cuda-runtime-cu12==12.6.77
fi
# genai-perf in a virtualenv of its own (its pins clash with the test client's).
if [ ! -x "$GENAI_PERF_BIN" ]; then
    python3 -m venv .venv-genai-perf
    .venv-genai-perf/bin/pip install -q -r scripts/requirements-genai-perf.txt
fi
# cargo-fuzz runs the fuzz targets (scripts/fuzz.sh).
command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz --locked
echo "setup: ready ($TRITONSERVER_BIN)" >&2
