#!/usr/bin/env bash
# Serving figures of the CPU path for BENCHMARKS.md, on a model slow enough to be
# server-bound: InternLM2 layout, random weights (load_format dummy), hidden 256, 4 layers,
# the real 92,544-token vocabulary and tokenizer, decoupled, one KIND_CPU instance; and its
# copy without prefix caching. Runs tools/load.py, perf_analyzer when PERF_ANALYZER_BIN is
# set (e.g. from ../shared/tools/perf-analyzer-env), and bench/prefix_ttft.py.
# Needs scripts/setup.sh and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
work=$(mktemp -d)
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/weights" "$work/backends/llm" "$work/repo/slow/1" "$work/repo/slow-nocache/1"
cp "$TRITON_LLM_LIB" "$work/backends/llm/"
cp tests/fixtures/internlm2/tokenizer.model "$work/weights/"
"$TRITON_PYTHON" - "$work" <<'PY'
import json, sys
work = sys.argv[1]
config = json.load(open("tests/fixtures/internlm2-tiny/config.json"))
config.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=1024, vocab_size=92544, max_position_embeddings=4096,
              rope_scaling=None, eos_token_id=2)
json.dump(config, open(f"{work}/weights/config.json", "w"))
base = open("tests/model_repository/internlm2-tiny-stream/config.pbtxt").read()
for name, extra in (("slow", ""), ("slow-nocache", 'parameters { key: "enable_prefix_caching" value { string_value: "false" } }\n')):
    text = (base.replace('name: "internlm2-tiny-stream"', f'name: "{name}"')
            .replace("../../../fixtures/internlm2-tiny", f"{work}/weights")
            .replace('string_value: "512"', 'string_value: "4096"').replace("count: 2", "count: 1")
            + 'parameters { key: "load_format" value { string_value: "dummy" } }\n' + extra)
    open(f"{work}/repo/{name}/config.pbtxt", "w").write(text)
json.dump({"data": [{"prompt": [p], "max_new_tokens": ["32"], "temperature": ["0"]}
                    for p in ["你好", "hello world", "What is RMSNorm?", "请用一句话介绍你自己。"]]},
          open(f"{work}/input.json", "w"))
PY
"$TRITONSERVER_BIN" --model-repository "$work/repo" --backend-directory "$work/backends" \
    --http-address 127.0.0.1 --grpc-address 127.0.0.1 --http-port 18400 --grpc-port 18401 \
    --metrics-port 18402 > "$work/server.log" 2>&1 &
server=$!
until curl -sf 127.0.0.1:18400/v2/health/ready >/dev/null; do sleep 0.5; done
"$TRITON_PYTHON" tools/load.py --url 127.0.0.1:18401 --model slow --concurrency 8 --duration 15 --max-new-tokens 32
if [ -n "${PERF_ANALYZER_BIN:-}" ]; then
    "$PERF_ANALYZER_BIN" -m slow -u 127.0.0.1:18401 -i grpc --streaming --input-data "$work/input.json" \
        --concurrency-range 8 --measurement-interval 15000 | grep -E "Request count|Throughput"
fi
"$TRITON_PYTHON" bench/prefix_ttft.py 127.0.0.1:18401 slow
