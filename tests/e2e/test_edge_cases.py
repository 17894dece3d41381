"""Edge cases of the seed interface through a real tritonserver: tensors the server itself
refuses, numbers at and past their limits, the context boundary, stop strings (streamed and
not), a dynamic batch and a gRPC stream that mix bad requests with good ones, clients that
go away, the outputs a client asks for, and the server's memory over a few hundred
requests."""

import gc
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from test_seed_interface import grpc_chat, http_chat, make_inputs
from test_streaming import grpc_stream

GOOD = {"prompt": "你好", "temperature": "0", "max_new_tokens": "8"}


@pytest.fixture(scope="module", autouse=True)
def close_lingering_clients():
    """A caught client error keeps its client, and that client's keep-alive HTTP connection,
    alive in a reference cycle; tritonserver's shutdown waits (up to its exit timeout) for
    such connections. Collecting the cycles after this module closes them."""
    yield
    gc.collect()


def assert_healthy(server):
    """The server is live and still answers a good request."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/live", timeout=5) as reply:
        assert reply.status == 200
    assert http_chat(server, "chatglm2-tiny", GOOD)[0]


def http_error(server, model, inputs, outputs=None):
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, inputs, outputs=outputs)
    return error.value


NUMPY_TYPES = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


def tensor(name, shape, datatype, values):
    t = httpclient.InferInput(name, shape, datatype)
    t.set_data_from_numpy(np.array(values, dtype=NUMPY_TYPES[datatype]).reshape(shape))
    return t


def prompt_tensor(text="hi"):
    return tensor("prompt", [1], "BYTES", [text])


SERVER_REFUSALS = [
    # (inputs, the input named, a phrase of the server's message): refused before the
    # backend sees them.
    ([tensor("prompt", [1], "INT32", [5])], "prompt", "data-type is 'INT32'"),
    ([tensor("prompt", [1], "FP32", [1.5])], "prompt", "data-type is 'FP32'"),
    ([prompt_tensor(), tensor("temperature", [1], "FP32", [0.0])], "temperature", "data-type is 'FP32'"),
    ([prompt_tensor(), tensor("max_token", [1], "INT64", [20])], "max_token", "data-type is 'INT64'"),
    ([prompt_tensor(), tensor("history", [2], "INT32", [1, 2])], "history", "data-type is 'INT32'"),
    ([tensor("prompt", [2], "BYTES", ["a", "b"])], "prompt", "Expected [1], got [2]"),
    ([tensor("prompt", [1, 1], "BYTES", ["a"])], "prompt", "Expected [1], got [1,1]"),
    ([tensor("prompt", [0], "BYTES", [])], "prompt", "Expected [1], got [0]"),
    ([prompt_tensor(), tensor("temperature", [0], "BYTES", [])], "temperature", "Expected [1], got [0]"),
    ([prompt_tensor(), tensor("history", [1, 2], "BYTES", ["q", "a"])], "history", "Expected [-1], got [1,2]"),
    ([prompt_tensor(), tensor("bogus", [1], "BYTES", ["x"])], "bogus", "unexpected inference input"),
]


@pytest.mark.parametrize("inputs,name,problem", SERVER_REFUSALS,
                         ids=[f"{name}-{i}" for i, (_, name, _) in enumerate(SERVER_REFUSALS)])
def test_the_server_refuses_wrong_types_shapes_and_names(server, inputs, name, problem):
    error = http_error(server, "chatglm2-tiny", inputs)
    assert error.status() == "400", error.message()
    assert f"'{name}'" in error.message() and problem in error.message(), error.message()


def test_an_unknown_output_is_refused_and_the_server_stays_healthy(server):
    error = http_error(server, "chatglm2-tiny", [prompt_tensor()],
                       outputs=[httpclient.InferRequestedOutput("nope")])
    assert error.status() == "400" and "unexpected inference output 'nope'" in error.message()
    assert_healthy(server)


BAD_VALUES = [
    # (input, value, a phrase of the message); beyond the cases of test_seed_interface.
    ("max_token", "0", "must be at least 1, got 0"),
    ("max_token", "abc", "not a positive integer"),
    ("max_token", "20.0", "not a positive integer"),
    ("max_token", "1e3", "not a positive integer"),
    ("max_token", "", "not a positive integer"),
    ("max_new_tokens", "-1", "not a positive integer"),
    ("max_new_tokens", "4.5", "not a positive integer"),
    ("temperature", "inf", "must be finite"),
    ("temperature", "-inf", "must be finite"),
    ("temperature", "1e309", "must be finite"),
    ("temperature", "1,5", "is not a number"),
    ("top_p", "0", "(0, 1]"),
    ("top_p", "-0.1", "(0, 1]"),
    ("top_p", "1.0000001", "(0, 1]"),
    ("top_p", "nan", "must be finite"),
    ("top_k", "-1", "not a non-negative integer"),
    ("top_k", "1.5", "not a non-negative integer"),
    ("repetition_penalty", "-1", "> 0"),
    ("repetition_penalty", "inf", "must be finite"),
    ("repetition_penalty", "nan", "must be finite"),
    ("history_len", "x", "not a non-negative integer"),
    ("seed", "18446744073709551616", "too large (at most 18446744073709551615)"),
    ("max_new_tokens", "18446744073709551616", "too large"),
    ("top_k", "+99999999999999999999", "too large"),
    ("temperature", b"\xc3\x28", "not valid UTF-8"),
    ("max_new_tokens", b"\xff", "not valid UTF-8"),
    ("stop", b"\xff", "not valid UTF-8"),
]


def test_every_bad_value_is_named_over_http_and_grpc(server):
    for name, value, problem in BAD_VALUES:
        fields = {"prompt": "hi", name: value}
        with pytest.raises(InferenceServerException) as error:
            http_chat(server, "chatglm2-tiny", fields)
        assert error.value.status() == "400", (name, value)
        assert error.value.message().startswith(f"{name}: ") and problem in error.value.message(), \
            (name, value, error.value.message())
        with pytest.raises(InferenceServerException) as error:
            grpc_chat(server, "chatglm2-tiny", fields)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert error.value.message().startswith(f"{name}: "), (name, value, error.value.message())
    assert_healthy(server)


def test_extreme_but_valid_values_are_served(server):
    greedy = {"prompt": "What is RMSNorm?", "temperature": "0", "max_new_tokens": "24"}
    expected = http_chat(server, "chatglm2-tiny", greedy)
    same_as_greedy = [
        {"temperature": "1e-9"}, {"temperature": "-0"}, {"temperature": " 0 "},
        {"temperature": "1", "top_k": "1", "seed": "3"},  # only the best token is left
        {"temperature": "1", "top_p": "1e-30", "seed": "3"},
        {"max_token": "1000000000"}, {"max_token": "18446744073709551615"},
        {"max_new_tokens": "+24"}, {"top_k": "18446744073709551615"},
        {"history_len": "18446744073709551615"}, {"seed": "18446744073709551615"},
        {"stop": []},
    ]
    for extra in same_as_greedy:
        assert http_chat(server, "chatglm2-tiny", {**greedy, **extra}) == expected, extra
    # Limits far past the context end the answer at the context, not with an error.
    for extra in ({"max_new_tokens": "1000000000"}, {"max_token": "1000000000"}):
        fields = {"prompt": "hi", "temperature": "1", "seed": "0", **extra}
        response, history = http_chat(server, "chatglm2-tiny", fields)
        assert response and history == [["hi", response]]
    # Temperatures far from 1 and penalties far from 1 still answer.
    for extra in ({"temperature": "1e30"}, {"temperature": "3.4e38"}, {"repetition_penalty": "1e-30"},
                  {"repetition_penalty": "1e30"}):
        http_chat(server, "chatglm2-tiny", {"prompt": "hi", "max_new_tokens": "4", **extra})


def generate(server, model, fields):
    """The generate endpoint's reply (its answer and response parameters), or (status, body)."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/generate",
                                     data=json.dumps(fields).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


