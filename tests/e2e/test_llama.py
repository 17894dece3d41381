"""The Llama family through a real tritonserver: Vicuna chats as FastChat's CLI chats
(`vicuna_v1.1`, and `llama-2` chosen by the `chat_format` parameter), Llama-3 chats with its own
Hugging Face chat template and stops at `<|eot_id|>`, over HTTP and gRPC, streamed and not,
as `prompt` + `history`, as `messages` and as raw `text_input`; answers equal the goldens
recorded from transformers and FastChat."""

import json

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import FIXTURES, TEST_REPOSITORY, Server, raw_outputs, stream_responses
from test_messages import tensors
from test_seed_interface import flatten, grpc_chat, http_chat
from test_streaming import grpc_stream


def vicuna_cases(template):
    cases = json.loads((FIXTURES / "vicuna-tiny" / "chat_golden.json").read_text())["cases"]
    for case in cases:
        # FastChat's CLI never sends an empty query; a request's prompt may not be one.
        if case["template"] != template or not case["query"]:
            continue
        fields = {"prompt": case["query"], "history": flatten(case["history"]), "temperature": "0",
                  "max_new_tokens": str(case["gen_params"]["max_new_tokens"])}
        if not case["system_message_is_default"]:
            fields["system_prompt"] = case["system_message"] or ""
        response = case["response_stripped"]
        yield fields, response, case["history"] + [[case["query"], response]], case


def llama3_cases():
    for case in json.loads((FIXTURES / "llama3-tiny" / "chat_golden.json").read_text())["cases"]:
        messages = case["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        history = [[q["content"], a["content"]] for q, a in zip(turns[:-1:2], turns[1:-1:2])]
        fields = {"prompt": turns[-1]["content"], "history": flatten(history), "temperature": "0",
                  "max_new_tokens": str(case["max_new_tokens"])}
        if system is not None:
            fields["system_prompt"] = system
        yield fields, case["response"], history + [[turns[-1]["content"], case["response"]]], case


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_vicuna_chats_as_fastchat(server, protocol):
    chat = http_chat if protocol == "http" else grpc_chat
    cases = list(vicuna_cases("vicuna_v1.1"))
    assert len(cases) == 4
    for fields, response, history, _ in cases:
        assert chat(server, "vicuna-tiny", fields) == (response, history), fields["prompt"]
    assert "chat format vicuna_v1.1 (no chat_template in the folder" in server.log_text()


def test_llama2_format_chosen_by_the_parameter_streams_fastchats_answers(server):
    cases = list(vicuna_cases("llama-2"))
    assert len(cases) == 2
    for fields, response, history, _ in cases:
        pieces, final_history, error = grpc_stream(server, "vicuna-tiny-llama2", fields)
        assert error is None, error
        assert "".join(pieces) == response, fields["prompt"]
        assert final_history == history
    assert "chat format llama-2 (the chat_format parameter)" in server.log_text()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_llama3_chats_with_its_own_template(server, protocol):
    chat = http_chat if protocol == "http" else grpc_chat
    for fields, response, history, _ in llama3_cases():
        assert chat(server, "llama3-tiny", fields) == (response, history), fields["prompt"]
    assert "chat format hf (the folder's tokenizer_config.json has a chat_template)" in server.log_text()


def test_llama3_streams_and_stops_at_eot(server):
    stopped = 0
    for fields, response, history, case in llama3_cases():
        pieces, final_history, error = grpc_stream(server, "llama3-tiny-stream", fields)
        assert error is None, error
        assert "".join(pieces) == response and final_history == history, fields["prompt"]
        stopped += case["stopped_on"] == 1265
    assert stopped == 2


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_llama3_messages_and_raw_text_are_the_templates_prompt(server, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    for _, _, _, case in llama3_cases():
        greedy = {"temperature": 0, "max_tokens": case["max_new_tokens"]}
        got = raw_outputs(client.infer("llama3-tiny", tensors(
            module, messages=case["messages"], sampling_parameters=greedy)))
        assert got["num_input_tokens"] == case["prompt_len"]
        assert got["text_output"] == case["response"]
        assert got["finish_reason"] == ("stop" if case["stopped_on"] else "length")
        # The rendered prompt sent raw: it starts with <|begin_of_text|>, which is not doubled.
        raw = raw_outputs(client.infer("llama3-tiny", tensors(
            module, text_input=case["prompt_text"], sampling_parameters=greedy,
            return_num_input_tokens=True, return_finish_reason=True)))
        assert raw["num_input_tokens"] == case["prompt_len"]
        assert raw["finish_reason"] == got["finish_reason"]


def test_vicuna_messages_with_a_system_turn(server):
    _, response, _, case = next(vicuna_cases("vicuna_v1.1"))
    messages = [{"role": "system", "content": case["system_message"]},
                {"role": "user", "content": case["query"]}]
    responses = stream_responses(server, "vicuna-tiny-llama2", tensors(
        grpcclient, messages=messages, stream=True, sampling_parameters={"temperature": 0, "max_tokens": 8},
        return_num_input_tokens=True))
    # vicuna-tiny-llama2 renders them with FastChat's llama-2 template: the system block.
    counts = [raw_outputs(r).get("num_input_tokens") for r in responses]
    assert counts[0] is not None and counts[0] > 40
    with pytest.raises(Exception, match="tools"):
        stream_responses(server, "vicuna-tiny-llama2", tensors(
            grpcclient, messages=messages, tools=[{"name": "f"}], stream=True))


def test_an_unknown_or_impossible_chat_format_fails_the_load(tmp_path):
    repository = tmp_path / "repository"
    for name, value in (("unknown", "alpaca"), ("notemplate", "hf"), ("otherfamily", "internlm2")):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(
            (TEST_REPOSITORY / "vicuna-tiny" / "config.pbtxt").read_text()
            .replace('name: "vicuna-tiny"', f'name: "{name}"')
            .replace("../../../fixtures/vicuna-tiny", str(FIXTURES / "vicuna-tiny"))
            + f'parameters {{ key: "chat_format" value {{ string_value: "{value}" }} }}\n')
    server = Server(repository, tmp_path / "server", "--exit-on-error=false").wait_live()
    try:
        import time
        deadline = time.time() + 60
        while server.log_text().count("failed to load") < 3:
            assert time.time() < deadline, server.log_text()
            time.sleep(0.3)
        log = server.log_text()
        assert "parameter chat_format: \\\"alpaca\\\" is not one of" in log, log
        assert "chat_format hf:" in log and "has no chat_template" in log, log
        assert "chat_format internlm2: that prompt is internlm2's own; this model is llama" in log, log
        assert server.process.poll() is None
    finally:
        server.stop()
