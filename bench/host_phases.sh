#!/usr/bin/env bash
# The engine thread's host work per step, on the CPU: tritonserver serves a model with the
# tiny ChatGLM2 layers but ChatGLM2-6B's vocabulary (65,024 logits a row, the real
# tokenizer; dummy weights) in decoupled mode on KIND_CPU, tools/load.py runs CONCURRENCY
# streams over gRPC, and the engine's 10-second step summaries (schedule, forward,
# detokenize, emit) are printed from the server log.
#
#   bash bench/host_phases.sh [CONCURRENCY] [SECONDS]      (default 64 30; after setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${1:-64}
SECONDS_RUN=${2:-30}
# Seats for every stream (at least 256).
SEATS=$((CONCURRENCY > 256 ? CONCURRENCY : 256))
cargo build --release --locked -q
source scripts/env.sh
work=$(mktemp -d)
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/model" "$work/repo/glm_stream/1" "$work/backends/llm"
python3 - "$work/model/config.json" <<'PY'
import json, sys
config = json.load(open("tests/fixtures/chatglm2-tiny/config.json"))
config["padded_vocab_size"] = 65024
json.dump(config, open(sys.argv[1], "w"))
PY
cp tests/fixtures/chatglm2/tokenizer.model "$work/model/"
cp "$TRITON_LLM_LIB" "$work/backends/llm/"
{
    sed -e 's/^name: .*/name: "glm_stream"/' -e '/^instance_group/d' -e '/^parameters/d' \
        tests/model_repository/chatglm2-tiny-stream/config.pbtxt
    echo 'instance_group [ { kind: KIND_CPU count: 1 } ]'
    for kv in "model_dir=$work/model" load_format=dummy "max_num_seqs=$SEATS" max_num_batched_tokens=8192; do
        echo "parameters { key: \"${kv%%=*}\" value { string_value: \"${kv#*=}\" } }"
    done
} > "$work/repo/glm_stream/config.pbtxt"
"$TRITONSERVER_BIN" --model-repository "$work/repo" --backend-directory "$work/backends" \
    --http-port 8300 --grpc-port 8301 --metrics-port 8302 > "$work/server.log" 2>&1 &
server=$!
until curl -sf 127.0.0.1:8300/v2/health/ready >/dev/null; do
    kill -0 $server 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.5
done
"$TRITON_PYTHON" tools/load.py --url 127.0.0.1:8301 --model glm_stream \
    --concurrency "$CONCURRENCY" --duration "$SECONDS_RUN" --max-new-tokens 128 --prompt-repeat 16
grep -o 'engine glm_stream.*steps of.*' "$work/server.log" || echo "no step summary (run longer)"