@pytest.mark.parametrize("model,overhead", [("chatglm2-tiny", 15), ("internlm2-tiny", 243)])
def test_the_context_boundary(server, model, overhead):
    """The tiny fixtures' tokenizers make "a" * n a prompt of n + overhead tokens; both models
    serve 512 tokens. The last position left gives exactly one token; none left is an error."""
    last = generate(server, model, {"prompt": "a" * (511 - overhead), "temperature": "0"})
    assert (last["prompt_tokens"], last["generated_tokens"], last["finish_reason"]) == (511, 1, "length")
    status, message = generate(server, model, {"prompt": "a" * (512 - overhead), "temperature": "0"})
    assert status == 400
    assert message == "prompt: 512 tokens do not fit the model's context of 512 tokens"
    # max_token counts the prompt too: one more than the prompt leaves one token.
    prompt_tokens = generate(server, model, {"prompt": "hi", "max_new_tokens": "1"})["prompt_tokens"]
    one = generate(server, model, {"prompt": "hi", "temperature": "0", "max_token": str(prompt_tokens + 1)})
    assert (one["generated_tokens"], one["finish_reason"]) == (1, "length")
    # A long history fails the same way (the kept history is part of the prompt) and
    # history_len 0 drops it.
    history = ["长" * 100, "长" * 100]
    status, message = generate(server, model, {"prompt": "hi", "history": history})
    assert status == 400 and "do not fit the model's context" in message
    kept_none = generate(server, model, {"prompt": "hi", "history": history, "history_len": "0",
                                         "max_new_tokens": "2"})
    assert kept_none["prompt_tokens"] == prompt_tokens


