"""The requests Triton's OpenAI-compatible frontend (`openai_frontend` of the server repository,
started with `--backend vllm`) sends for a chat completion, built here as its
`_create_vllm_generate_request` builds them, against the real server. The frontend itself runs
only inside NVIDIA's tritonserver containers (it needs the in-process `tritonserver` Python
bindings), so it is not run here; what it does with a request is:

- the prompt: `tokenizer.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=True, tools=…, chat_template=--chat-template)` with transformers
  (rendered here with the same call, in genai-perf's virtualenv, which has transformers);
- the inputs: `text_input` [prompt], `stream` BOOL, `exclude_input_in_output` BOOL true,
  `sampling_parameters` (the request's fields with a value, as pydantic dumps them, plus
  `max_tokens`, default 16), `return_logprobs` false, `return_num_input_tokens` and
  `return_num_output_tokens` true;
- the answer: the `text_output` of the responses; usage from the responses that carry both
  counts (summed when streaming); a non-streaming answer is one response, or two with the
  second final.
"""

import json
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import required_env, stream_responses, write_hf_tokenizer

CONVERSATION = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "What is RMSNorm?"}]
# The defaults of the frontend's CreateChatCompletionRequest that are not None, in its order.
REQUEST_DEFAULTS = {"frequency_penalty": 0, "ignore_eos": False, "n": 1, "presence_penalty": 0,
                    "temperature": 0.7, "top_p": 1}
DEFAULT_MAX_TOKENS = 16  # openai_frontend/main.py --default-max-tokens


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """The frontend's prompt: transformers' apply_chat_template (in .venv-genai-perf) on the
    tokenizer folder deploy/openai-frontend/make_tokenizer.py writes for the model."""
    folders = {model: write_hf_tokenizer(tmp_path_factory.mktemp(f"frontend-{model}"), model)
               for model in ("internlm2-tiny", "chatglm2-tiny")}
    python = str(required_env("GENAI_PERF_BIN")).rsplit("/", 1)[0] + "/python"
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "job = json.load(sys.stdin)\n"
        "tokenizer = AutoTokenizer.from_pretrained(job['tokenizer'])\n"
        "print(json.dumps(tokenizer.apply_chat_template(conversation=job['messages'], tokenize=False,\n"
        "    add_generation_prompt=True, tools=None, chat_template=None)))\n"
    )

    def run(messages, model):
        job = {"tokenizer": str(folders[model]), "messages": messages}
        out = subprocess.run([python, "-c", script], input=json.dumps(job), capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)
    return run


def frontend_inputs(prompt, stream, **fields):
    """`_create_vllm_generate_request` for a chat completion with these request fields."""
    sampling = {**REQUEST_DEFAULTS, **{k: v for k, v in fields.items() if k != "max_tokens"}}
    sampling["max_tokens"] = fields.get("max_tokens", DEFAULT_MAX_TOKENS)
    tensors = []
    for name, value in [("text_input", prompt), ("stream", stream), ("exclude_input_in_output", True),
                        ("sampling_parameters", json.dumps(sampling)), ("return_logprobs", False),
                        ("return_num_input_tokens", True), ("return_num_output_tokens", True)]:
        if isinstance(value, bool):
            t = grpcclient.InferInput(name, [1], "BOOL")
            t.set_data_from_numpy(np.array([value], dtype=bool))
        else:
            t = grpcclient.InferInput(name, [1], "BYTES")
            t.set_data_from_numpy(np.array([value.encode()], dtype=object))
        tensors.append(t)
    return tensors


def frontend_call(server, model, prompt, stream, **fields):
    """Sends the request over gRPC streaming (the frontend's async_infer gets every response)
    and reads the answer and usage as the frontend does."""
    responses = stream_responses(server, model, frontend_inputs(prompt, stream, **fields))
    texts = [r.as_numpy("text_output").reshape(-1)[0].decode() for r in responses
             if r.as_numpy("text_output") is not None]
    usage = {"prompt_tokens": None, "completion_tokens": 0}
    for r in responses:
        if r.as_numpy("num_input_tokens") is None or r.as_numpy("num_output_tokens") is None:
            continue
        if usage["prompt_tokens"] is None:
            usage["prompt_tokens"] = int(r.as_numpy("num_input_tokens").reshape(-1)[0])
        usage["completion_tokens"] += int(r.as_numpy("num_output_tokens").reshape(-1)[0])
    return texts, usage, len(responses)


