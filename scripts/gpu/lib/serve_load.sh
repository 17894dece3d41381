#!/usr/bin/env bash
# Serving throughput on the GPU machine, run by `bash scripts/gpu/bench.sh serve` and by its
# composite parts: tritonserver with the llm backend serving a 6B/7B shape (dummy bf16
# weights) in decoupled mode on KIND_GPU, driven by tools/load.py over gRPC streaming at
# each concurrency given:
#
#   bash scripts/gpu/lib/serve_load.sh [SECONDS] [CONCURRENCY ...]     (default: 20 64 256)
#
# Environment: SHAPE (chatglm2-6b, internlm2_5-7b, llama-3.1-8b or vicuna-7b, a folder of
# bench/shapes),
# SAMPLE_ON_DEVICE (true: the batched sampling kernel; false: the host samples the logits),
# CUDA_GRAPHS (true: decode steps replayed as CUDA graphs), TEMPERATURE (0: greedy; above:
# the model's default top-k 50 / top-p 0.8 sampling), MAX_BATCHED_TOKENS (8192: the tokens a
# step may carry, max_num_batched_tokens), LOAD_PROCESSES (0: tools/load.py's own choice, one
# client process per 32 sessions), QUANT_POLICY (0: the KV cache in bf16; 8, 4: int8, int4),
# KV_CACHE_DTYPE (auto: as QUANT_POLICY says; fp8: E4M3),
# QUANTIZATION (none: bf16 weights; w8a16, w4a16, fp8), PROGRAMMATIC_LAUNCH (false; true:
# programmatic dependent launch), FUSED_QKV_ROPE (false; true: a single sequence's QKV product
# carries the rotary and K/V write), NEW_TOKENS (128: new tokens an answer asks for),
# MAX_NUM_SEQS (the largest level, at least
# 256: the engine's seats), REPEATS (1: runs of each level; with more,
# a summary line per level gives the median output tokens/s and the spread).
# Every run of every level sends prompts never sent before: tools/load.py's --prompt-seed is
# this script's start time, the level and the run, so no level reuses another's prefix-cache
# blocks (the prompt tokens the cache served are in serve_phases.jsonl to show it).
# Prompts are 128 tokens (see WORDS below), answers NEW_TOKENS new tokens; latency percentiles
# leave out requests sent in the first 3 s (all sessions start at once; tools/load.py reports
# them with those too). After each level it prints where the engine's steps spent their time
# (llm_engine_step_seconds_total by phase, over the level's steps) and the prompt tokens the
# prefix cache served. Needs .carry from scripts/gpu/pack.sh; unpacks what it needs.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source scripts/gpu/lib/common.sh
SECONDS_EACH=${1:-20}
shift || true
LEVELS=${*:-64 256}
SHAPE=${SHAPE:-chatglm2-6b}
SAMPLE_ON_DEVICE=${SAMPLE_ON_DEVICE:-true}
CUDA_GRAPHS=${CUDA_GRAPHS:-true}
TEMPERATURE=${TEMPERATURE:-0}
MAX_BATCHED_TOKENS=${MAX_BATCHED_TOKENS:-8192}
LOAD_PROCESSES=${LOAD_PROCESSES:-0}
QUANT_POLICY=${QUANT_POLICY:-0}
KV_CACHE_DTYPE=${KV_CACHE_DTYPE:-auto}
QUANTIZATION=${QUANTIZATION:-none}
PROGRAMMATIC_LAUNCH=${PROGRAMMATIC_LAUNCH:-false}
FUSED_QKV_ROPE=${FUSED_QKV_ROPE:-false}
NEW_TOKENS=${NEW_TOKENS:-128}
REPEATS=${REPEATS:-1}
# Seats of the engine: the largest level by default (at least 256), up to 1,024.
MAX_NUM_SEQS=${MAX_NUM_SEQS:-$(printf '%s\n' 256 $LEVELS | sort -n | tail -1)}
RUN_ID=$(date +%s%N)
# For a dry run of this script without a GPU: KIND=KIND_CPU and SHAPE_CONFIG, a config.json
# of the family at a small size (the tokenizer stays SHAPE's).
KIND=${KIND:-KIND_GPU}
SHAPE_CONFIG=${SHAPE_CONFIG:-bench/shapes/$SHAPE/config.json}
MODEL=$(echo "$SHAPE" | tr '.-' '__')_stream
# Prompts of 128 tokens with the chat template (ChatGLM2's takes 16, InternLM2's and
# Vicuna's 10 without a system prompt), random words of their own for each request, as in the 128-in/128-out
# benchmarks the targets come from: no request reuses another's KV blocks.
# The Llama shapes take Llama-2's real tokenizer (Vicuna's; for Llama-3.1-8B a stand-in with
# the same words a token) and FastChat's vicuna_v1.1 prompt without a system message.
case $SHAPE in
    chatglm2*) TOKENIZER="tests/fixtures/chatglm2/tokenizer.model" WORDS=112 ;;
    internlm2*) TOKENIZER="tests/fixtures/internlm2/tokenizer.model" WORDS=118 ;;
    llama*|vicuna*)
        TOKENIZER="tests/fixtures/llama2-tokenizer/tokenizer.model tests/fixtures/llama2-tokenizer/tokenizer_config.json"
        WORDS=118 ;;
    *) echo "unknown SHAPE $SHAPE" >&2; exit 2 ;;