def test_max_token_and_max_new_tokens_the_tighter_wins(server):
    prompt_tokens = generate(server, "chatglm2-tiny", {"prompt": "hi", "max_new_tokens": "1"})["prompt_tokens"]
    both = {"prompt": "hi", "temperature": "1", "seed": "0"}
    tight_total = generate(server, "chatglm2-tiny",
                           {**both, "max_token": str(prompt_tokens + 4), "max_new_tokens": "10"})
    tight_new = generate(server, "chatglm2-tiny", {**both, "max_token": "100", "max_new_tokens": "3"})
    assert (tight_total["generated_tokens"], tight_new["generated_tokens"]) == (4, 3)


def test_stop_strings_cut_the_answer_streamed_or_not(server):
    base = {"prompt": "What is RMSNorm?", "temperature": "0", "max_new_tokens": "40"}
    full, _ = http_chat(server, "chatglm2-tiny", base)
    assert len(full) > 10, full
    cases = [
        (full[5:8], full[:5]),                 # cut before the first occurrence
        (full[:1], ""),                        # at once: an empty answer
        (full, ""),
        (full + "zzz", full),                  # held back while it could match, then released
        ("never in it", full),
    ]
    for stop, expected in cases:
        fields = {**base, "stop": [stop]}
        response, history = http_chat(server, "chatglm2-tiny", fields)
        assert response == expected and history == [[base["prompt"], expected]], stop
        pieces, streamed_history, error = grpc_stream(server, "chatglm2-tiny-stream", fields)
        assert error is None and "".join(pieces) == expected and streamed_history == history, stop
    many = {**base, "stop": [f"zz{i}" for i in range(255)] + [full[5:8]]}  # the most taken
    assert http_chat(server, "chatglm2-tiny", many)[0] == full[:5]
    with pytest.raises(InferenceServerException, match="stop: at most 256 stop strings, got 257"):
        http_chat(server, "chatglm2-tiny", {**base, "stop": many["stop"] + ["one more"]})
    reply = generate(server, "chatglm2-tiny", {**base, "stop": [full[5:8]]})
    assert reply["finish_reason"] == "stop"


def test_a_dynamic_batch_with_bad_requests_answers_the_good_ones(server):
    """Requests with the same inputs are batched together; the bad ones (refused when decoded
    or, for a prompt over the context, in the engine) get their own errors."""
    model = "chatglm2-tiny-batched"

    def batch_sizes():
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats") as reply:
            stats = json.loads(reply.read())["model_stats"][0]["batch_stats"]
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}

    requests = [
        ({"prompt": "你好", "temperature": "0", "max_new_tokens": "8"}, None),
        ({"prompt": "", "temperature": "0", "max_new_tokens": "8"}, "prompt: must not be empty"),
        ({"prompt": b"\xff\xfe", "temperature": "0", "max_new_tokens": "8"}, "prompt: element 0 is not valid UTF-8"),
        ({"prompt": "hello world", "temperature": "0", "max_new_tokens": "8"}, None),
        ({"prompt": "a" * 600, "temperature": "0", "max_new_tokens": "8"}, "prompt: 615 tokens do not fit"),
        ({"prompt": "hi", "temperature": "0", "max_new_tokens": "0"}, "max_new_tokens: must be at least 1"),
        ({"prompt": "hi", "temperature": "0", "max_new_tokens": "8"}, None),
        ({"prompt": "hi", "temperature": "nan", "max_new_tokens": "8"}, "temperature: must be finite"),
    ]
    expected = [http_chat(server, "chatglm2-tiny", f) if e is None else None for f, e in requests]
    before = batch_sizes()

    def send(fields):
        try:
            return http_chat(server, model, fields, batched=True)
        except InferenceServerException as error:
            return error

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, [f for f, _ in requests]))
    for (fields, problem), result, answer in zip(requests, results, expected):
        if problem is None:
            assert result == answer, fields
        else:
            assert isinstance(result, InferenceServerException), fields
            assert result.status() == "400" and result.message().startswith(problem), result.message()
    after = batch_sizes()
    assert any(size > 1 and after[size] > before.get(size, 0) for size in after), (before, after)
    # A batch dimension other than 1 is one request's error too.
    error = http_error(server, model, [tensor("prompt", [2, 1], "BYTES", ["a", "b"])])
    assert error.message() == "prompt: batch dimension must be 1 (one conversation per request), got shape [2, 1]"


