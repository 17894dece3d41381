#!/usr/bin/env python3
"""Time to first token of round 4 of a chat, on a model with prefix caching and on its copy
without (`MODEL` and `MODEL-nocache`). Each round's prompt is a ~70-token question repeated;
the answers are 128 tokens; round 4 resends the three earlier rounds as history.

  python3 bench/prefix_ttft.py GRPC_URL [MODEL]
"""
import sys, time, json, queue
import numpy as np
import tritonclient.grpc as grpcclient
url = sys.argv[1]
base = sys.argv[2] if len(sys.argv) > 2 else "slow"
def inputs(fields):
    out = []
    for k, v in fields.items():
        vals = v if isinstance(v, list) else [v]
        t = grpcclient.InferInput(k, [len(vals)], "BYTES"); t.set_data_from_numpy(np.array(vals, dtype=object)); out.append(t)
    return out
def ask(model, fields):
    c = grpcclient.InferenceServerClient(url); q = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error, time.perf_counter())))
    t0 = time.perf_counter(); c.async_stream_infer(model, inputs(fields), enable_empty_final_response=True)
    first = None; text = []
    while True:
        r, e, at = q.get(timeout=300)
        assert e is None, e
        piece = r.as_numpy("response")
        if piece is not None and piece.reshape(-1)[0]:
            first = first or at; text.append(piece.reshape(-1)[0].decode())
        p = r.get_response().parameters
        if p.get("triton_final_response") and p["triton_final_response"].bool_param:
            c.stop_stream(); return first - t0, "".join(text), p["prompt_tokens"].int64_param
results = {}
for model in [base, base + "-nocache"]:
    history = []
    for round_ in range(4):
        fields = {"prompt": f"Round {round_}: 请用一句话介绍你自己。" * 8, "history": [x for pair in history for x in pair], "temperature": "0", "max_new_tokens": "128"}
        ttft, text, prompt_tokens = ask(model, fields)
        history.append([fields["prompt"], text])
    results[model] = {"round4_ttft_ms": ttft * 1e3, "round4_prompt_tokens": prompt_tokens}
print(json.dumps(results))
