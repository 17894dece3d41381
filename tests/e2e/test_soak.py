"""Soak: 64 concurrent streams on the tiny models for SOAK_SECONDS (CI: 300), half over
HTTP `generate_stream` and half over gRPC streaming, with fresh random prompts, random
lengths and sampling, clients that go away mid-answer and a few bad requests. Every request
sent is answered (0 unanswered), the server's RSS after the warm-up stays within 10%, and
once the load stops the engines are back to 0 running, 0 waiting and 0 KV blocks in use.

On a GPU (scripts/gpu/check.sh, step s) the same test runs with SOAK_KIND=KIND_GPU and
SOAK_STREAMS=256: the instances run on device 0, and the device's used memory (nvidia-smi)
after the warm-up must stay flat to the end (within 1% or 64 MiB).

Cancelling over gRPC is left out on Triton releases before 2.57: their gRPC front end
crashes (SIGSEGV in ModelStreamInferHandler::Process) when many clients cancel streams,
with any backend (README, "Which Triton"). On those, clients go away over HTTP only, which
exercises the same path in the backend (the response factory reports the cancellation)."""

import http.client
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from conftest import FIXTURES, TEST_REPOSITORY, Server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from load import WORDS  # noqa: E402  (one-token words: prompts of a known size)

STREAMS = int(os.environ.get("SOAK_STREAMS", "64"))
KIND = os.environ.get("SOAK_KIND", "KIND_CPU")
MODELS = ("soak-chatglm2", "soak-internlm2")
ANSWER_TIMEOUT_S = 120


def write_repository(root):
    """Both tiny families, decoupled, two instances each, a small KV cache (preemptions)."""
    for name, source in zip(MODELS, ("chatglm2-tiny-stream", "internlm2-tiny-stream")):
        (root / name / "1").mkdir(parents=True)
        fixture = source.removesuffix("-stream")
        config = (TEST_REPOSITORY / source / "config.pbtxt").read_text()
        config = (config.replace(f'name: "{source}"', f'name: "{name}"')
                  .replace(f"../../../fixtures/{fixture}", str(FIXTURES / fixture)))
        config += 'parameters { key: "cache_max_entry_count" value { string_value: "96" } }\n'
        if KIND == "KIND_GPU":
            config = config.replace("kind: KIND_CPU count: 2", "kind: KIND_GPU count: 2 gpus: [ 0 ]")
            assert "KIND_GPU" in config, config
        (root / name / "config.pbtxt").write_text(config)
    return root


def server_version(server):
    with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=10) as reply:
        return tuple(int(part) for part in json.load(reply)["version"].split(".")[:2])


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "answered": 0, "refused": 0, "went_away": 0, "unanswered": 0,
                       "unexpected_errors": 0}
        self.problems = []

    def add(self, key, problem=None):
        with self.lock:
            self.counts[key] += 1
            if problem and len(self.problems) < 40:
                self.problems.append(problem)


def request_fields(rng):
    fields = {
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))),
        "max_new_tokens": str(rng.randint(1, 48)),
        "temperature": rng.choice(["0", "0.7", "1.0"]),
        "seed": str(rng.randrange(1 << 30)),
    }
    if rng.random() < 0.03:
        fields["top_p"] = "7"  # a bad request: INVALID_ARG, which is an answer too
    return fields


def error_kind(fields, message):
    """A refusal the request asked for, or an unexpected error."""
    if "top_p" in fields and "top_p" in message:
        return "refused", None
    return "unexpected_errors", message[:200]


def http_worker(server, seed, stop_at, tally):
    rng = random.Random(seed)
    while time.time() < stop_at:
        model = rng.choice(MODELS)
        goes_away = rng.random() < 0.15
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=ANSWER_TIMEOUT_S)
        tally.add("sent")
        fields = request_fields(rng)
        try:
            conn.request("POST", f"/v2/models/{model}/generate_stream", json.dumps(fields),
                         {"Content-Type": "application/json"})
            reply = conn.getresponse()
            if reply.status != 200:
                tally.add(*error_kind(fields, reply.read().decode(errors="replace")))
                continue
            events, error = 0, None
            for line in reply:
                if line.startswith(b"data: "):
                    events += 1
                    if b'"error"' in line:
                        error = line.decode(errors="replace")
                        break
                    if goes_away:
                        break
            if error is not None:
                tally.add(*error_kind(fields, error))
            elif goes_away:
                tally.add("went_away")
            elif events:
                tally.add("answered")
            else:
                tally.add("unanswered", f"HTTP {model}: the stream ended without an event")
        except (TimeoutError, OSError) as error:
            tally.add("unanswered", f"HTTP {model}: {error!r}")
        finally:
            conn.close()


