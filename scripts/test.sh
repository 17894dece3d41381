#!/usr/bin/env bash
# Every test: the crate's own (goldens, errors, CLI) and the end-to-end ones against a real
# tritonserver with the freshly built backend. Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked
cargo build --release --locked
source scripts/env.sh
"$TRITON_PYTHON" -m pytest -q tests/e2e "$@"
