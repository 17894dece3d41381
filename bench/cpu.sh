#!/usr/bin/env bash
# CPU path timings for BENCHMARKS.md: greedy 64-token generates on the two
# tiny fixtures and a random-weight 0.57B-parameter InternLM2 (the real tokenizer, a
# hidden-1024 / 24-layer config), each with the machine's copy bandwidth measured in the
# same run. Usage: bench/cpu.sh  (after `cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/release/triton-llm"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp bench/internlm2-0.5b/config.json tests/fixtures/internlm2/tokenizer.model "$work/"
for model in tests/fixtures/chatglm2-tiny tests/fixtures/internlm2-tiny; do
    "$bin" bench --model "$model" --prompt 16 --new 64
done
"$bin" bench --model "$work" --load-format dummy --prompt 16 --new 64
