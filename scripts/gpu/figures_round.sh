#!/usr/bin/env bash
# One device call (about 4 minutes) that re-measures issue 5's serving figures with the
# engine's defaults, and checks the products' kernel choice at small batches:
#
#   bash scripts/gpu/figures_round.sh       (after scripts/gpu/pack.sh filled .carry)
#
#   1  the GPU tests (gpu_tests)
#   2  `triton-llm bench`, ChatGLM2-6B shape, batches 1, 2, 3, 4 and 8: the decode step, and
#      each product on every kernel that can run those rows (GEMV, wide GEMV, cuBLAS)
#   3  served, ChatGLM2-6B shape, greedy: 64 and 256 streams
#   4  served, InternLM2.5-7B shape, greedy: 256 streams
#   5  served, ChatGLM2-6B shape, sampled (temperature 0.8, top-k 50, top-p 0.8): 64 streams
#
# Writes $OUT/gpu_tests.log, $OUT/bench.jsonl, $OUT/serve_load.jsonl, $OUT/serve_phases.jsonl,
# $OUT/figures_round.txt and the servers' logs (servers.tar.xz). Budget: FIGURES_BUDGET_S (300).
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET=${FIGURES_BUDGET_S:-300} LOG=figures_round.txt
SECONDS_EACH=${SERVING_SECONDS:-15}
source scripts/gpu/round.sh
step "gpu tests" 60 bash -c "/tmp/carry/gpu_tests --test-threads 1 --nocapture > '$OUT/gpu_tests.log' 2>&1; \
    grep -E '^GPUCHECK.*\"pass\":false|^    [a-z_]+$|test result' '$OUT/gpu_tests.log'"
for batch in 1 2 3 4 8; do
    step "bench chatglm2-6b batch $batch" 30 bash -c "/tmp/carry/triton-llm bench \
        --shape chatglm2-6b --load-format dummy --device cuda --prompt 128 --new 64 \
        --batch $batch | tee -a '$OUT/bench.jsonl'"
done
LEVELS=(64 256)
serve "chatglm2-6b greedy" server-glm.log 50 SHAPE=chatglm2-6b
LEVELS=(256)
serve "internlm2.5-7b greedy" server-internlm.log 50 SHAPE=internlm2_5-7b
LEVELS=(64)
serve "chatglm2-6b sampled" server-glm-sampled.log 50 SHAPE=chatglm2-6b TEMPERATURE=0.8
echo "== done in $(($(date +%s) - START)) s"
pack_server_logs
cat "$OUT/serve_phases.jsonl" 2>/dev/null