def test_bad_requests_on_one_grpc_stream_leave_the_others_alone(server):
    """Raw gRPC, to see which request each response answers."""
    def request(request_id, **fields):
        message = service_pb2.ModelInferRequest(model_name="chatglm2-tiny-stream", id=request_id)
        for name, value in fields.items():
            message.inputs.add(name=name, datatype="BYTES", shape=[1]).contents.bytes_contents.append(value)
        return message

    requests = [
        request("good-1", prompt="你好".encode(), temperature=b"0", max_new_tokens=b"12"),
        request("bad-top-p", prompt=b"hi", top_p=b"3"),
        request("bad-utf8", prompt=b"\xff"),
        request("good-2", prompt=b"hello world", temperature=b"0", max_new_tokens=b"12"),
        request("bad-missing", history=b"q"),
        request("bad-long", prompt="长".encode() * 600),
        request("good-3", prompt=b"hi", temperature=b"0", max_new_tokens=b"12", stop=b"zz"),
    ]
    channel = grpc.insecure_channel(server.grpc_url)
    texts, errors, finished = {}, {}, set()
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for reply in stub.ModelStreamInfer(iter(requests), timeout=60):
            request_id = reply.infer_response.id
            if reply.error_message:
                errors[request_id] = reply.error_message
                continue
            for output, raw in zip(reply.infer_response.outputs, reply.infer_response.raw_output_contents):
                if output.name == "response":
                    texts[request_id] = texts.get(request_id, "") + raw[4:].decode()
                if output.name == "history":
                    finished.add(request_id)
            if finished | set(errors) == {r.id for r in requests}:
                break
    finally:
        channel.close()
    assert errors["bad-top-p"] == "top_p: must be in (0, 1], got 3"
    assert errors["bad-utf8"].startswith("prompt: element 0 is not valid UTF-8")
    assert errors["bad-missing"] == "prompt: is required"
    assert errors["bad-long"] == "prompt: 1815 tokens do not fit the model's context of 512 tokens"
    assert finished == {"good-1", "good-2", "good-3"}
    for request_id, prompt in (("good-1", "你好"), ("good-2", "hello world"), ("good-3", "hi")):
        fields = {"prompt": prompt, "temperature": "0", "max_new_tokens": "12"}
        assert texts[request_id] == http_chat(server, "chatglm2-tiny", fields)[0], request_id


