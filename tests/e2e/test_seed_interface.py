"""The seed interface through a real tritonserver: golden chats over HTTP, gRPC and the
generate endpoint, equality with `triton-llm generate`, a multi-turn conversation,
concurrency, dynamic batching and every bad input of the interface."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import FIXTURES, cli_generate

INTERNLM2_SESSION_LEN = 512  # tests/model_repository/internlm2-tiny/config.pbtxt


def flatten(history):
    return [text for pair in history for text in pair]


def make_inputs(module, fields, batched=False):
    inputs = []
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        array = np.array(values, dtype=object).reshape([1, len(values)] if batched else [len(values)])
        tensor = module.InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def read_answer(result):
    response = result.as_numpy("response").reshape(-1)[0].decode()
    history = result.as_numpy("history")
    history = history.reshape(-1, 2) if history.size else history.reshape(0, 2)
    return response, [[q.decode(), a.decode()] for q, a in history]


def http_chat(server, model, fields, batched=False):
    client = httpclient.InferenceServerClient(server.http_url)
    return read_answer(client.infer(model, make_inputs(httpclient, fields, batched)))


def grpc_chat(server, model, fields):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    return read_answer(client.infer(model, make_inputs(grpcclient, fields)))


def golden_cases(model):
    cases = json.loads((FIXTURES / model / "chat_golden.json").read_text())["cases"]
    for case in cases:
        fields = {"prompt": case["query"], "history": flatten(case["history_in"]), "temperature": "0"}
        if model.startswith("chatglm2"):
            fields["max_token"] = str(case["max_length"])
        else:
            fields["max_new_tokens"] = str(case["max_new_tokens"])
            if not case["meta_instruction_is_default"]:
                fields["system_prompt"] = case["meta_instruction"]
        yield fields, case["response"], case["history_out"]


# chatglm2-tiny-awq: the AWQ W4A16 checkpoint, computed with its packed 4-bit weights; its
# goldens are the original code on the dequantised weights.
@pytest.mark.parametrize("model", ["chatglm2-tiny", "internlm2-tiny", "chatglm2-tiny-awq"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_golden_chats(server, model, protocol):
    chat = http_chat if protocol == "http" else grpc_chat
    for fields, response, history in golden_cases(model):
        assert chat(server, model, fields) == (response, history), fields["prompt"]


@pytest.mark.parametrize("model", ["chatglm2-tiny", "internlm2-tiny"])
def test_generate_endpoint(server, model):
    fields, response, history = next(golden_cases(model))
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/generate",
        data=json.dumps(fields).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        body = json.loads(reply.read())
    assert body["response"] == response
    returned = body["history"]  # the generate endpoint may flatten the [n, 2] tensor
    assert (flatten(returned) if returned and isinstance(returned[0], list) else returned) == flatten(history)
    assert body["prompt_tokens"] > 0 and body["generated_tokens"] > 0
    assert body["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("model", ["chatglm2-tiny", "internlm2-tiny"])
def test_answers_equal_the_cli(server, model):
    history = [["你好", "你好！有什么可以帮你的吗？"]]
    session_len = INTERNLM2_SESSION_LEN if model.startswith("internlm2") else None
    expected = cli_generate(model, "hello world", history, session_len=session_len, max_new_tokens=20)
    fields = {"prompt": "hello world", "history": flatten(history), "temperature": "0", "max_new_tokens": "20"}
    for chat in (http_chat, grpc_chat):
        assert chat(server, model, fields) == (expected["response"], expected["history"])


def test_w8a16_answers_equal_the_cli_and_the_load_names_the_formats(server):
    # chatglm2-tiny quantised at load to int8 (model parameter quantization w8a16) answers as
    # the CLI does with --quantization w8a16 (how close its logits stay to the f32 model's is
    # tests/quantized.rs's to check).
    history = [["你好", "你好！有什么可以帮你的吗？"]]
    expected = cli_generate("chatglm2-tiny", "hello world", history, max_new_tokens=20,
                            quantization="w8a16")
    fields = {"prompt": "hello world", "history": flatten(history), "temperature": "0", "max_new_tokens": "20"}
    for chat in (http_chat, grpc_chat):
        assert chat(server, "chatglm2-tiny-w8a16", fields) == (expected["response"], expected["history"])
    assert expected["response"]
    log = server.log_text()
    assert "model chatglm2-tiny-w8a16: weights loaded for Cpu" in log and "w8a16 (quantised at load from float32)" in log, log
    assert "awq w4a16 g32, other tensors float16" in log, log


def test_bin_checkpoint_answers_like_safetensors(server):
    """chatglm2-tiny-bin serves the same weights from PyTorch .bin shards: the same answers
    as the safetensors model, greedy (its golden chats) and seeded sampling alike."""
    for fields, response, history in golden_cases("chatglm2-tiny-bin"):
        answer = http_chat(server, "chatglm2-tiny-bin", fields)
        assert answer == http_chat(server, "chatglm2-tiny", fields) == (response, history), fields["prompt"]
    sampled = {"prompt": "hello", "temperature": "0.9", "top_k": "0", "seed": "11", "max_new_tokens": "24"}
    for chat in (http_chat, grpc_chat):
        assert chat(server, "chatglm2-tiny-bin", sampled) == chat(server, "chatglm2-tiny", sampled)


def test_three_turn_conversation_round_trips_its_history(server):
    history = []
    for query in ["你好", "What is RMSNorm?", "请用一句话介绍你自己。"]:
        fields = {"prompt": query, "history": flatten(history), "temperature": "0", "max_new_tokens": "16"}
        response, returned = grpc_chat(server, "chatglm2-tiny", fields)
        assert returned == history + [[query, response]]
        history = returned
    expected = cli_generate("chatglm2-tiny", "Third?", history, max_new_tokens=16)
    fields = {"prompt": "Third?", "history": flatten(history), "temperature": "0", "max_new_tokens": "16"}
    assert http_chat(server, "chatglm2-tiny", fields) == (expected["response"], expected["history"])
    # history_len 1 keeps only the last round, in the prompt and in the returned history.
    fields["history_len"] = "1"
    response, returned = http_chat(server, "chatglm2-tiny", fields)
    assert returned == [history[-1], ["Third?", response]]


def test_32_concurrent_clients_all_get_correct_answers(server):
    queries = ["你好", "hello world", "What is RMSNorm?", "请用一句话介绍你自己。"]
    models = ["chatglm2-tiny", "internlm2-tiny"]

    def fields(query):
        return {"prompt": query, "temperature": "0", "max_new_tokens": "24"}

    expected = {(m, q): http_chat(server, m, fields(q)) for m in models for q in queries}

    def one_client(i):
        model, query = models[i % 2], queries[(i // 2) % 4]
        chat = http_chat if i % 4 < 2 else grpc_chat
        return (model, query), chat(server, model, fields(query))

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one_client, range(32)))
    assert len(results) == 32
    for key, answer in results:
        assert answer == expected[key], key


def test_dynamic_batching_answers_every_request(server):
    good = [{"prompt": q, "temperature": "0", "max_new_tokens": "12"} for q in ["你好", "hello world", "hi"]]
    expected = [http_chat(server, "chatglm2-tiny", f) for f in good]
    requests = good + [{"prompt": "hi", "temperature": "hot"}]

    def send(fields):
        try:
            return http_chat(server, "chatglm2-tiny-batched", fields, batched=True)
        except InferenceServerException as error:
            return error

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, requests))
    assert results[:3] == expected
    assert isinstance(results[3], InferenceServerException)
    assert "temperature" in results[3].message()
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/chatglm2-tiny-batched/stats") as reply:
        stats = json.loads(reply.read())["model_stats"][0]
    assert max(int(b["batch_size"]) for b in stats["batch_stats"]) > 1, stats["batch_stats"]


def post_raw_prompt(server, model, raw_bytes):
    """An HTTP binary-data request whose `prompt` tensor is exactly `raw_bytes`."""
    header = json.dumps({
        "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw_bytes)}}],
    }).encode()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/infer",
        data=header + raw_bytes,
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


BAD_INPUTS = [
    # (fields, the input the message names, a phrase of the problem)
    ({"history": ["q", "a"]}, "prompt", "is required"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": b"\xff\xfehello"}, "prompt", "not valid UTF-8"),
    ({"prompt": "hi", "history": ["q0", "a0", "q1"]}, "history", "must be even"),
    ({"prompt": "hi", "history": [b"q", b"\xc3"]}, "history", "not valid UTF-8"),
    ({"prompt": "hi", "temperature": "warm"}, "temperature", "is not a number"),
    ({"prompt": "hi", "temperature": "nan"}, "temperature", "finite"),
    ({"prompt": "hi", "temperature": "-0.5"}, "temperature", ">= 0"),
    ({"prompt": "hi", "max_token": "-5"}, "max_token", "not a positive integer"),
    ({"prompt": "hi", "max_token": "99999999999999999999999"}, "max_token", "too large"),
    ({"prompt": "hi", "max_token": "3"}, "max_token", "prompt alone is"),
    ({"prompt": "hi", "history_len": "-1"}, "history_len", "not a non-negative integer"),
    ({"prompt": "hi", "top_p": "1.5"}, "top_p", "(0, 1]"),
    ({"prompt": "hi", "top_k": "many"}, "top_k", "not a non-negative integer"),
    ({"prompt": "hi", "repetition_penalty": "0"}, "repetition_penalty", "> 0"),
    ({"prompt": "hi", "seed": "-1"}, "seed", "unsigned"),
    ({"prompt": "hi", "max_new_tokens": "0"}, "max_new_tokens", "at least 1"),
    ({"prompt": "hi", "system_prompt": "be brief"}, "system_prompt", "no system prompt"),
    ({"prompt": "hi", "stop": [""]}, "stop", "must not be empty"),
    ({"prompt": "长" * 600}, "prompt", "do not fit the model's context"),
    ({"prompt": "hi", "history": ["长" * 100, "长" * 100]}, "prompt", "1 kept history pairs; a smaller history_len"),
]


@pytest.mark.parametrize("fields,input_name,problem", BAD_INPUTS, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_gets_its_error_and_the_next_request_succeeds(server, fields, input_name, problem):
    good = {"prompt": "你好", "temperature": "0", "max_new_tokens": "8"}
    with pytest.raises(InferenceServerException) as error:
        http_chat(server, "chatglm2-tiny", fields)
    assert error.value.status() == "400", error.value
    assert error.value.message().startswith(f"{input_name}: ") or f"{input_name}:" in error.value.message()
    assert problem in error.value.message(), error.value.message()
    with pytest.raises(InferenceServerException) as grpc_error:
        grpc_chat(server, "chatglm2-tiny", fields)
    assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert problem in grpc_error.value.message()
    assert http_chat(server, "chatglm2-tiny", good)[0]


def test_an_empty_system_prompt_is_none_on_chatglm2(server):
    fields = {"prompt": "你好", "temperature": "0", "max_new_tokens": "8"}
    assert http_chat(server, "chatglm2-tiny", {**fields, "system_prompt": ""}) == \
        http_chat(server, "chatglm2-tiny", fields)


def test_malformed_bytes_buffer_is_rejected(server):
    status, body = post_raw_prompt(server, "chatglm2-tiny", b"\x64\x00\x00\x00abc")
    assert status == 400, body
    assert "prompt: element 0 declares 100 bytes but only 3 follow" in body
    status, body = post_raw_prompt(server, "chatglm2-tiny", b"\x02\x00\x00\x00hi")
    assert status == 200, body


def test_instances_on_one_device_share_the_weights(server):
    # Both models run two KIND_CPU instances; each loads its weights once.
    log = server.log_text()
    for model in ("chatglm2-tiny", "internlm2-tiny"):
        assert log.count(f"model {model}: weights loaded for Cpu") == 1, log
        assert log.count(f"instance {model}_0_1: Cpu") == 1, log


def test_statistics_count_requests(server):
    def counts():
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/chatglm2-tiny/stats") as reply:
            stats = json.loads(reply.read())["model_stats"][0]["inference_stats"]
        return int(stats["success"]["count"]), int(stats["fail"]["count"])

    success, fail = counts()
    http_chat(server, "chatglm2-tiny", {"prompt": "hi", "max_new_tokens": "4"})
    with pytest.raises(InferenceServerException):
        http_chat(server, "chatglm2-tiny", {"prompt": "hi", "top_k": "x"})
    assert counts() == (success + 1, fail + 1)
