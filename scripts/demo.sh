#!/usr/bin/env bash
# The main job: builds libtriton_llm.so, starts the real tritonserver on the tiny bundled
# models (KIND_CPU), asks one question through the generate endpoint, prints the answer,
# and keeps serving on 127.0.0.1:8000 (HTTP) / 8001 (gRPC) / 8002 (metrics) until Ctrl-C.
# `--once` stops the server after the answer. Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
source scripts/env.sh
backends="$(mktemp -d)"
mkdir -p "$backends/llm"
cp "$TRITON_LLM_LIB" "$backends/llm/"
"$TRITONSERVER_BIN" --model-repository "$PWD/tests/model_repository" --backend-directory "$backends" \
    --http-address 127.0.0.1 --grpc-address 127.0.0.1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$backends"' EXIT
until curl -sf 127.0.0.1:8000/v2/health/ready >/dev/null; do
    kill -0 $server 2>/dev/null || { echo "demo: tritonserver exited" >&2; exit 1; }
    sleep 0.5
done
echo "demo: POST /v2/models/internlm2-tiny/generate (random tiny weights: the answer is gibberish)" >&2
curl -sf -X POST 127.0.0.1:8000/v2/models/internlm2-tiny/generate \
    -d '{"prompt": "你好", "history": ["What is RMSNorm?", "It scales a vector by its root mean square."], "temperature": "0", "max_new_tokens": "24"}'
echo
[ "${1:-}" = "--once" ] && exit 0
echo "demo: serving; Ctrl-C stops" >&2
wait $server
