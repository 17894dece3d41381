#!/usr/bin/env python3
"""Load generator for the llm backend: N concurrent chat sessions over gRPC streaming
(tritonclient), each sending its next request when the previous answer ends, for a set
time or number of requests. Prints one JSON object: requests/s, output tokens/s, time to
first token and inter-token latency (p50/p99, ms), errors.

  python3 tools/load.py --model chatglm2-tiny-stream --concurrency 16 --duration 20

Sessions are spread over worker processes (--processes; by default one per 32 sessions, up
to half the cores), so that at hundreds of streams the client's Python is not what limits
the figures. A process's sessions each have their own gRPC stream, all over one TCP
connection (their clients' channels share gRPC's subchannel): 1,024 streams over 32
processes take 32 connections. With --warmup S, the latency percentiles leave out the requests sent in the
first S seconds (every session starts at once, so the first answers wait for one prefill
of all their prompts); those including them are reported too (`*_with_warmup`).
Throughput is over the whole run (`window_requests_per_s`: from the first request sent to the
last answer, as genai-perf measures it).

Works with decoupled models (one response per piece) and with plain ones (one response:
then TTFT is the whole answer's latency). Output tokens are the `generated_tokens`
response parameter of each final response, prompt tokens (reported as a mean) its
`prompt_tokens`. With --random-words every request has a prompt of its own, as in
throughput benchmarks; the default prompts repeat, so the server's prefix cache serves most
of each prompt after its first time. The words come from each session's own random
sequence, seeded by its number and --prompt-seed: runs against one server (load levels one
after the other) must each take a seed of their own, or a later run resends an earlier one's
prompts and the prefix cache serves them. The seconds run (`seconds`) include the warm-up;
`seconds_after_warmup` is what the percentiles without it cover.

With --input-data FILE the requests are Perf Analyzer's input-data entries instead (the
inputs.json genai-perf writes: `{"data": [{"text_input": ["…"], "max_tokens": [16], …}]}`),
each request the next entry in turn, typed as the model config declares them; the answer
text is `text_output` (or `response`), the counts still the server's response parameters.
"""

import argparse
import json
import multiprocessing
import os
import queue
import random
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient

PROMPTS = ["你好", "hello world", "What is RMSNorm?", "请用一句话介绍你自己。"]

# English words that ChatGLM2's, InternLM2's and Llama-2's tokenizers each encode as one token
# (checked with `triton-llm tokenize`): a prompt of N of them is N tokens plus the chat
# template (16 tokens for ChatGLM2, 10 for InternLM2 and Vicuna without a system prompt).
WORDS = """able action activity age air area arm art attention back bad black blue body book boy building
business car care case center change child city class community company computer control cost
country data day development difference doctor door early education effect end event experience
eye face fact family father field figure film foot force form friend game girl green ground
group hair hand head health heart history home hour house idea image important information
interest issue job kind land large law leader level life light line lot love man market matter
member mind minute model moment money month mother movie music name need news night number
office official organization others paper parent part party patient people person phone picture
piece place plan player point policy population position power practice price problem product
program project public question rate reason record red relationship report research result right
river road role room same school season service show side site small son song source space star
state step stone story street student study support system table tax teacher team technology
test thing time town tree truth type use value view voice wall war water way week white wife
window woman word work worker world year""".split()


def inputs(fields):
    tensors = []
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=object))
        tensors.append(tensor)
    return tensors


NUMPY_TYPES = {"TYPE_BOOL": bool, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
               "TYPE_UINT32": np.uint32, "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32,
               "TYPE_FP64": np.float64}


def typed_inputs(entry, types):
    """One Perf Analyzer input-data entry as tensors of the model config's types ("model",
    which genai-perf adds, names no input)."""
    tensors = []
    for name, value in entry.items():
        if name == "model":
            continue
        if name not in types:
            raise SystemExit(f"--input-data: {name!r} is not an input of the model")
        shape = None
        if isinstance(value, dict):
            value, shape = value["content"], value.get("shape")
        values = value if isinstance(value, list) else [value]
        kind = types[name]
        if kind == "TYPE_STRING":
            array = np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)
        else:
            array = np.array(values, dtype=NUMPY_TYPES[kind])
        array = array.reshape(shape or [len(values)])
        datatype = "BYTES" if kind == "TYPE_STRING" else kind.removeprefix("TYPE_")
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def percentile(values, q):
    return float(np.percentile(values, q)) * 1e3 if values else None


