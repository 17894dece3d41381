#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md, on the GPU machine from the repo root, after
# scripts/gpu/pack.sh filled .carry here and .carry travelled with the tree (correctness is
# scripts/gpu/check.sh's). One part a run:
#
#   bash scripts/gpu/bench.sh figures       the current figures: the GPU tests; `triton-llm
#        bench`, ChatGLM2-6B shape, batches 1, 2, 3, 4 and 8 (the decode step, and each
#        product on the GEMV kernel and on cuBLAS at the batch's rows); served, greedy:
#        ChatGLM2-6B at 64 and 256 streams (3 runs each: the median and the spread),
#        InternLM2.5-7B at 256; ChatGLM2-6B sampled (temperature 0.8, top-k 50, top-p 0.8)
#        at 64
#   bash scripts/gpu/bench.sh ttft          what decides TTFT p99 at 64 streams: the GPU
#        tests; bench at batch 64, prompt 128 (the 8,192-token burst of 64 prompts arriving
#        together) with and without CUDA graphs, and at batch 8; served at 64 streams for
#        TTFT_SECONDS (20) with steps of up to 8,192 and of up to 2,048 tokens; PyTorch's
#        products (torch, below); Nsight Compute over the burst (profile, below)
#   bash scripts/gpu/bench.sh serving       the engine's settings against each other: the GPU
#        tests; bench at batch 64 with the host choosing tokens and with the sampling kernel
#        and CUDA graphs, batch 256 with them, batch 1 without and with graphs; PyTorch's
#        products; served with them (ChatGLM2-6B at 64 and 256 streams, InternLM2.5-7B at
#        256), then ChatGLM2-6B at 64 without graphs, with host sampling, and sampled. The
#        sampling kernel and graphs are used only where they passed their GPU tests, so one
#        broken part does not cost the run its other figures (the log says what was left off)
#   bash scripts/gpu/bench.sh limits        issue 21's levers, each beside what it replaces in
#        the same run: the GPU tests; `triton-llm bench` (prompt 128, 64 new) of ChatGLM2-6B
#        and InternLM2.5-7B at batch 1 with and without programmatic dependent launch and
#        with the QKV product carrying the rotary and K/V write (--fused-qkv-rope), at
#        batch 64 (the decode step, and the decode attention alone on the tensor cores and
#        the CUDA cores at contexts 256 to 8,192), and FP8 weights at batch 1 and 64; served
#        ChatGLM2-6B FP8 and bf16 at 256 streams; Nsight Compute over a 64-stream decode step
#        if the budget (BENCH_BUDGET_S, 540) has time left
#   bash scripts/gpu/bench.sh decode [BATCH ...] [-- BENCH_FLAGS]
#        `triton-llm bench --shape $SHAPE --load-format dummy --device cuda --prompt $PROMPT
#        --new $NEW --batch B` for each B (default 1); SHAPE chatglm2-6b, PROMPT 128, NEW 64;
#        flags after -- go to every bench (e.g. -- --cuda-graphs false)
#   bash scripts/gpu/bench.sh serve [SECONDS] [STREAMS ...]
#        served load at each number of streams (default 20 s at 64 and 256); environment
#        SHAPE, SAMPLE_ON_DEVICE, CUDA_GRAPHS, TEMPERATURE, MAX_BATCHED_TOKENS, LOAD_PROCESSES
#        (lib/serve_load.sh says what each does). Without a GPU, KIND=KIND_CPU and
#        SHAPE_CONFIG=<a small config.json of the family> dry-run it on the CPU
#   bash scripts/gpu/bench.sh profile [SHAPE] [BATCH] [PROMPT] [NEW]
#        Nsight Compute over one forward call: per-kernel time, share and GB/s (defaults
#        chatglm2-6b 1 128 2: a decode step; NEW=1: the prefill; LAUNCHES: ncu's launch count)
#   bash scripts/gpu/bench.sh torch         PyTorch's bf16 linear on the decode products'
#        shapes at decode and prefill rows, the reference for our cuBLAS path
#   bash scripts/gpu/bench.sh peer [SHAPE]  a peer in the same run: at batch 1, 16 and 64,
#        `triton-llm bench` of the shape (default llama-3.1-8b), then transformers' generate
#        on the same shape (static cache, compiled; and dynamic, eager: lib/torch_peer.py),
#        prompt 128, 64 new tokens; bench.jsonl and peer.jsonl
#
# Every bench runs BENCH_RUNS (5) times in its process, its figures the medians and the
# decode step's spread beside them. Every part ends with one table of what it measured (lib/table.py), also at the end of its
# log. Every part's log starts with the date, the commit pack.sh built and the device; a step's
# exit status is its command's (pipes included); the GPU tests run first and a failing run
# stops the part. Files under $OUT (default /tmp/gpucheck-out): bench.jsonl (one bench JSON
# a line), serve_load.jsonl (tools/load.py's report per run of a level), serve_summary.jsonl
# (per level: its runs' median output tokens/s, the spread, the server's version),
# serve_phases.jsonl (per run of a level: where
# the engine's steps spent their time, prefix-cache hits, the server's TTFT shares),
# torch_linear.jsonl, gpu_tests.log, profile.txt (and ncu-*.csv from `profile`), PART.txt
# (the part's step log) and the servers' logs (servers.tar.xz). figures, ttft, serving and
# decode run their steps under a time budget, BENCH_BUDGET_S (figures 420, ttft 300, serving
# 480, decode 300): a step that would not fit is skipped and one that overruns is stopped, so
# a run always ends with the figures of the steps that fit. SERVING_SECONDS (15): seconds
# per served level in figures and serving.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:-}
shift || true
usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; }
source scripts/gpu/lib/common.sh
SECONDS_EACH=${SERVING_SECONDS:-15}
# Timed runs of every bench (`triton-llm bench --runs`): its figures are their medians.
RUNS=${BENCH_RUNS:-5}