esac
carry_server
rm -rf /tmp/load-repo /tmp/load-backends /tmp/load-model
mkdir -p "/tmp/load-repo/$MODEL/1" /tmp/load-backends/llm /tmp/load-model
xz -dc .carry/libtriton_llm.so.xz > /tmp/load-backends/llm/libtriton_llm.so
cp "$SHAPE_CONFIG" /tmp/load-model/config.json
# shellcheck disable=SC2086 # a list of files
cp $TOKENIZER /tmp/load-model/
{
    sed -e "s/^name: .*/name: \"$MODEL\"/" -e '/^instance_group/d' -e '/^parameters/d' \
        tests/model_repository/chatglm2-tiny-stream/config.pbtxt
    echo "instance_group [ { kind: $KIND count: 1 } ]"
    for kv in model_dir=/tmp/load-model load_format=dummy dtype=bf16 max_num_seqs=$MAX_NUM_SEQS \
        max_num_batched_tokens=$MAX_BATCHED_TOKENS sample_on_device=$SAMPLE_ON_DEVICE \
        cuda_graphs=$CUDA_GRAPHS quant_policy=$QUANT_POLICY kv_cache_dtype=$KV_CACHE_DTYPE \
        quantization=$QUANTIZATION programmatic_launch=$PROGRAMMATIC_LAUNCH \
        fused_qkv_rope=$FUSED_QKV_ROPE; do
        echo "parameters { key: \"${kv%%=*}\" value { string_value: \"${kv#*=}\" } }"
    done
} > "/tmp/load-repo/$MODEL/config.pbtxt"
/tmp/ts/tritonserver/bin/tritonserver --model-repository /tmp/load-repo \
    --backend-directory /tmp/load-backends --http-port 8100 --grpc-port 8101 --metrics-port 8102 \
    --allow-gpu-metrics=false > /tmp/load-server.log 2>&1 &
SERVER=$!
for _ in $(seq 120); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8100/v2/health/ready', timeout=2)" \
        2>/dev/null && break
    kill -0 $SERVER 2>/dev/null || break
    sleep 1
done
# The engine's step counters, summed over label sets: {name or name/phase: value}; and the
# server's TTFT histogram (ttft_count, ttft_le_0.1, ...: first tokens by then).
steps_now() {
    python3 - <<'PY'
import json, re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8102/metrics", timeout=5).read().decode()
totals = {}
for line in text.splitlines():
    m = re.match(r'(llm_engine_step\w*_total|llm_prompt_tokens_total|llm_prefix_cache_hit_tokens_total)'
                 r'\{([^}]*)\} (\S+)', line)
    if m:
        phase = re.search(r'phase="(\w+)"', m.group(2))
        key = m.group(1) + ("/" + phase.group(1) if phase else "")
        totals[key] = totals.get(key, 0.0) + float(m.group(3))
    m = re.match(r'llm_time_to_first_token_seconds_(count|bucket)\{([^}]*)\} (\S+)', line)
    if m:
        le = re.search(r'le="([^"]+)"', m.group(2))
        key = "ttft_count" if m.group(1) == "count" else "ttft_le_" + le.group(1)
        totals[key] = totals.get(key, 0.0) + float(m.group(3))
print(json.dumps(totals))
PY
}
# The server's own version line, recorded with every level's summary.
SERVER_VERSION=$(sed -n 's/^| server_version *| \([0-9.]*\).*/\1/p' /tmp/load-server.log | head -1)
echo "== $SHAPE, sample_on_device=$SAMPLE_ON_DEVICE, cuda_graphs=$CUDA_GRAPHS, temperature $TEMPERATURE, max_num_batched_tokens $MAX_BATCHED_TOKENS"
# The script's exit: 1 if any run of the load tool failed (its figures are then missing).
STATUS=0
for level in $LEVELS; do
for run in $(seq "$REPEATS"); do
    echo "== concurrency $level, ${SECONDS_EACH} s, run $run of $REPEATS"
    before=$(steps_now)
    timeout $((SECONDS_EACH + 120)) python3 tools/load.py --url 127.0.0.1:8101 \
        --model "$MODEL" --concurrency "$level" --duration "$SECONDS_EACH" \
        --max-new-tokens "$NEW_TOKENS" --random-words "$WORDS" --system-prompt "" \
        --prompt-seed "$RUN_ID/$level/$run" \
        --temperature "$TEMPERATURE" --warmup 3 --processes "$LOAD_PROCESSES" |
        tee -a "$OUT/serve_load.jsonl"
    rc=$?  # the load tool's (pipefail), or timeout's
    if [ $rc -ne 0 ]; then
        echo "== the load tool exited $rc (concurrency $level, run $run)"
        STATUS=1
    fi
    after=$(steps_now)
    python3 - "$before" "$after" "$level" "$SHAPE" "$SAMPLE_ON_DEVICE" "$TEMPERATURE" "$CUDA_GRAPHS" \
        "$MAX_BATCHED_TOKENS" "$run" <<'PY' |