def grpc_worker(server, seed, stop_at, tally, cancels):
    rng = random.Random(seed)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    events = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        while time.time() < stop_at:
            model = rng.choice(MODELS)
            fields = request_fields(rng)
            tensors = []
            for name, value in fields.items():
                tensor = grpcclient.InferInput(name, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
                tensors.append(tensor)
            tally.add("sent")
            if cancels and rng.random() < 0.15:
                client.async_stream_infer(model, tensors, enable_empty_final_response=True)
                events.get(timeout=ANSWER_TIMEOUT_S)
                client.stop_stream(cancel_requests=True)
                tally.add("went_away")
                events = queue.Queue()
                client.start_stream(callback=lambda result, error, q=events: q.put((result, error)))
                continue
            client.async_stream_infer(model, tensors, enable_empty_final_response=True)
            while True:
                try:
                    result, error = events.get(timeout=ANSWER_TIMEOUT_S)
                except queue.Empty:
                    tally.add("unanswered", f"gRPC {model}: no final answer in {ANSWER_TIMEOUT_S} s")
                    return
                if error is not None:
                    tally.add(*error_kind(fields, error.message()))
                    break
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    tally.add("answered")
                    break
    finally:
        client.stop_stream()
        client.close()


def gpu_memory_used_mib():
    """Used memory of device 0 as nvidia-smi reports it (MiB)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                          "-i", "0"], capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout.strip().splitlines()[0])


def engine_totals(server):
    return {name: sum(server.metric(name, model) for model in MODELS)
            for name in ("llm_requests_running", "llm_requests_waiting", "llm_kv_blocks_used")}


def test_soak_without_a_leak_or_an_unanswered_request(tmp_path):
    seconds = float(os.environ.get("SOAK_SECONDS", "60"))
    server = Server(write_repository(tmp_path / "repository"), tmp_path / "server").wait_live()
    try:
        for model in MODELS:
            server.wait_model_ready(model)
        grpc_cancels = server_version(server) >= (2, 57)
        tally = Tally()
        start = time.time()
        stop_at = start + seconds
        workers = [threading.Thread(target=http_worker, args=(server, i, stop_at, tally))
                   for i in range(STREAMS // 2)]
        workers += [threading.Thread(target=grpc_worker, args=(server, 1000 + i, stop_at, tally, grpc_cancels))
                    for i in range(STREAMS // 2)]
        for worker in workers:
            worker.start()
        # RSS after the warm-up (the first fifth: arenas, thread pools, KV pages touched),
        # then sampled to the end.
        time.sleep(seconds / 5)
        warm = server.rss_kib()
        gpu = KIND == "KIND_GPU"
        gpu_warm = gpu_memory_used_mib() if gpu else 0
        samples, gpu_samples = [], []
        while time.time() < stop_at:
            time.sleep(min(5.0, max(0.0, stop_at - time.time())))
            samples.append(server.rss_kib())
            if gpu:
                gpu_samples.append(gpu_memory_used_mib())
        for worker in workers:
            worker.join(timeout=ANSWER_TIMEOUT_S + 30)
            assert not worker.is_alive(), "a client is stuck"
        deadline = time.time() + 30
        totals = engine_totals(server)
        while any(totals.values()) and time.time() < deadline:
            time.sleep(0.5)
            totals = engine_totals(server)
        counts = tally.counts
        print(f"soak {seconds:.0f} s, {STREAMS} streams, {KIND}, "
              f"gRPC cancels {'on' if grpc_cancels else 'off'}: {counts}; "
              f"RSS {warm} KiB after warm-up, then {min(samples)}-{max(samples)} KiB, "
              f"last {samples[-1]} KiB; after the load {totals}"
              + (f"; GPU memory {gpu_warm} MiB after warm-up, then "
                 f"{min(gpu_samples)}-{max(gpu_samples)} MiB" if gpu else ""))
        assert counts["unanswered"] == 0, tally.problems
        assert counts["answered"] > STREAMS, counts
        assert counts["unexpected_errors"] == 0, tally.problems
        assert counts["sent"] == counts["answered"] + counts["refused"] + counts["went_away"], counts
        assert samples[-1] <= warm * 1.10, f"RSS grew from {warm} KiB to {samples[-1]} KiB"
        if gpu:
            limit = gpu_warm + max(64, gpu_warm // 100)
            assert max(gpu_samples) <= limit, f"GPU memory grew from {gpu_warm} MiB to {max(gpu_samples)} MiB"
        assert all(value == 0 for value in totals.values()), totals
        assert server.process.poll() is None
    finally:
        server.stop()