# bench_step NAME NEEDED_SECONDS ARGS...: one `triton-llm bench` of the ChatGLM2-6B shape
# (prompt 128, 64 new tokens), its JSON appended to bench.jsonl
bench_step() {
    local name=$1 needed=$2
    shift 2
    step "bench chatglm2-6b $name" "$needed" bash -c "set -o pipefail; $CARRY/triton-llm bench --runs $RUNS --shape chatglm2-6b \
        --load-format dummy --device cuda --prompt 128 --new 64 $* | tee -a '$OUT/bench.jsonl'"
}

figures() {
    budget "${BENCH_BUDGET_S:-420}" figures.txt
    gpu_tests 60
    for batch in 1 2 3 4 8; do
        bench_step "batch $batch" 30 --batch "$batch"
    done
    # The headline: each level HEADLINE_REPEATS (3) times, the median and the spread in
    # serve_summary.jsonl.
    LEVELS=(64 256)
    serve "chatglm2-6b greedy" server-glm.log 130 SHAPE=chatglm2-6b REPEATS="${HEADLINE_REPEATS:-3}"
    LEVELS=(256)
    serve "internlm2.5-7b greedy" server-internlm.log 50 SHAPE=internlm2_5-7b
    LEVELS=(64)
    serve "chatglm2-6b sampled" server-glm-sampled.log 50 SHAPE=chatglm2-6b TEMPERATURE=0.8
    echo "== done in $(($(date +%s) - START)) s"
    pack_server_logs
    cat "$OUT/serve_phases.jsonl" 2>/dev/null
}

