#!/usr/bin/env bash
# Builds the backend as released: target/release/libtriton_llm.so and the triton-llm CLI
# (no test features). scripts/test.sh runs it for the library the end-to-end tests serve,
# and docker/Dockerfile runs it for the image, so CI proves the image's build step.
# Needs the Rust toolchain and libclang (bindgen); CARGO_TARGET_DIR is honoured. Arguments go
# to cargo: `--no-default-features --features cuda-12` builds for CUDA 12 (Triton 24.10 to
# 25.07) instead of CUDA 13.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked "$@"
