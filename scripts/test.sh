#!/usr/bin/env bash
# Every test: the crate's own (goldens, errors, CLI) and the end-to-end ones against a real
# tritonserver with the freshly built backend. Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# libnvrtc for the kernel compile tests; the GPU tests themselves skip without a driver.
LD_LIBRARY_PATH="$TRITON_LLM_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --release --locked
cargo build --release --locked
"$TRITON_PYTHON" -m pytest -q tests/e2e "$@"