ttft() {
    local seconds=${TTFT_SECONDS:-20}
    budget "${BENCH_BUDGET_S:-300}" ttft.txt
    gpu_tests 60
    bench_step "batch 64" 40 --batch 64
    bench_step "batch 64, no graphs" 40 --batch 64 --cuda-graphs false
    bench_step "batch 8" 40 --batch 8
    step "served, 64 streams, 8,192-token steps" 60 env SHAPE=chatglm2-6b \
        bash scripts/gpu/lib/serve_load.sh "$seconds" 64
    cp /tmp/load-server.log "$OUT/server.log" 2>/dev/null
    # Steps of 2,048 tokens: the burst runs as several steps, so the first prompts answer
    # sooner and a prompt that arrives late waits behind a shorter step.
    step "served, 64 streams, 2,048-token steps" 60 env SHAPE=chatglm2-6b MAX_BATCHED_TOKENS=2048 \
        bash scripts/gpu/lib/serve_load.sh "$seconds" 64
    step "torch linear probe" 30 bash -c "python3 scripts/gpu/lib/torch_linear_probe.py > '$OUT/torch_linear.jsonl'"
    # The burst is the prefill of 64 prompts of 128 tokens (NEW=1).
    step "profile of the burst" 60 bash -c "LAUNCHES=2200 bash scripts/gpu/lib/profile.sh chatglm2-6b 64 128 1 \
        > '$OUT/profile.txt' 2>&1; rc=\$?; head -40 '$OUT/profile.txt'; exit \$rc"
    # The table is in profile.txt; the raw CSV would only add files to bring back.
    rm -f "$OUT"/ncu-*.csv
    echo "== done in $(($(date +%s) - START)) s"
}

# passed TEST: with --nocapture a test's "ok" comes after its own output, not on its "test"
# line: a test passed when it ran, the run finished, and it is not in the closing failures
# list. A test that found no device skips as "ok": that is no pass.
passed() {
    local log="$OUT/gpu_tests.log"
    grep -q "^test $1 \.\.\. " "$log" 2>/dev/null &&
        grep -q "^test result: " "$log" &&
        ! sed -n '/^failures:$/,$p' "$log" | grep -qx "    $1" &&
        ! grep -q "skipped (no CUDA device" "$log"
}

serving() {
    budget "${BENCH_BUDGET_S:-480}" serving.txt
    gpu_tests 60 '^GPUCHECK|^test |test result'
    local graphs=true sample=true
    if ! passed decode_steps_replayed_as_cuda_graphs_match_launched_ones; then
        graphs=false
        echo "== CUDA graphs did not pass their device test: left off below" | tee -a "$OUT/$LOG"
    fi
    if ! passed the_sampling_kernel_chooses_as_the_host_sampler_on_the_device ||
        ! passed sampling_on_the_device_answers_as_sampling_on_the_host; then
        sample=false
        echo "== the sampling kernel did not pass its device tests: left off below" | tee -a "$OUT/$LOG"
    fi
    local flags="--sample-on-device $sample --cuda-graphs $graphs"
    bench_step "batch 64, host chooses, no graphs" 40 --batch 64 --sample-on-device false --cuda-graphs false
    bench_step "batch 64, $flags" 40 --batch 64 $flags
    bench_step "batch 256, $flags" 40 --batch 256 $flags
    step "torch linear probe" 30 bash -c "set -o pipefail; python3 scripts/gpu/lib/torch_linear_probe.py | tee '$OUT/torch_linear.jsonl'"
    bench_step "batch 1, no graphs" 40 --batch 1 --sample-on-device false --cuda-graphs false
    [ $graphs = true ] && bench_step "batch 1, graphs" 40 --batch 1 --sample-on-device false --cuda-graphs true
    LEVELS=(64 256)
    serve "chatglm2-6b greedy, device sampling $sample, graphs $graphs" server-glm-graphs.log 70 \
        SHAPE=chatglm2-6b SAMPLE_ON_DEVICE=$sample CUDA_GRAPHS=$graphs
    LEVELS=(256)
    serve "internlm2.5-7b greedy, device sampling $sample, graphs $graphs" server-internlm.log 70 \
        SHAPE=internlm2_5-7b SAMPLE_ON_DEVICE=$sample CUDA_GRAPHS=$graphs
    LEVELS=(64)
    serve "chatglm2-6b greedy, device sampling $sample" server-glm-device.log 70 SHAPE=chatglm2-6b \
        SAMPLE_ON_DEVICE=$sample CUDA_GRAPHS=false
    serve "chatglm2-6b greedy, host sampling" server-glm-host.log 70 SHAPE=chatglm2-6b \
        SAMPLE_ON_DEVICE=false CUDA_GRAPHS=false
    serve "chatglm2-6b sampled, device sampling $sample, graphs $graphs" server-glm-sampled.log 70 \
        SHAPE=chatglm2-6b SAMPLE_ON_DEVICE=$sample CUDA_GRAPHS=$graphs TEMPERATURE=0.8
    echo "== done in $(($(date +%s) - START)) s"
    pack_server_logs
    cat "$OUT/serve_phases.jsonl" 2>/dev/null
}

