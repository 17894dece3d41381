"""OpenAI-style `messages` (and InternLM2's `tools`) through a real tritonserver: the prompt is
LMDeploy's internlm2 template token for token (the fixture goldens), the answer equals the raw
continuation of that prompt, ChatGLM2 takes user/assistant turns as its chat history and
refuses tools, streaming adds up to the whole answer, and bad conversations name the input.
The tiny models never call a tool; the parsing of a call is tested on the golden reply's ids
in tests/messages.rs."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import FIXTURES, raw_outputs as read, stream_responses

GOLDEN = json.loads((FIXTURES / "internlm2-tiny" / "tokenizer_golden.json").read_text())
CASES = {case["name"]: case for case in GOLDEN["lmdeploy_internlm2_template"]["cases"]}
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}


def client_for(server, protocol):
    module = httpclient if protocol == "http" else grpcclient
    url = server.http_url if protocol == "http" else server.grpc_url
    return module, module.InferenceServerClient(url)


def tensors(module, **values):
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            t = module.InferInput(name, [1], "BOOL")
            t.set_data_from_numpy(np.array([value], dtype=bool))
        else:
            if not isinstance(value, str):
                value = json.dumps(value)
            t = module.InferInput(name, [1], "BYTES")
            t.set_data_from_numpy(np.array([value.encode()], dtype=object))
        out.append(t)
    return out


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", ["plain_default_system", "tools_default_system"])
def test_internlm2_conversation_is_lmdeploys_prompt_continued(server, protocol, name):
    case = CASES[name]
    module, client = client_for(server, protocol)
    inputs = {"messages": case["messages"], "sampling_parameters": GREEDY}
    if case["tools"] is not None:
        inputs["tools"] = case["tools"]
    got = read(client.infer("internlm2-tiny", tensors(module, **inputs)))
    # The same prompt text sent raw: LMDeploy's rendering, continued the same way.
    raw = read(client.infer("internlm2-tiny", tensors(
        module, text_input=case["prompt"], sampling_parameters=GREEDY, exclude_input_in_output=True,
        return_num_input_tokens=True)))
    assert got["num_input_tokens"] == len(case["input_ids_with_bos"]) == raw["num_input_tokens"]
    assert got["text_output"] == raw["text_output"]
    # A chat completion reports why it ended and its usage without being asked.
    assert got["finish_reason"] == "length" and got["num_output_tokens"] == 12
    if case["tools"] is None:
        assert "tool_calls" not in got
    else:
        assert json.loads(got["tool_calls"]) == []


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_chatglm2_messages_are_its_chat_history(server, protocol):
    module, client = client_for(server, protocol)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "讲个故事"}]
    got = read(client.infer("chatglm2-tiny", tensors(
        module, messages=messages, sampling_parameters={"temperature": 0, "max_tokens": 16})))
    seed = client.infer("chatglm2-tiny", [
        *tensors(module, prompt="讲个故事", temperature="0", max_new_tokens="16"),
        history_tensor(module, ["你好", "你好！"])])
    assert got["text_output"] == seed.as_numpy("response").reshape(-1)[0].decode()
    assert got["finish_reason"] in ("stop", "length")


def history_tensor(module, flat):
    t = module.InferInput("history", [len(flat)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in flat], dtype=object))
    return t


@pytest.mark.parametrize("model, inputs, expected", [
    ("chatglm2-tiny", {"messages": [{"role": "user", "content": "x"}], "tools": CASES["tools_default_system"]["tools"]},
     "tools: the chatglm2 chat format has no tool calls"),
    ("chatglm2-tiny", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]},
     "messages: ChatGLM2 has no system prompt"),
    ("internlm2-tiny", {"messages": "[{\"role\": \"user\"", "sampling_parameters": GREEDY}, "messages: not valid JSON"),
    ("internlm2-tiny", {"messages": [{"role": "robot", "content": "x"}]}, "messages: message 0 has role \"robot\""),
    ("internlm2-tiny", {"messages": [{"role": "user", "content": "x"}], "tools": {"name": "f"}}, "tools: must be a JSON list"),
    ("internlm2-tiny", {"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt, messages: "),
    ("internlm2-tiny", {"text_input": "x", "tools": CASES["tools_default_system"]["tools"]}, "tools: go with messages"),
])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_conversations_name_the_input(server, protocol, model, inputs, expected):
    module, client = client_for(server, protocol)
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, tensors(module, **inputs))
    assert expected in error.value.message(), error.value.message()
    # The model still serves.
    ok = read(client.infer(model, tensors(module, messages=[{"role": "user", "content": "hi"}],
                                          sampling_parameters={"temperature": 0, "max_tokens": 2})))
    assert ok["num_output_tokens"] <= 2


@pytest.mark.parametrize("with_tools", [False, True])
def test_streamed_conversation_adds_up_to_the_whole_answer(server, with_tools):
    case = CASES["tools_default_system" if with_tools else "plain_default_system"]
    inputs = {"messages": case["messages"], "sampling_parameters": GREEDY}
    if with_tools:
        inputs["tools"] = case["tools"]
    whole = read(grpcclient.InferenceServerClient(server.grpc_url).infer(
        "internlm2-tiny", tensors(grpcclient, **inputs)))
    streamed = stream_responses(server, "internlm2-tiny-stream", tensors(grpcclient, stream=True, **inputs))
    responses = [read(result) for result in streamed]
    assert len(responses) > 2
    assert "".join(r.get("text_output", "") for r in responses) == whole["text_output"]
    last = responses[-1]
    assert last["finish_reason"] == whole["finish_reason"]
    assert sum(r["num_output_tokens"] for r in responses) == whole["num_output_tokens"] == 12
    assert last.get("tool_calls") == whole.get("tool_calls")
    assert all("tool_calls" not in r for r in responses[:-1])


def test_the_generate_endpoint_takes_messages_and_tools(server):
    case = CASES["tools_default_system"]
    body = {"messages": json.dumps(case["messages"]), "tools": json.dumps(case["tools"]),
            "sampling_parameters": json.dumps(GREEDY)}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/internlm2-tiny/generate",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer = json.loads(reply.read())
    assert answer["num_input_tokens"] == len(case["input_ids_with_bos"])
    assert answer["finish_reason"] == "length" and json.loads(answer["tool_calls"]) == []
    body["tools"] = "not json"
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/internlm2-tiny/generate",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 400 and "tools: not valid JSON" in error.value.read().decode()