def seed_call(server, model, query, history, max_new_tokens, **fields):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = {"prompt": [query], "history": [t for pair in history for t in pair], "temperature": ["0"],
              "max_new_tokens": [str(max_new_tokens)], **{k: [v] for k, v in fields.items()}}
    tensors = []
    for name, values in inputs.items():
        t = grpcclient.InferInput(name, [len(values)], "BYTES")
        t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object))
        tensors.append(t)
    result = client.infer(model, tensors)
    parameters = result.get_response().parameters
    return (result.as_numpy("response").reshape(-1)[0].decode(),
            parameters["prompt_tokens"].int64_param, parameters["generated_tokens"].int64_param)


@pytest.mark.parametrize("family", ["internlm2", "chatglm2"])
def test_templates_render_the_chat_prompt(render, family):
    """The tokenizer folders make_tokenizer.py writes render InternLM2's own chat template (the
    fixture's, as InternLM2.5-7B-Chat's) and the shipped ChatGLM2 one into the prompts the seed
    interface builds (BOS aside: the backend adds none to a text that starts with it)."""
    if family == "internlm2":
        assert render(CONVERSATION, "internlm2-tiny") == ("<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"
                                        "<|im_start|>user\nWhat is RMSNorm?<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert render(CONVERSATION, "chatglm2-tiny") == \
            "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：What is RMSNorm?\n\n答："
        with pytest.raises(subprocess.CalledProcessError) as error:
            render([{"role": "system", "content": "s"}] + CONVERSATION, "chatglm2-tiny")
        assert "ChatGLM2 takes user and assistant turns only" in error.value.stderr


@pytest.mark.parametrize("model, stream", [("internlm2-tiny-stream", True), ("internlm2-tiny-stream", False),
                                           ("chatglm2-tiny-stream", True), ("chatglm2-tiny", False)])
def test_chat_completion_equals_the_seed_answer(server, render, model, stream):
    chatglm2 = model.startswith("chatglm2")
    prompt = render(CONVERSATION, "chatglm2-tiny" if chatglm2 else "internlm2-tiny")
    texts, usage, count = frontend_call(server, model, prompt, stream, temperature=0, max_tokens=24)
    # The seed interface: the same conversation (InternLM2's template has no system turn).
    seed_model = model.removesuffix("-stream")
    answer, prompt_tokens, generated = seed_call(
        server, seed_model, CONVERSATION[-1]["content"], [("你好", "你好！")], 24,
        **({} if chatglm2 else {"system_prompt": ""}))
    text = "".join(texts)
    # ChatGLM2's model.chat strips the answer; raw text comes as generated.
    assert (text.strip() if chatglm2 else text) == answer
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": generated}
    if stream:
        assert count > 2
    else:
        # What the frontend's non-streaming check accepts.
        assert count in (1, 2) and texts[0] == text


def test_stop_and_defaults(server, render):
    prompt = render(CONVERSATION, "internlm2-tiny")
    full, _, _ = frontend_call(server, "internlm2-tiny-stream", prompt, False, temperature=0, max_tokens=24)
    full = "".join(full)
    stop = full[4:7]
    assert stop and stop not in full[:4]
    cut, usage, _ = frontend_call(server, "internlm2-tiny-stream", prompt, True, temperature=0, max_tokens=24,
                                  stop=[stop], seed=7)
    assert "".join(cut) == full[:full.index(stop)]
    # No max_tokens: the frontend's default; its default temperature samples.
    _, usage, _ = frontend_call(server, "internlm2-tiny-stream", prompt, False, ignore_eos=True)
    assert usage["completion_tokens"] == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize("fields, message", [
    ({"n": 2}, "sampling_parameters: n: 2 is not supported here"),
    ({"presence_penalty": 0.5}, "sampling_parameters: presence_penalty: 0.5 is not supported here"),
    ({"temperature": -1}, "sampling_parameters: temperature: must be >= 0"),
])
def test_unsupported_settings_are_refused_by_name(server, render, fields, message):
    with pytest.raises(InferenceServerException) as error:
        frontend_call(server, "internlm2-tiny-stream", render(CONVERSATION, "internlm2-tiny"), False, **fields)
    assert message in error.value.message(), error.value.message()
