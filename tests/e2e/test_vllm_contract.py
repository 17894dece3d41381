"""The vLLM-backend and TensorRT-LLM-backend request contracts (text_input → text_output)
through a real tritonserver, next to the seed interface: greedy answers equal the CLI's raw
continuation of the same text, exclude_input_in_output, the additional outputs, streaming on
decoupled models, and bad requests naming the input."""

import json
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import FIXTURES, raw_outputs, required_env, stream_responses

TEXT = "The quick brown fox"


def cli_raw(model, text, max_new_tokens, **flags):
    """The reference: `triton-llm tokenize` (with the family's prefix) then `generate --ids`."""
    cli = required_env("TRITON_LLM_CLI")
    folder = str(FIXTURES / model)
    ids = json.loads(subprocess.run([cli, "tokenize", "--model", folder, text], check=True,
                                    capture_output=True, text=True).stdout)["ids"]
    args = [cli, "generate", "--model", folder, "--ids", ",".join(map(str, ids)),
            "--temperature", "0", "--max-new-tokens", str(max_new_tokens)]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def inputs(module, text, sampling=None, **flags):
    tensors = []
    t = module.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    tensors.append(t)
    if sampling is not None:
        s = module.InferInput("sampling_parameters", [1], "BYTES")
        s.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=object))
        tensors.append(s)
    for name, value in flags.items():
        if isinstance(value, bool):
            x = module.InferInput(name, [1], "BOOL")
            x.set_data_from_numpy(np.array([value], dtype=bool))
        elif isinstance(value, int):
            x = module.InferInput(name, [1], "INT32")
            x.set_data_from_numpy(np.array([value], dtype=np.int32))
        else:
            x = module.InferInput(name, [len(value)], "BYTES")
            x.set_data_from_numpy(np.array([v.encode() for v in value], dtype=object))
        tensors.append(x)
    return tensors


ALL_FLAGS = dict(return_finish_reason=True, return_num_input_tokens=True, return_num_output_tokens=True)


def read(result):
    out = raw_outputs(result)
    out["text"] = out.pop("text_output")
    return out


@pytest.mark.parametrize("model", ["chatglm2-tiny", "internlm2-tiny"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_greedy_text_output_equals_the_cli_raw_continuation(server, model, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    expected = cli_raw(model, TEXT, 12, ignore_eos=True)
    sampling = {"temperature": "0", "max_tokens": 12, "ignore_eos": True}
    # Default: the prompt leads the output (vLLM's exclude_input_in_output false).
    got = read(client.infer(model, inputs(module, TEXT, sampling, **ALL_FLAGS)))
    assert got == {"text": TEXT + expected["response"], "finish_reason": "length",
                   "num_input_tokens": expected["prompt_tokens"], "num_output_tokens": 12}
    got = read(client.infer(model, inputs(module, TEXT, sampling, exclude_input_in_output=True)))
    assert got == {"text": expected["response"]}


def test_tensorrt_llm_request_and_a_stop_string(server):
    client = httpclient.InferenceServerClient(server.http_url)
    expected = cli_raw("chatglm2-tiny", TEXT, 10, ignore_eos=True)["response"]
    stop = expected[3:6]
    assert stop and stop not in expected[:3]
    result = client.infer("chatglm2-tiny", inputs(
        httpclient, TEXT, {"temperature": 0, "ignore_eos": "true"}, max_tokens=10,
        stop_words=[stop], exclude_input_in_output=True, return_finish_reason=True))
    assert read(result) == {"text": expected[:expected.index(stop)], "finish_reason": "stop"}


def test_the_generate_endpoint_takes_the_vllm_request(server):
    body = {"text_input": TEXT, "exclude_input_in_output": True, "return_num_output_tokens": True,
            "sampling_parameters": json.dumps({"temperature": 0, "max_tokens": 5, "ignore_eos": True})}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/internlm2-tiny/generate",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer = json.loads(reply.read())
    assert answer["text_output"] == cli_raw("internlm2-tiny", TEXT, 5, ignore_eos=True)["response"]
    assert answer["num_output_tokens"] == 5


@pytest.mark.parametrize("stream", [True, False])
def test_decoupled_model_streams_only_when_asked(server, stream):
    model = "chatglm2-tiny-stream"
    expected = cli_raw("chatglm2-tiny", TEXT, 16, ignore_eos=True)
    sampling = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
    streamed = stream_responses(server, model, inputs(grpcclient, TEXT, sampling, stream=stream, **ALL_FLAGS))
    responses = [read(result) for result in streamed if result.as_numpy("text_output") is not None]
    if stream:
        assert len(responses) > 2
        assert "".join(r["text"] for r in responses) == expected["response"]
        assert all(r["num_input_tokens"] == expected["prompt_tokens"] for r in responses)
        assert responses[-1]["finish_reason"] == "length"
        # Each response counts its own tokens, as vLLM's do.
        assert sum(r["num_output_tokens"] for r in responses) == 16
        assert all(r["num_output_tokens"] >= 1 for r in responses[:-1])
    else:
        assert responses == [{"text": TEXT + expected["response"], "finish_reason": "length",
                              "num_input_tokens": expected["prompt_tokens"], "num_output_tokens": 16}]


@pytest.mark.parametrize("fields,message", [
    ({"sampling_parameters": "{not json"}, "sampling_parameters: is not valid JSON"),
    ({"sampling_parameters": json.dumps({"temperature": "hot"})}, "sampling_parameters: temperature: "),
    ({"prompt": "hi"}, "prompt, text_input: a request carries one of prompt"),
    ({"stream": True}, "stream: true needs a decoupled model"),
    ({"history": ["q", "a"]}, "history: belongs to the seed interface"),
])
def test_bad_requests_name_the_input(server, fields, message):
    body = {"text_input": TEXT, **fields}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/chatglm2-tiny/generate",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 400
    assert message in json.loads(error.value.read())["error"]
    # The model still serves the next request.
    client = httpclient.InferenceServerClient(server.http_url)
    assert read(client.infer("chatglm2-tiny", inputs(httpclient, TEXT, {"max_tokens": 2})))["text"].startswith(TEXT)


def test_grpc_error_for_both_inputs(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hi"], dtype=object))
    with pytest.raises(InferenceServerException, match="prompt, text_input"):
        client.infer("internlm2-tiny", inputs(grpcclient, TEXT) + [prompt])