class Session(threading.Thread):
    def __init__(self, index, args, deadline, budget):
        super().__init__(daemon=True)
        self.index, self.args, self.deadline, self.budget = index, args, deadline, budget
        # Latencies as (time the request was sent, seconds).
        self.ttft, self.itl, self.tokens, self.requests, self.errors = [], [], 0, 0, []
        self.prompt_tokens = 0
        # When this session sent its first request and received its last final response.
        self.first_sent, self.last_done = None, None
        # Random-word prompts: reproducible per session and seed, different across both.
        self.words = random.Random(f"{args.prompt_seed}/{index}" if args.prompt_seed else index)

    def prompt(self, n):
        if self.args.random_words:
            return " ".join(self.words.choice(WORDS) for _ in range(self.args.random_words))
        return " ".join([PROMPTS[(self.index + n) % len(PROMPTS)]] * self.args.prompt_repeat)

    def run(self):
        client = grpcclient.InferenceServerClient(self.args.url)
        results = queue.Queue()
        # time.monotonic: one clock for every worker process (the warm-up boundary).
        client.start_stream(callback=lambda result, error: results.put((result, error, time.monotonic())))
        history = []
        n = 0
        data = self.args.data
        try:
            while time.monotonic() < self.deadline and (taken := self.budget.take()) is not None:
                prompt = self.prompt(n)
                if data is not None:
                    tensors = typed_inputs(data["entries"][taken % len(data["entries"])], data["types"])
                else:
                    fields = {"prompt": prompt, "max_new_tokens": str(self.args.max_new_tokens),
                              "temperature": str(self.args.temperature)}
                    if self.args.system_prompt is not None:
                        fields["system_prompt"] = self.args.system_prompt
                    if self.args.turns > 1 and history:
                        fields["history"] = [text for pair in history for text in pair]
                    tensors = inputs(fields)
                sent = time.monotonic()
                if self.first_sent is None:
                    self.first_sent = sent
                client.async_stream_infer(self.args.model, tensors, request_id=f"{self.index}-{n}",
                                          enable_empty_final_response=True)
                last = None
                answer = []
                while True:
                    result, error, at = results.get(timeout=self.args.timeout)
                    if error is not None:
                        self.errors.append(str(error))
                        break
                    text = result.as_numpy("response")
                    if text is None:
                        text = result.as_numpy("text_output")
                    if text is not None and text.reshape(-1)[0]:
                        answer.append(text.reshape(-1)[0].decode())
                        if last is None:
                            self.ttft.append((sent, at - sent))
                        else:
                            self.itl.append((sent, at - last))
                        last = at
                    parameters = result.get_response().parameters
                    final = parameters.get("triton_final_response")
                    if final is not None and final.bool_param:
                        generated = parameters.get("generated_tokens")
                        self.tokens += generated.int64_param if generated is not None else 0
                        prompt_tokens = parameters.get("prompt_tokens")
                        self.prompt_tokens += prompt_tokens.int64_param if prompt_tokens is not None else 0
                        self.requests += 1
                        self.last_done = at
                        history = (history + [[prompt, "".join(answer)]])[-(self.args.turns - 1):] \
                            if self.args.turns > 1 else []
                        break
                n += 1
        finally:
            client.stop_stream()
            client.close()


class Budget:
    """Requests left to send, shared by every session of every worker process; each request
    taken gets the next number (which input-data entry it sends)."""

    def __init__(self, total):
        self.total = total
        self.taken = multiprocessing.get_context("spawn").Value("q", 0)

    def take(self):
        with self.taken.get_lock():
            if self.total is not None and self.taken.value >= self.total:
                return None
            self.taken.value += 1
            return self.taken.value - 1


