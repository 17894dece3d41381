"""Decoupled (streaming) models through a real tritonserver: streamed pieces add up to the
non-streamed greedy answer over gRPC streaming and the generate_stream endpoint, the last
response carries the history, 64 concurrent streams all answer correctly, one instance serves
1,024 streams at once, and a client that goes away stops its sequence."""

import json
import os
import queue
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import FIXTURES, REPO, TEST_REPOSITORY, Server
from test_seed_interface import flatten, golden_cases, http_chat, make_inputs


def grpc_stream(server, model, fields, request_id="r"):
    """(pieces, final history, error) of one streamed request."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, make_inputs(grpcclient, fields), request_id=request_id,
                              enable_empty_final_response=True)
    pieces, history = [], None
    try:
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                return pieces, history, error
            response = result.get_response()
            text = result.as_numpy("response")
            if text is not None:
                pieces.append(text.reshape(-1)[0].decode())
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                h = result.as_numpy("history")
                history = [[q.decode(), a.decode()] for q, a in h.reshape(-1, 2)] if h is not None else None
                return pieces, history, None
    finally:
        client.stop_stream()
        client.close()


def sse_stream(server, model, fields):
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/generate_stream",
        data=json.dumps(fields).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as reply:
        for line in reply:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def test_grpc_stream_pieces_add_up_to_the_answer(server):
    for model in ("chatglm2-tiny", "internlm2-tiny"):
        for fields, response, history in golden_cases(model):
            pieces, final_history, error = grpc_stream(server, f"{model}-stream", fields)
            assert error is None, error
            assert len([p for p in pieces if p]) > 1, pieces  # really streamed
            assert "".join(pieces) == response, (model, fields["prompt"])
            assert final_history == history


def test_generate_stream_endpoint(server):
    fields, response, history = next(golden_cases("internlm2-tiny"))
    events = sse_stream(server, "internlm2-tiny-stream", fields)
    assert len(events) > 2
    assert "".join(e["response"] for e in events) == response
    final = events[-1]["history"]
    assert (flatten(final) if final and isinstance(final[0], list) else final) == flatten(history)
    assert events[-1]["finish_reason"] in ("stop", "length")
    # A non-decoupled model streams its single response the same way.
    single = sse_stream(server, "internlm2-tiny", fields)
    assert len(single) == 1 and single[0]["response"] == response


def test_64_concurrent_streams_all_answer_correctly(server):
    queries = ["你好", "hello world", "What is RMSNorm?", "请用一句话介绍你自己。"]

    def fields(query):
        return {"prompt": query, "temperature": "0", "max_new_tokens": "24"}

    expected = {q: http_chat(server, "chatglm2-tiny", fields(q))[0] for q in queries}

    def one(i):
        query = queries[i % 4]
        pieces, history, error = grpc_stream(server, "chatglm2-tiny-stream", fields(query), f"s{i}")
        assert error is None, error
        return query, "".join(pieces), history

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for query, text, history in results:
        assert text == expected[query], query
        assert history == [[query, text]]
    model = "chatglm2-tiny-stream"
    generated = sum(len(text) > 0 for _, text, _ in results)
    assert server.metric("llm_generated_tokens_total", model) >= generated
    assert server.metric("llm_prompt_tokens_total", model) > 64
    assert server.metric("llm_time_to_first_token_seconds_count", model) >= 64
    assert server.metric("llm_inter_token_latency_seconds_count", model) > 0
    assert server.metric("llm_requests_running", model) == 0
    assert server.metric("llm_requests_waiting", model) == 0
    # Where the engine's steps spent their time: the phases add up to a positive total, and
    # steps ran several sequences at once on average.
    steps = server.metric("llm_engine_steps_total", model)
    assert steps > 0
    assert server.metric("llm_engine_step_sequences_total", model) > steps
    assert server.metric("llm_engine_step_seconds_total", model) > 0


@pytest.mark.parametrize("processes,warmup", [(1, 0), (2, 1000)])
def test_the_load_tool_reports_what_it_ran(server, processes, warmup):
    """tools/load.py, in one process and spread over two: every request it was given
    answered, the tokens the model reported, latencies measured (none after a warm-up
    longer than the run, all of them with it)."""
    model = "chatglm2-tiny-stream"
    generated_before = server.metric("llm_generated_tokens_total", model)
    command = [sys.executable, str(REPO / "tools" / "load.py"), "--url", server.grpc_url,
               "--model", model, "--concurrency", "6", "--requests", "12",
               "--max-new-tokens", "8", "--processes", str(processes), "--warmup", str(warmup)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["processes"] == processes
    assert report["requests"] == 12 and report["errors"] == 0, report
    generated = server.metric("llm_generated_tokens_total", model) - generated_before
    assert report["output_tokens"] == generated, report
    assert report["output_tokens_per_s"] > 0
    assert report["tokens_per_response"] >= 1  # a streamed piece holds one token or more
    assert report["ttft_ms_p99_with_warmup"] > 0
    if warmup:
        assert report["ttft_ms_p50"] is None and report["itl_ms_p99"] is None, report
    else:
        assert 0 < report["ttft_ms_p50"] <= report["ttft_ms_p99"] == report["ttft_ms_p99_with_warmup"]


def test_the_load_tool_can_give_every_request_a_prompt_of_its_own(server):
    """--random-words: fresh prompts of that many words (no block of them shared beyond the
    first, which holds the chat template), and the mean prompt length the server reported."""
    model = "chatglm2-tiny-stream"
    prompt_before = server.metric("llm_prompt_tokens_total", model)
    hits_before = server.metric("llm_prefix_cache_hit_tokens_total", model)
    command = [sys.executable, str(REPO / "tools" / "load.py"), "--url", server.grpc_url,
               "--model", model, "--concurrency", "4", "--requests", "12",
               "--max-new-tokens", "4", "--random-words", "40"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["requests"] == 12 and report["errors"] == 0, report
    prompt_tokens = server.metric("llm_prompt_tokens_total", model) - prompt_before
    assert report["prompt_tokens_mean"] * 12 == prompt_tokens
    assert report["prompt_tokens_mean"] > 40 + 15  # the words and ChatGLM2's template
    # The block size is 16: repeated prompts of this length would hit 48 tokens or more each.
    assert server.metric("llm_prefix_cache_hit_tokens_total", model) - hits_before <= 16 * 12


def test_runs_with_another_prompt_seed_send_prompts_never_sent_before(server):
    """--prompt-seed: a run with the seed of an earlier run resends its prompts (the prefix
    cache serves them), a run with a seed of its own sends new ones (as each load level of
    scripts/gpu/lib/serve_load.sh does)."""
    model = "chatglm2-tiny-stream"

    def run(seed):
        hits_before = server.metric("llm_prefix_cache_hit_tokens_total", model)
        command = [sys.executable, str(REPO / "tools" / "load.py"), "--url", server.grpc_url,
                   "--model", model, "--concurrency", "4", "--requests", "8", "--processes", "1",
                   "--max-new-tokens", "2", "--random-words", "40", "--prompt-seed", seed]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["requests"] == 8 and report["errors"] == 0 and report["prompt_seed"] == seed
        return server.metric("llm_prefix_cache_hit_tokens_total", model) - hits_before

    run("level-a")
    # The same seed: each session's first prompts again, their full blocks cached.
    assert run("level-a") >= 4 * 32
    # A seed of its own: at most the block holding the chat template is shared.
    assert run("level-b") <= 16 * 8


def tcp_connections(pid, port):
    """Established TCP connections of process `pid` to `port` on this machine (/proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            # local, remote (address:port in hex), state (01: established), ..., inode
            if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def test_the_load_tools_sessions_share_one_connection_a_process(server):
    """tools/load.py's sessions of one worker process stream over one TCP connection (their
    clients' channels share gRPC's subchannel), so 1,024 streams over 32 processes take 32
    connections, not 1,024."""
    port = int(server.grpc_url.rsplit(":", 1)[1])
    command = [sys.executable, str(REPO / "tools" / "load.py"), "--url", server.grpc_url,
               "--model", "chatglm2-tiny-stream", "--concurrency", "8", "--processes", "1",
               "--duration", "4", "--max-new-tokens", "16"]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while load.poll() is None:
        try:
            seen.append(tcp_connections(load.pid, port))
        except OSError:
            break
        time.sleep(0.2)
    out, err = load.communicate(timeout=120)
    assert load.returncode == 0, err
    report = json.loads(out)
    assert report["errors"] == 0 and report["requests"] > 8, report
    assert max(seen) == 1, f"connections seen while 8 sessions streamed: {seen}"


def test_one_instance_serves_1024_concurrent_streams(tmp_path):
    """max_num_seqs 1,024 (issue 21's most streams an instance): tools/load.py drives 1,024
    sessions over two processes, each a fresh prompt, against one instance; every request is
    answered, and the engine ran them together (the mean sequences a step, over the level's
    steps, far above what the default 64 seats allow)."""
    repository = tmp_path / "repository"
    (repository / "wide" / "1").mkdir(parents=True)
    base = (TEST_REPOSITORY / "chatglm2-tiny-stream" / "config.pbtxt").read_text()
    text = (base.replace('name: "chatglm2-tiny-stream"', 'name: "wide"')
            .replace("../../../fixtures/chatglm2-tiny", str(FIXTURES / "chatglm2-tiny"))
            .replace("count: 2", "count: 1"))
    for key, value in (("max_num_seqs", "1024"), ("max_num_batched_tokens", "8192")):
        text += f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
    (repository / "wide" / "config.pbtxt").write_text(text)
    server = Server(repository, tmp_path / "server").wait_live()
    try:
        server.wait_model_ready("wide")
        command = [sys.executable, str(REPO / "tools" / "load.py"), "--url", server.grpc_url,
                   "--model", "wide", "--concurrency", "1024", "--requests", "1024",
                   "--processes", "2", "--max-new-tokens", "64", "--random-words", "8",
                   "--timeout", "600"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        report = json.loads(run.stdout)
        assert report["requests"] == 1024 and report["errors"] == 0, report
        steps = server.metric("llm_engine_steps_total", "wide")
        mean_batch = server.metric("llm_engine_step_sequences_total", "wide") / steps
        assert mean_batch > 256, (mean_batch, steps, report)
        assert server.metric("llm_requests_running", "wide") == 0
    finally:
        server.stop()


def test_a_bad_request_on_a_stream_gets_its_error(server):
    pieces, history, error = grpc_stream(server, "chatglm2-tiny-stream", {"prompt": "hi", "top_p": "7"})
    assert error is not None and "top_p" in str(error)
    pieces, history, error = grpc_stream(server, "chatglm2-tiny-stream", {"prompt": "hi", "max_new_tokens": "4"})
    assert error is None and history


def test_statistics_count_streamed_requests(server):
    """Decoupled models report each request's statistics when its last response is out."""
    def counts():
        url = f"http://{server.http_url}/v2/models/internlm2-tiny-stream/stats"
        with urllib.request.urlopen(url) as reply:
            stats = json.loads(reply.read())["model_stats"][0]["inference_stats"]
        return int(stats["success"]["count"]), int(stats["fail"]["count"])

    success, fail = counts()
    for _ in range(2):
        pieces, history, error = grpc_stream(server, "internlm2-tiny-stream", {"prompt": "hi", "max_new_tokens": "4"})
        assert error is None and history
    pieces, history, error = grpc_stream(server, "internlm2-tiny-stream", {"prompt": "hi", "seed": "x"})
    assert error is not None and "seed" in str(error)
    deadline = time.time() + 5  # reported just after the last response went out
    while counts() != (success + 2, fail + 1) and time.time() < deadline:
        time.sleep(0.1)
    assert counts() == (success + 2, fail + 1)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A model slow enough to cancel mid-answer: random weights at a small shape with the
    real InternLM2 vocabulary (the output projection dominates each step), decoupled
    (`slow`) and not (`slow-unary`)."""
    tmp_path = tmp_path_factory.mktemp("slow")
    weights = tmp_path / "weights"
    weights.mkdir()
    config = json.loads((FIXTURES / "internlm2-tiny" / "config.json").read_text())
    config.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=92544, max_position_embeddings=4096,
                  rope_scaling=None, eos_token_id=2)
    (weights / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURES / "internlm2" / "tokenizer.model", weights)
    repository = tmp_path / "repository"
    base = (TEST_REPOSITORY / "internlm2-tiny-stream" / "config.pbtxt").read_text()
    for name, decoupled in (("slow", True), ("slow-unary", False)):
        (repository / name / "1").mkdir(parents=True)
        text = (base.replace('name: "internlm2-tiny-stream"', f'name: "{name}"')
                .replace("../../../fixtures/internlm2-tiny", str(weights))
                .replace('string_value: "512"', 'string_value: "4096"')
                .replace("count: 2", "count: 1")
                + 'parameters { key: "load_format" value { string_value: "dummy" } }\n')
        if not decoupled:
            text = text.replace("model_transaction_policy { decoupled: true }\n", "")
        (repository / name / "config.pbtxt").write_text(text)
    server = Server(repository, tmp_path / "server").wait_live()
    server.wait_model_ready("slow")
    server.wait_model_ready("slow-unary")
    yield server
    server.stop()


def wait_for_cancellation(server, model, count):
    """Waits for the `count`-th cancellation of `model`; checks its sequence and blocks are gone."""
    deadline = time.time() + 10
    while server.metric("llm_requests_cancelled_total", model) < count:
        assert time.time() < deadline, server.log_text()
        time.sleep(0.1)
    lines = [l for l in server.log_text().splitlines() if "request cancelled by the client" in l]
    generated = int(lines[-1].split("after ")[1].split()[0])
    assert generated < 1500, lines[-1]  # far from the 3000 it was asked for
    while server.metric("llm_requests_running", model) != 0:  # the sequence is gone
        assert time.time() < deadline
        time.sleep(0.1)
    assert server.metric("llm_kv_blocks_used", model) == 0  # and its blocks are free


LONG = {"prompt": "你好", "max_new_tokens": "3000", "temperature": "0"}


def test_a_client_that_goes_away_stops_its_sequence(slow_server):
    server = slow_server
    before = server.metric("llm_requests_cancelled_total", "slow")
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/slow/generate_stream",
                                     data=json.dumps(LONG).encode(),
                                     headers={"Content-Type": "application/json"})
    reply = urllib.request.urlopen(request, timeout=60)
    first = reply.readline()
    assert first.startswith(b"data: "), first
    reply.close()  # the client goes away after the first piece
    wait_for_cancellation(server, "slow", before + 1)
    # The engine is free again: a short request is answered at once.
    started = time.time()
    events = sse_stream(server, "slow", {"prompt": "hi", "max_new_tokens": "4"})
    assert events and time.time() - started < 10


def test_a_cancelled_grpc_stream_stops_its_sequence(slow_server):
    server = slow_server
    before = server.metric("llm_requests_cancelled_total", "slow")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    pieces = queue.Queue()
    client.start_stream(callback=lambda result, error: pieces.put((result, error)))
    client.async_stream_infer("slow", make_inputs(grpcclient, LONG), enable_empty_final_response=True)
    result, error = pieces.get(timeout=60)
    assert error is None
    client.stop_stream(cancel_requests=True)
    wait_for_cancellation(server, "slow", before + 1)


def test_a_cancelled_unary_grpc_call_stops_its_sequence(slow_server):
    server = slow_server
    before = server.metric("llm_requests_cancelled_total", "slow-unary")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers = queue.Queue()
    call = client.async_infer("slow-unary", make_inputs(grpcclient, LONG),
                              callback=lambda result, error: answers.put((result, error)))
    deadline = time.time() + 10
    while server.metric("llm_generated_tokens_total", "slow-unary") < 2:  # it is generating
        assert time.time() < deadline
        time.sleep(0.05)
    call.cancel()
    result, error = answers.get(timeout=10)
    assert error is not None and "CANCELLED" in str(error)
    wait_for_cancellation(server, "slow-unary", before + 1)
