#!/usr/bin/env bash
# One device call for issue 5's serving figures, sized for a session's short device budget
# (about 8 minutes; each step has a timeout and the run stops starting steps at its budget):
#
#   bash scripts/gpu/serving_round.sh          (after scripts/gpu/pack.sh filled .carry)
#
#   1  the GPU tests (gpu_tests): the sampling kernel and CUDA-graph decode steps on the
#      device among them
#   2  `triton-llm bench`, ChatGLM2-6B shape: batch 64 with the host choosing tokens, and
#      with the sampling kernel and CUDA graphs; batch 256 with them; PyTorch's bf16 linear
#      (cuBLASLt) on the decode products; batch 1 without and with graphs
#   3  served, ChatGLM2-6B shape, greedy, device sampling and graphs: 64 and 256 streams
#   4  InternLM2.5-7B shape, the same, 256 streams
#   5  ChatGLM2-6B at 64 streams without graphs, then also with the host sampling
#   6  ChatGLM2-6B at 64 streams sampled (temperature 0.8, top-k 50, top-p 0.8)
#
# The sampling kernel and CUDA graphs are used in 2-6 only where they passed their device
# tests in 1 (the log says which was left off).
#
# Writes $OUT/serve_load.jsonl (tools/load.py), $OUT/serve_phases.jsonl (where each step's
# host time went), $OUT/bench.jsonl, $OUT/torch_linear.jsonl, $OUT/gpu_tests.log and the
# servers' logs (one archive, servers.tar.xz). Budget:
# SERVING_BUDGET_S (480).
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET=${SERVING_BUDGET_S:-480} LOG=serving_round.txt
SECONDS_EACH=${SERVING_SECONDS:-15}
source scripts/gpu/round.sh
step "gpu tests" 60 bash -c "/tmp/carry/gpu_tests --test-threads 1 --nocapture > '$OUT/gpu_tests.log' 2>&1; \
    grep -E '^GPUCHECK|^test |test result' '$OUT/gpu_tests.log'"
# What failed its device test is left out of the rest (off, as it is by default), so that
# one broken part does not cost the round its figures.
# With --nocapture a test's "ok" comes after its own output, not on its "test" line: a test
# passed when it ran, the run finished, and it is not in the closing failures list. A test
# that found no device skips as "ok": that is no pass.
passed() {
    local log="$OUT/gpu_tests.log"
    grep -q "^test $1 \.\.\. " "$log" 2>/dev/null &&
        grep -q "^test result: " "$log" &&
        ! sed -n '/^failures:$/,$p' "$log" | grep -qx "    $1" &&
        ! grep -q "skipped (no CUDA device" "$log"
}
GRAPHS=true SAMPLE=true
if ! passed decode_steps_replayed_as_cuda_graphs_match_launched_ones; then
    GRAPHS=false
    echo "== CUDA graphs did not pass their device test: left off below" | tee -a "$OUT/serving_round.txt"
fi
if ! passed the_sampling_kernel_chooses_as_the_host_sampler_on_the_device ||
    ! passed sampling_on_the_device_answers_as_sampling_on_the_host; then
    SAMPLE=false
    echo "== the sampling kernel did not pass its device tests: left off below" | tee -a "$OUT/serving_round.txt"
fi
FLAGS="--sample-on-device $SAMPLE --cuda-graphs $GRAPHS"
bench() { # bench NAME FLAGS...
    local name=$1
    shift
    step "bench chatglm2-6b $name" 40 bash -c "/tmp/carry/triton-llm bench --shape chatglm2-6b \
        --load-format dummy --device cuda --prompt 128 --new 64 $* | tee -a '$OUT/bench.jsonl'"
}
bench "batch 64, host chooses, no graphs" --batch 64 --sample-on-device false --cuda-graphs false
bench "batch 64, $FLAGS" --batch 64 $FLAGS
bench "batch 256, $FLAGS" --batch 256 $FLAGS
step "torch linear probe" 30 bash -c "python3 scripts/gpu/torch_linear_probe.py | tee '$OUT/torch_linear.jsonl'"
bench "batch 1, no graphs" --batch 1 --sample-on-device false --cuda-graphs false
[ $GRAPHS = true ] && bench "batch 1, graphs" --batch 1 --sample-on-device false --cuda-graphs true
LEVELS=(64 256)
serve "chatglm2-6b greedy, device sampling $SAMPLE, graphs $GRAPHS" server-glm-graphs.log 70 \
    SHAPE=chatglm2-6b SAMPLE_ON_DEVICE=$SAMPLE CUDA_GRAPHS=$GRAPHS
LEVELS=(256)
serve "internlm2.5-7b greedy, device sampling $SAMPLE, graphs $GRAPHS" server-internlm.log 70 \
    SHAPE=internlm2_5-7b SAMPLE_ON_DEVICE=$SAMPLE CUDA_GRAPHS=$GRAPHS
LEVELS=(64)
serve "chatglm2-6b greedy, device sampling $SAMPLE" server-glm-device.log 70 SHAPE=chatglm2-6b \
    SAMPLE_ON_DEVICE=$SAMPLE CUDA_GRAPHS=false
serve "chatglm2-6b greedy, host sampling" server-glm-host.log 70 SHAPE=chatglm2-6b \
    SAMPLE_ON_DEVICE=false CUDA_GRAPHS=false
serve "chatglm2-6b sampled, device sampling $SAMPLE, graphs $GRAPHS" server-glm-sampled.log 70 \
    SHAPE=chatglm2-6b SAMPLE_ON_DEVICE=$SAMPLE CUDA_GRAPHS=$GRAPHS TEMPERATURE=0.8
echo "== done in $(($(date +%s) - START)) s"
pack_server_logs
cat "$OUT/serve_phases.jsonl" 2>/dev/null