def run_sessions(args, indices, deadline, budget, results=None, start=None):
    """Runs the sessions `indices` to the deadline or budget; their figures, merged. In a
    worker process, `start` = (ready queue, go event, shared deadline): the clock starts
    once every worker has started up."""
    if start is not None:
        ready, go, shared_deadline = start
        ready.put(os.getpid())
        go.wait()
        deadline = shared_deadline.value
    sessions = [Session(i, args, deadline, budget) for i in indices]
    for s in sessions:
        s.start()
    for s in sessions:
        s.join()
    merged = {
        "ttft": [t for s in sessions for t in s.ttft],
        "itl": [t for s in sessions for t in s.itl],
        "errors": [e for s in sessions for e in s.errors],
        "requests": sum(s.requests for s in sessions),
        "tokens": sum(s.tokens for s in sessions),
        "prompt_tokens": sum(s.prompt_tokens for s in sessions),
        "first_sent": min((s.first_sent for s in sessions if s.first_sent is not None), default=None),
        "last_done": max((s.last_done for s in sessions if s.last_done is not None), default=None),
    }
    if results is not None:
        results.put(merged)
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, help="seconds to run (default 30 unless --requests)")
    parser.add_argument("--requests", type=int, help="total requests to send")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-repeat", type=int, default=1,
                        help="repeat each prompt text this many times (longer prompts)")
    parser.add_argument("--random-words", type=int, default=0, metavar="N",
                        help="each request a fresh prompt of N random words (N tokens plus the chat "
                             "template), so that no two requests share prefix-cache blocks; default: "
                             "a few fixed prompts, repeated --prompt-repeat times")
    parser.add_argument("--prompt-seed", default="",
                        help="with --random-words: seeds the sessions' words, so that runs with "
                             "different seeds send prompts never sent before")
    parser.add_argument("--system-prompt", help="InternLM2's system prompt (\"\" for none; default: "
                                                "the model's own)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--turns", type=int, default=1, help="rounds each session keeps as history")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a response")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="seconds at the start whose requests the latency percentiles leave out")
    parser.add_argument("--processes", type=int, default=0,
                        help="worker processes the sessions are spread over (0: one per 32 sessions, "
                             "at most half the cores)")
    parser.add_argument("--input-data", metavar="FILE",
                        help="send Perf Analyzer input-data entries (genai-perf's inputs.json) in turn "
                             "instead of chat prompts")
    args = parser.parse_args()
    args.data = None
    if args.input_data:
        with open(args.input_data) as f:
            entries = json.load(f)["data"]
        config = grpcclient.InferenceServerClient(args.url).get_model_config(args.model, as_json=True)
        args.data = {"entries": entries,
                     "types": {i["name"]: i["data_type"] for i in config["config"]["input"]}}
    duration = args.duration if args.duration is not None else (1e9 if args.requests else 30.0)
    processes = args.processes or min(max(1, (os.cpu_count() or 2) // 2), -(-args.concurrency // 32))
    processes = max(1, min(processes, args.concurrency))
    begun = None
    budget = Budget(args.requests)
    shares = [range(k, args.concurrency, processes) for k in range(processes)]
    if processes == 1:
        started, begun = time.perf_counter(), time.monotonic()
        parts = [run_sessions(args, shares[0], begun + duration, budget)]
    else:
        spawn = multiprocessing.get_context("spawn")
        results, ready, go = spawn.Queue(), spawn.Queue(), spawn.Event()
        deadline = spawn.Value("d", 0.0)
        workers = [spawn.Process(target=run_sessions,
                                 args=(args, share, None, budget, results, (ready, go, deadline)))
                   for share in shares]
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=120)
        started, begun = time.perf_counter(), time.monotonic()
        deadline.value = begun + duration
        go.set()
        parts = [results.get() for _ in workers]
        for w in workers:
            w.join()
    elapsed = time.perf_counter() - started
    steady = begun + args.warmup

    def latencies(name, after=float("-inf")):
        return [seconds for p in parts for sent, seconds in p[name] if sent >= after]
    errors = [e for p in parts for e in p["errors"]]
    requests = sum(p["requests"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    pieces = sum(len(p["ttft"]) + len(p["itl"]) for p in parts)
    # genai-perf's measure: from the first request sent to the last answer's end.
    firsts = [p["first_sent"] for p in parts if p["first_sent"] is not None]
    lasts = [p["last_done"] for p in parts if p["last_done"] is not None]
    window = max(lasts) - min(firsts) if firsts and lasts else None
    print(json.dumps({
        "model": args.model, "concurrency": args.concurrency, "processes": processes,
        "seconds": round(elapsed, 3),
        "requests": requests, "requests_per_s": requests / elapsed,
        "window_requests_per_s": requests / window if window else None,
        "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
        # Tokens per text response: above 1 where the server joined pieces (a send backlog)
        # or held back a token with no whole character yet.
        "tokens_per_response": tokens / pieces if pieces else None,
        "prompt_tokens_mean": sum(p["prompt_tokens"] for p in parts) / requests if requests else None,
        "warmup_s": args.warmup,
        "seconds_after_warmup": round(max(0.0, elapsed - args.warmup), 3),
        "prompt_seed": args.prompt_seed,
        "requests_in_warmup": sum(1 for p in parts for sent, _ in p["ttft"] if sent < steady),
        "ttft_ms_p50": percentile(latencies("ttft", steady), 50),
        "ttft_ms_p99": percentile(latencies("ttft", steady), 99),
        "itl_ms_p50": percentile(latencies("itl", steady), 50),
        "itl_ms_p99": percentile(latencies("itl", steady), 99),
        "ttft_ms_p50_with_warmup": percentile(latencies("ttft"), 50),
        "ttft_ms_p99_with_warmup": percentile(latencies("ttft"), 99),
        "itl_ms_p99_with_warmup": percentile(latencies("itl"), 99),
        "errors": len(errors), "error_examples": errors[:3],
    }))


if __name__ == "__main__":
    main()