limits() {
    budget "${BENCH_BUDGET_S:-540}" limits.txt
    gpu_tests 60
    local shape
    for shape in chatglm2-6b internlm2_5-7b; do
        for flags in "--batch 1" "--batch 1 --programmatic-launch true" \
            "--batch 1 --fused-qkv-rope true" "--batch 64" "--batch 1 --quantization fp8" \
            "--batch 64 --quantization fp8"; do
            step "bench $shape $flags" 30 bash -c "set -o pipefail; $CARRY/triton-llm bench --runs $RUNS \
                --shape $shape --load-format dummy --device cuda --prompt 128 --new 64 $flags \
                | tee -a '$OUT/bench.jsonl'"
        done
    done
    LEVELS=(256)
    serve "chatglm2-6b fp8" server-fp8.log 50 SHAPE=chatglm2-6b QUANTIZATION=fp8
    serve "chatglm2-6b bf16" server-bf16.log 50 SHAPE=chatglm2-6b
    # Where the 64-stream step's time goes now (the tensor-core decode's share), if time is left.
    step "profile of a 64-stream decode step" 120 bash -c "LAUNCHES=2600 bash scripts/gpu/lib/profile.sh \
        chatglm2-6b 64 128 2 > '$OUT/profile.txt' 2>&1; rc=\$?; head -40 '$OUT/profile.txt'; exit \$rc"
    rm -f "$OUT"/ncu-*.csv
    echo "== done in $(($(date +%s) - START)) s"
    pack_server_logs
}

decode() {
    local batches=() flags=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        batches+=("$1")
        shift
    done
    [ $# -gt 0 ] && shift
    flags=("$@")
    [ ${#batches[@]} -gt 0 ] || batches=(1)
    local shape=${SHAPE:-chatglm2-6b} prompt=${PROMPT:-128} new=${NEW:-64} batch
    budget "${BENCH_BUDGET_S:-300}" decode.txt
    for batch in "${batches[@]}"; do
        step "bench $shape batch $batch prompt $prompt new $new${flags[*]:+ ${flags[*]}}" 30 bash -c \
            "set -o pipefail; $CARRY/triton-llm bench --runs $RUNS --shape $shape --load-format dummy --device cuda \
            --prompt $prompt --new $new --batch $batch ${flags[*]} | tee -a '$OUT/bench.jsonl'"
    done
}

peer() {
    local shape=${1:-llama-3.1-8b} batch
    budget "${BENCH_BUDGET_S:-540}" peer.txt
    for batch in 1 16 64; do
        step "bench $shape batch $batch" 40 bash -c "set -o pipefail; $CARRY/triton-llm bench --runs $RUNS \
            --shape $shape --load-format dummy --device cuda --prompt 128 --new 64 --batch $batch \
            | tee -a '$OUT/bench.jsonl'"
    done
    step "transformers $shape" 300 bash -c "set -o pipefail; python3 scripts/gpu/lib/torch_peer.py \
        --shape $shape --prompt 128 --new 64 | tee -a '$OUT/peer.jsonl'"
}

case "$PART" in
    figures | ttft | serving | limits | decode | peer)
        carry_binary triton-llm
        "$PART" "$@"
        rc=$?
        summary
        exit $rc
        ;;
    serve)
        bash scripts/gpu/lib/serve_load.sh "$@"
        rc=$?
        cp /tmp/load-server.log "$OUT/server.log" 2>/dev/null
        LOG=serve.txt summary
        exit $rc
        ;;
    profile)
        bash scripts/gpu/lib/profile.sh "$@" 2>&1 | tee -a "$OUT/profile.txt"
        ;;
    torch)
        python3 scripts/gpu/lib/torch_linear_probe.py | tee -a "$OUT/torch_linear.jsonl"
        ;;
    -h | --help)
        usage
        ;;
    *)
        usage >&2
        echo "bench.sh: ${PART:+unknown part $PART; }name one of the parts above" >&2
        exit 2
        ;;
esac
