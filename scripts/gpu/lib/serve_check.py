#!/usr/bin/env python3
"""End-to-end serving check against a running tritonserver with the llm backend.

1. One request to the HTTP generate endpoint (standard library only): shows it answers and
   reports the templated prompt's token count.
2. The seed interface over gRPC (tritonclient.grpc): prompt / history / temperature /
   max_token / history_len as BYTES, temperature "0" (greedy), max_token = prompt tokens +
   --new so that each answer is --new tokens unless the model stops first. One warm-up
   request, then --requests timed requests one after another. Generated tokens are read from
   the Prometheus counter llm_generated_tokens_total (summed over the model's label sets)
   before and after; tokens/s = tokens / wall seconds of the timed requests.

Prints one JSON object on stdout (the last line); progress goes to stderr. Exit 0 when both
parts worked.

  serve_check.py --model chatglm2_6b_gpu [--host 127.0.0.1] [--http-port 8000]
                 [--grpc-port 8001] [--metrics-port 8002] [--new 256] [--requests 3]
                 [--max-token N] [--timeout 120]
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

# About 129 tokens once ChatGLM2's chat template is applied (bench --prompt 128).
DEFAULT_PROMPT = (
    "Please explain, step by step, how a transformer language model turns a prompt into an "
    "answer: the tokenizer, the embeddings, attention over earlier tokens, the feed-forward "
    "layers, the key-value cache that makes decoding fast, and how sampling picks each next "
    "token. Mention the roles of layer normalization, rotary position embeddings and "
    "grouped-query attention, and why batching many requests raises throughput. Then give "
    "three tips for serving such a model efficiently on one GPU, and end with a one-sentence "
    "summary."
)
METRIC = "llm_generated_tokens_total"


def log(msg):
    print(f"serve_check: {msg}", file=sys.stderr, flush=True)


def generated_tokens(url, model):
    """Sum of the counter over the model's label sets (over all sets if none names a model)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    mine, every, found, labelled = 0.0, 0.0, False, False
    for line in text.splitlines():
        if line.startswith(METRIC + "{") or line.startswith(METRIC + " "):
            value = float(line.rsplit(" ", 1)[1])
            every += value
            found = True
            labelled = labelled or 'model="' in line
            if f'model="{model}"' in line:
                mine += value
    if not found:
        raise RuntimeError(f"no {METRIC} in {url}")
    return mine if labelled else every


def http_generate(args, prompt):
    fields = {"prompt": prompt, "temperature": "0", "max_new_tokens": str(args.http_new)}
    request = urllib.request.Request(
        f"http://{args.host}:{args.http_port}/v2/models/{args.model}/generate",
        data=json.dumps(fields).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return {"ok": False, "error": f"HTTP {error.code}: {error.read().decode(errors='replace')[:300]}"}
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    response = body.get("response")
    if isinstance(response, list):
        response = response[0] if response else ""
    result = {
        "ok": bool(response),
        "wall_s": round(time.perf_counter() - started, 3),
        "response_chars": len(response or ""),
        "response_head": (response or "")[:80],
    }
    for key in ("prompt_tokens", "generated_tokens", "finish_reason"):
        if key in body:
            result[key] = body[key]
    if not response:
        result["error"] = f"empty response: {json.dumps(body)[:300]}"
    return result


def grpc_part(args, prompt, max_token):
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"{args.host}:{args.grpc_port}")
    fields = {"prompt": [prompt], "history": [], "temperature": ["0"], "max_token": [str(max_token)],
              "history_len": ["0"]}
    if args.max_new_tokens:
        fields["max_new_tokens"] = [str(args.max_new_tokens)]

    def inputs():
        tensors = []
        for name, values in fields.items():
            array = np.array(values, dtype=object).reshape([len(values)])
            tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def one():
        started = time.perf_counter()
        result = client.infer(args.model, inputs(), client_timeout=args.timeout)
        wall = time.perf_counter() - started
        response = result.as_numpy("response").reshape(-1)[0].decode()
        history = result.as_numpy("history")
        pairs = history.reshape(-1, 2).tolist() if history.size else []
        if not pairs or pairs[-1][0].decode() != prompt:
            raise RuntimeError(f"history does not end with the prompt: {pairs[-1:]!r}")
        return wall, response

    metrics_url = f"http://{args.host}:{args.metrics_port}/metrics"
    log("gRPC warm-up request")
    warm_before = generated_tokens(metrics_url, args.model)
    warm_wall, warm_response = one()
    warm_tokens = generated_tokens(metrics_url, args.model) - warm_before
    log(f"warm-up: {warm_tokens:.0f} tokens in {warm_wall:.2f} s")
    before = generated_tokens(metrics_url, args.model)
    walls, chars = [], []
    started = time.perf_counter()
    for i in range(args.requests):
        wall, response = one()
        walls.append(round(wall, 3))
        chars.append(len(response))
        log(f"request {i + 1}: {wall:.2f} s, {len(response)} chars")
    wall_total = time.perf_counter() - started
    tokens = generated_tokens(metrics_url, args.model) - before
    target = args.new * args.requests
    return {
        "ok": tokens > 0 and all(chars),
        "max_token": max_token,
        "requests": args.requests,
        "tokens": int(tokens),
        "tokens_target": target,
        "wall_s": round(wall_total, 3),
        "tokens_per_s": round(tokens / wall_total, 2) if wall_total > 0 else 0,
        "request_wall_s": walls,
        "response_chars": chars,
        "warmup": {"tokens": int(warm_tokens), "wall_s": round(warm_wall, 3)},
        "response_head": warm_response[:80],
        **({"note": f"answers stopped early: {int(tokens)} of {target} tokens"}
           if tokens < 0.9 * target else {}),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--new", type=int, default=256, help="tokens per timed answer (default 256)")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--max-token", type=int,
                    help="max_token of the gRPC requests (default: prompt tokens from the HTTP "
                         "answer + --new)")
    ap.add_argument("--max-new-tokens", type=int, default=0,
                    help="also send max_new_tokens (default: not sent)")
    ap.add_argument("--http-new", type=int, default=16, help="max_new_tokens of the HTTP request")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per request")
    args = ap.parse_args()

    result = {"model": args.model}
    log("HTTP generate request")
    http = http_generate(args, args.prompt)
    result["http_generate"] = http
    log(f"HTTP generate: {json.dumps(http, ensure_ascii=False)}")

    max_token = args.max_token
    if max_token is None:
        if http.get("prompt_tokens"):
            max_token = int(http["prompt_tokens"]) + args.new
        else:
            # No token count: cap the answer with max_new_tokens instead.
            max_token = 8192
            args.max_new_tokens = args.max_new_tokens or args.new
    try:
        result["grpc"] = grpc_part(args, args.prompt, max_token)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        result["grpc"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result, ensure_ascii=False))
    return 0 if http.get("ok") and result["grpc"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
