#!/usr/bin/env bash
# Serving throughput on the GPU machine (issue 5's H100 figures): tritonserver with the llm
# backend serving the ChatGLM2-6B shape (dummy bf16 weights) in decoupled mode on KIND_GPU,
# driven by tools/load.py over gRPC streaming at each concurrency given:
#
#   bash scripts/gpu/serve_load.sh [SECONDS] [CONCURRENCY ...]     (default: 20 64 256)
#
# Prompts are a chat question repeated 16 times (about 130 tokens with the template),
# answers 128 new tokens. Needs .carry from scripts/gpu/pack.sh; unpacks what it needs.
set -uo pipefail
cd "$(dirname "$0")/../.."
SECONDS_EACH=${1:-20}
shift || true
LEVELS=${*:-64 256}
OUT=${OUT:-/tmp/gpucheck-out}
mkdir -p "$OUT" /tmp/carry
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
[ -x /tmp/ts/tritonserver/bin/tritonserver ] || python3 -m tarfile -e .carry/tritonserver.tar.xz /tmp/ts
[ -d /tmp/carry/pylib ] || python3 -m tarfile -e .carry/pylib.tar.xz /tmp/carry/pylib
export PYTHONPATH="/tmp/carry/pylib:$PWD/scripts/gpu/pyshim${PYTHONPATH:+:$PYTHONPATH}"
rm -rf /tmp/load-repo /tmp/load-backends /tmp/load-model
mkdir -p /tmp/load-repo/chatglm2_6b_stream/1 /tmp/load-backends/llm /tmp/load-model
xz -dc .carry/libtriton_llm.so.xz > /tmp/load-backends/llm/libtriton_llm.so
cp bench/shapes/chatglm2-6b/config.json tests/fixtures/chatglm2/tokenizer.model /tmp/load-model/
{
    sed -e 's/^name: .*/name: "chatglm2_6b_stream"/' -e '/^instance_group/d' -e '/^parameters/d' \
        tests/model_repository/chatglm2-tiny-stream/config.pbtxt
    echo 'instance_group [ { kind: KIND_GPU count: 1 } ]'
    for kv in model_dir=/tmp/load-model load_format=dummy dtype=bf16 max_num_seqs=256 \
        max_num_batched_tokens=8192; do
        echo "parameters { key: \"${kv%%=*}\" value { string_value: \"${kv#*=}\" } }"
    done
} > /tmp/load-repo/chatglm2_6b_stream/config.pbtxt
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
for level in $LEVELS; do
    echo "== concurrency $level, ${SECONDS_EACH} s"
    timeout $((SECONDS_EACH + 120)) python3 tools/load.py --url 127.0.0.1:8101 \
        --model chatglm2_6b_stream --concurrency "$level" --duration "$SECONDS_EACH" \
        --max-new-tokens 128 --prompt-repeat 16 | tee -a "$OUT/serve_load.jsonl"
done
curl -s localhost:8102/metrics 2>/dev/null | grep -E "^llm_(kv_blocks|requests)" | head -8
kill $SERVER 2>/dev/null
wait $SERVER 2>/dev/null
tail -5 /tmp/load-server.log