import json, sys
before, after = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
steps = d.get("llm_engine_steps_total", 0.0) or 1.0
phases = {k.split("/")[1]: round(v / steps * 1e3, 3) for k, v in d.items() if "/" in k}
print(json.dumps({"level": int(sys.argv[3]), "run": int(sys.argv[9]), "shape": sys.argv[4],
                  "sample_on_device": sys.argv[5],
                  "temperature": float(sys.argv[6]), "cuda_graphs": sys.argv[7],
                  "max_num_batched_tokens": int(sys.argv[8]), "steps": int(steps),
                  "mean_sequences": round(d.get("llm_engine_step_sequences_total", 0.0) / steps, 1),
                  "prompt_tokens": int(d.get("llm_prompt_tokens_total", 0.0)),
                  "prefix_cache_hit_tokens": int(d.get("llm_prefix_cache_hit_tokens_total", 0.0)),
                  # Server side (request in the engine to first token chosen): the share of
                  # first tokens later than each bucket bound, client and transport left out;
                  # over all the level's requests, the warm-up's too.
                  "server_ttft_share_over": {k[len("ttft_le_"):]: round(1 - v / d["ttft_count"], 4)
                                             for k, v in d.items()
                                             if k.startswith("ttft_le_") and d.get("ttft_count")
                                             and 0.05 <= float(k[len("ttft_le_"):]) <= 0.5},
                  "ms_per_step": phases}))
PY
        tee -a "$OUT/serve_phases.jsonl"
done
# The level's runs: the median output tokens/s and the spread (the headline figure).
python3 - "$OUT/serve_load.jsonl" "$level" "$RUN_ID" "$REPEATS" "$SHAPE" "$SERVER_VERSION" \
    "quantization=$QUANTIZATION kv_cache_dtype=$KV_CACHE_DTYPE quant_policy=$QUANT_POLICY programmatic_launch=$PROGRAMMATIC_LAUNCH fused_qkv_rope=$FUSED_QKV_ROPE cuda_graphs=$CUDA_GRAPHS sample_on_device=$SAMPLE_ON_DEVICE temperature=$TEMPERATURE new_tokens=$NEW_TOKENS max_num_batched_tokens=$MAX_BATCHED_TOKENS" <<'PY' |
import json, statistics, sys
path, level, run_id, repeats, shape, version, settings = sys.argv[1:]
runs = []
for line in open(path, encoding="utf-8", errors="replace"):
    try:
        row = json.loads(line)
    except ValueError:
        continue
    if row.get("concurrency") == int(level) and str(row.get("prompt_seed", "")).startswith(run_id + "/"):
        runs.append(row)
rates = sorted(r["output_tokens_per_s"] for r in runs)
print(json.dumps({"summary": True, "shape": shape, "level": int(level), "server_version": version,
                  "runs": len(runs), "of": int(repeats),
                  "output_tokens_per_s_median": statistics.median(rates) if rates else None,
                  "output_tokens_per_s_min": rates[0] if rates else None,
                  "output_tokens_per_s_max": rates[-1] if rates else None,
                  "errors": sum(r.get("errors", 0) for r in runs),
                  # The served model's settings, as this script set them.
                  **dict(pair.split("=", 1) for pair in settings.split())}))
PY
    tee -a "$OUT/serve_summary.jsonl"
done
curl -s localhost:8102/metrics 2>/dev/null | grep -E "^llm_(kv_blocks|requests)" | head -8
kill $SERVER 2>/dev/null
wait $SERVER 2>/dev/null
tail -5 /tmp/load-server.log
exit $STATUS
