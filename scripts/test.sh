#!/usr/bin/env bash
# Formatting and lints, then every test: the crate's own (goldens, errors, CLI, properties),
# the end-to-end ones against a real tritonserver with the freshly built backend (faults, a
# 5-minute soak), then the fuzz targets for a bounded time. Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo fmt --check
cargo clippy --release --locked --all-targets --features fault-injection -- -D warnings
# The fault-injection library first (tests/e2e/test_faults.py), kept apart from the release
# one; the crate's tests run with the feature too, so the fault prompts' parsing is tested.
cargo build --release --locked --lib --features fault-injection
mkdir -p "$(dirname "$TRITON_LLM_FAULT_LIB")"
cp "$(dirname "$TRITON_LLM_LIB")/libtriton_llm.so" "$TRITON_LLM_FAULT_LIB"
# libnvrtc for the kernel compile tests; the GPU tests are ignored without a device. The
# kernels on CPU threads run under AddressSanitizer and UBSan (KERNELS_ON_CPU_SANITIZE):
# a read past a buffer or shared array fails the test, as memcheck would on a device.
LD_LIBRARY_PATH="$TRITON_LLM_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    TRITON_LLM_NVRTC_OTHER_LIB="$TRITON_LLM_NVRTC12_LIB" KERNELS_ON_CPU_SANITIZE=1 \
    cargo test --release --locked --features fault-injection
# The CUDA 12 build: it builds, its kernels compile with NVRTC 12.6 and assemble with its
# ptxas, and CUDA 13's NVRTC is refused (before the release build below, which leaves the
# default CUDA 13 library in target/release).
LD_LIBRARY_PATH="$TRITON_LLM_NVRTC12_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    TRITON_LLM_PTXAS="$TRITON_LLM_PTXAS12" TRITON_LLM_NVRTC_OTHER_LIB="$TRITON_LLM_NVRTC_LIB" \
    cargo test --release --locked --no-default-features --features cuda-12 --test gpu --test cuda_versions
bash scripts/build.sh --no-default-features --features cuda-12
# The library and CLI as released (no fault injection), which the other e2e tests serve;
# the same script builds them in docker/Dockerfile.
bash scripts/build.sh
# The soak (tests/e2e/test_soak.py) runs 5 minutes here; SOAK_SECONDS shortens it (SOAK_KIND
# and SOAK_STREAMS are for the GPU run, scripts/gpu/check.sh step s).
SOAK_SECONDS="${SOAK_SECONDS:-300}" "$TRITON_PYTHON" -m pytest -q tests/e2e "$@"
# Each fuzz target for FUZZ_SECONDS on its committed corpus (a crash fails the run).
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash scripts/fuzz.sh