def request_counts(server, model):
    """(successes, failures) in the model's statistics."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats") as reply:
        stats = json.loads(reply.read())["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]), int(stats["fail"]["count"])


def test_clients_that_go_away_leave_the_server_healthy(server):
    model = "chatglm2-tiny"
    success, fail = request_counts(server, model)
    cancelled = server.metric("llm_requests_cancelled_total", model)
    # HTTP clients that send a request (a sampled answer to the end of the context) and
    # hang up at once, then one that hangs up in the middle of its body.
    body = json.dumps({"inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        {"name": "temperature", "shape": [1], "datatype": "BYTES", "data": ["1"]},
        {"name": "seed", "shape": [1], "datatype": "BYTES", "data": ["0"]},
    ]}).encode()
    host, port = server.http_url.split(":")
    for cut in [len(body)] * 10 + [20]:
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:cut])
    # The ten whole requests run to their end (HTTP hang-ups are not reported to backends);
    # the cut-short one never reaches the model.
    def wait_for_counts(expected):
        deadline = time.time() + 30
        while request_counts(server, model) != expected:
            assert time.time() < deadline, (request_counts(server, model), expected)
            time.sleep(0.1)

    wait_for_counts((success + 10, fail))
    # A gRPC deadline, well before the end of the answer, cancels it in the engine.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, make_inputs(grpcclient, {"prompt": "hi", "temperature": "1", "seed": "0"}),
                     client_timeout=0.02)
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    client.close()
    wait_for_counts((success + 10, fail + 1))
    assert server.metric("llm_requests_cancelled_total", model) == cancelled + 1
    assert server.metric("llm_requests_running", model) == 0
    assert server.metric("llm_requests_waiting", model) == 0
    assert_healthy(server)


@pytest.mark.parametrize("outputs", [["history"], ["response"]])
def test_only_the_requested_outputs_come_back(server, outputs):
    fields = {"prompt": "hi", "temperature": "0", "max_new_tokens": "12"}
    answer, history = http_chat(server, "chatglm2-tiny", fields)
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("chatglm2-tiny", make_inputs(httpclient, fields),
                          outputs=[httpclient.InferRequestedOutput(name) for name in outputs])
    assert [o["name"] for o in result.get_response()["outputs"]] == outputs
    # Streamed: only `response` pieces, or only the final history.
    stream = grpcclient.InferenceServerClient(server.grpc_url)
    replies = []
    stream.start_stream(callback=lambda result, error: replies.append((result, error)))
    try:
        stream.async_stream_infer("chatglm2-tiny-stream", make_inputs(grpcclient, fields),
                                  outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                                  enable_empty_final_response=True)
        def final(result):
            flag = result.get_response().parameters.get("triton_final_response")
            return flag is not None and flag.bool_param

        deadline = time.time() + 30
        while not any(result is not None and final(result) for result, _ in replies):
            assert time.time() < deadline and not any(error for _, error in replies), replies
            time.sleep(0.02)
    finally:
        stream.stop_stream()
    names = {o.name for r, _ in replies for o in r.get_response().outputs}
    assert names == set(outputs)
    if outputs == ["response"]:
        assert "".join(r.as_numpy("response")[0].decode() for r, _ in replies) == answer
    else:
        final = replies[-1][0].as_numpy("history")
        assert [[q.decode(), a.decode()] for q, a in final] == history


@pytest.mark.parametrize("model", ["chatglm2-tiny", "internlm2-tiny"])
def test_odd_but_valid_text_is_answered(server, model):
    for prompt in [" ", "\x00", "hi\x00there", "🎉" * 10, "\r\n\t", "<|im_end|>", "[gMASK]sop",
                   "<s></s><unk>", "\ufeff", "a\u0301" * 50, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
        fields = {"prompt": prompt, "temperature": "0", "max_new_tokens": "4"}
        response, history = http_chat(server, model, fields)
        assert history == [[prompt, response]], prompt
    response, history = http_chat(server, model, {"prompt": "hi", "history": ["", ""], "max_new_tokens": "4"})
    assert history == [["", ""], ["hi", response]]


def test_a_seed_gives_the_same_answer_on_every_path(server):
    fields = {"prompt": "What is RMSNorm?", "temperature": "0.9", "top_p": "0.9", "top_k": "20",
              "repetition_penalty": "1.1", "seed": "7", "max_new_tokens": "32"}
    expected = http_chat(server, "chatglm2-tiny", fields)
    assert grpc_chat(server, "chatglm2-tiny", fields) == expected
    assert http_chat(server, "chatglm2-tiny-batched", fields, batched=True) == expected
    assert http_chat(server, "chatglm2-tiny-nocache", fields) == expected
    pieces, history, error = grpc_stream(server, "chatglm2-tiny-stream", fields)
    assert error is None and ("".join(pieces), history) == expected
    others = {**fields, "prompt": "hi"}
    with ThreadPoolExecutor(8) as pool:  # sharing the engine's steps with other sequences
        results = list(pool.map(lambda i: http_chat(server, "chatglm2-tiny", fields if i % 2 else
                                                    {**others, "seed": str(i)}), range(8)))
    assert results[1::2] == [expected] * 4


def test_memory_stays_flat_over_hundreds_of_requests(server):
    """Good, refused and engine-failed requests, unary and streamed. The prompts repeat, so
    their KV blocks come from the prefix cache: new prompts would grow the RSS as the lazily
    mapped KV arena fills (up to its size, 32 MiB an instance here), which is not a leak."""
    http = httpclient.InferenceServerClient(server.http_url)

    def expect_error(model, fields):
        with pytest.raises(InferenceServerException):
            http.infer(model, make_inputs(httpclient, fields))

    def round_():
        http.infer("chatglm2-tiny", make_inputs(httpclient, GOOD))
        expect_error("chatglm2-tiny", {"prompt": "hi", "top_p": "9"})
        expect_error("chatglm2-tiny", {"prompt": "a" * 600})
        pieces, history, error = grpc_stream(server, "chatglm2-tiny-stream", GOOD)
        assert error is None and history
        pieces, history, error = grpc_stream(server, "chatglm2-tiny-stream", {"prompt": "hi", "seed": "x"})
        assert error is not None

    try:
        for _ in range(30):
            round_()
        time.sleep(0.5)
        before = server.rss_kib()
        for _ in range(120):
            round_()
        time.sleep(0.5)
        after = server.rss_kib()
    finally:
        http.close()
    print(f"tritonserver RSS after 30 warm-up rounds: {before} KiB; after 120 more (600 requests): {after} KiB")
    assert after - before < 1024, f"RSS grew from {before} KiB to {after} KiB"
