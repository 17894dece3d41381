#!/usr/bin/env bash
# A short device call (about 5 minutes) for what decides TTFT p99 at 64 streams, with the
# sampling kernel and CUDA graphs on (their defaults):
#
#   bash scripts/gpu/ttft_round.sh          (after scripts/gpu/pack.sh filled .carry)
#
#   1  the GPU tests (gpu_tests)
#   2  `triton-llm bench`, ChatGLM2-6B shape, batch 64, prompt 128: the 8,192-token burst
#      that bounds TTFT p99 at 64 streams, and the decode products measured at 64 rows;
#      the same without CUDA graphs; batch 8 (the GEMV kernel's largest batch)
#   3  served, ChatGLM2-6B shape, greedy, 64 streams for TTFT_SECONDS (20), with steps of
#      up to 8,192 and of up to 2,048 tokens (max_num_batched_tokens)
#   4  PyTorch's bf16 linear on the same products, at decode and prefill rows
#   5  Nsight Compute: the burst's kernels one by one (scripts/gpu/profile.sh)
#
# Writes $OUT/gpu_tests.log, $OUT/bench.jsonl, $OUT/serve_load.jsonl, $OUT/serve_phases.jsonl,
# $OUT/torch_linear.jsonl, $OUT/profile.txt and $OUT/ttft_round.txt. Budget: TTFT_BUDGET_S (300).
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET=${TTFT_BUDGET_S:-300} LOG=ttft_round.txt
source scripts/gpu/round.sh
step "gpu tests" 60 bash -c "/tmp/carry/gpu_tests --test-threads 1 --nocapture > '$OUT/gpu_tests.log' 2>&1; \
    grep -E '^GPUCHECK.*\"pass\":false|^    [a-z_]+$|test result' '$OUT/gpu_tests.log'"
bench() { # bench NAME ARGS...
    local name=$1
    shift
    step "bench chatglm2-6b $name" 40 bash -c "/tmp/carry/triton-llm bench --shape chatglm2-6b \
        --load-format dummy --device cuda --prompt 128 --new 64 $* | tee -a '$OUT/bench.jsonl'"
}
bench "batch 64" --batch 64
bench "batch 64, no graphs" --batch 64 --cuda-graphs false
bench "batch 8" --batch 8
step "served, 64 streams, 8,192-token steps" 60 env SHAPE=chatglm2-6b \
    bash scripts/gpu/serve_load.sh "${TTFT_SECONDS:-20}" 64
cp /tmp/load-server.log "$OUT/server.log" 2>/dev/null
# Steps of 2,048 tokens: the burst runs as several steps, so the first prompts answer sooner
# and a prompt that arrives late waits behind a shorter step.
step "served, 64 streams, 2,048-token steps" 60 env SHAPE=chatglm2-6b MAX_BATCHED_TOKENS=2048 \
    bash scripts/gpu/serve_load.sh "${TTFT_SECONDS:-20}" 64
step "torch linear probe" 30 bash -c "python3 scripts/gpu/torch_linear_probe.py > '$OUT/torch_linear.jsonl'"
step "profile of the burst" 60 bash -c "LAUNCHES=2200 bash scripts/gpu/profile.sh chatglm2-6b 64 128 1 \
    > '$OUT/profile.txt' 2>&1; head -40 '$OUT/profile.txt'"
rm -f "$OUT"/ncu-*.csv
echo "== done in $(($(date +%s) - START)) s"
