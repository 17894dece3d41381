"""The LangChain chat model of clients/python (`ChatTritonLLM`) against a real tritonserver:
its answers are the seed interface's (invoke, stream, a 3-turn conversation, history_len,
stop words, max_token, a system prompt), its usage metadata the server's counts, and a bad
request raises its error with the server's message."""

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from triton_llm_langchain import ChatTritonLLM, TritonLLMError

from conftest import cli_generate
from test_seed_interface import flatten, grpc_chat

PROMPT = "What is RMSNorm?"


def chat_model(server, model, **fields):
    return ChatTritonLLM(url=server.grpc_url, model=model, **fields)


def seed(server, model, prompt, history=(), **fields):
    """The seed interface's (response, history) for the same request, greedy."""
    request = {"prompt": prompt, "history": flatten(history), "temperature": "0"}
    request.update({name: str(value) for name, value in fields.items()})
    return grpc_chat(server, model, request)


def test_invoke_answers_as_the_seed_interface_and_reports_the_servers_counts(server):
    expected = cli_generate("chatglm2-tiny", PROMPT, max_new_tokens=24)
    for model in ("chatglm2-tiny", "internlm2-tiny"):
        message = chat_model(server, model, temperature=0, max_new_tokens=24).invoke(PROMPT)
        response, history = seed(server, model, PROMPT, max_new_tokens=24)
        assert isinstance(message, AIMessage)
        assert message.content == response and response
        assert message.response_metadata["history"] == history == [[PROMPT, response]]
        assert message.response_metadata["finish_reason"] in ("stop", "length")
        assert message.response_metadata["model_name"] == model
    assert message.usage_metadata["input_tokens"] > 0
    # chatglm2-tiny: the answer and counts of `triton-llm generate`.
    message = chat_model(server, "chatglm2-tiny", temperature=0, max_new_tokens=24).invoke(PROMPT)
    assert message.content == expected["response"]
    prompt_tokens, generated = expected["prompt_tokens"], expected["generated_tokens"]
    assert message.usage_metadata == {"input_tokens": prompt_tokens, "output_tokens": generated,
                                      "total_tokens": prompt_tokens + generated}
    assert message.response_metadata["finish_reason"] == expected["finish_reason"]


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


@pytest.mark.parametrize("model", ["chatglm2-tiny", "internlm2-tiny"])
def test_stream_yields_the_pieces_of_a_decoupled_model(server, model):
    unary = chat_model(server, model, temperature=0, max_new_tokens=24).invoke(PROMPT)
    streaming = chat_model(server, f"{model}-stream", temperature=0, max_new_tokens=24)
    chunks = list(streaming.stream(PROMPT))
    assert len([c for c in chunks if c.content]) > 1, chunks  # really streamed
    assert "".join(c.content for c in chunks) == unary.content
    # The last chunk carries the final response's metadata; added up, the chunks are the message.
    whole = sum(chunks[1:], chunks[0])
    assert whole.usage_metadata == unary.usage_metadata
    assert whole.response_metadata["history"] == unary.response_metadata["history"]
    assert whole.response_metadata["finish_reason"] == unary.response_metadata["finish_reason"]
    # invoke on the decoupled model gathers the stream, and callbacks see every piece.
    tokens = Tokens()
    gathered = streaming.invoke(PROMPT, config={"callbacks": [tokens]})
    assert gathered.content == unary.content and gathered.usage_metadata == unary.usage_metadata
    assert len(tokens.tokens) > 1 and "".join(tokens.tokens) == unary.content
    # A model that is not decoupled streams its one answer as one chunk.
    single = list(chat_model(server, model, temperature=0, max_new_tokens=24).stream(PROMPT))
    assert len(single) == 1 and single[0].content == unary.content


def test_a_stream_left_early_leaves_the_server_serving(server):
    streaming = chat_model(server, "chatglm2-tiny-stream", temperature=0, max_new_tokens=200)
    stream = streaming.stream(PROMPT)
    assert next(stream).content
    stream.close()  # cancels the request
    assert chat_model(server, "chatglm2-tiny-stream", max_new_tokens=4).invoke("hi").content


@pytest.mark.parametrize("model", ["chatglm2-tiny", "chatglm2-tiny-stream"])
def test_three_turn_conversation_keeps_history_the_seed_way(server, model):
    llm = chat_model(server, model, temperature=0, max_new_tokens=16)
    messages, history = [], []
    for query in ["你好", "What is RMSNorm?", "请用一句话介绍你自己。"]:
        messages.append(HumanMessage(query))
        answer = llm.invoke(messages)
        response, returned = seed(server, "chatglm2-tiny", query, history, max_new_tokens=16)
        assert answer.content == response
        assert answer.response_metadata["history"] == returned == history + [[query, response]]
        messages.append(answer)
        history = returned
    # history_len 1 (as a field or per call): the server keeps only the last pair, so the
    # answer is the one to that pair alone.
    messages.append(HumanMessage("Third?"))
    last_pair_only = llm.invoke(messages[-3:])
    for kept in (chat_model(server, model, temperature=0, max_new_tokens=16, history_len=1).invoke(messages),
                 llm.invoke(messages, history_len=1)):
        assert kept.content == last_pair_only.content
        assert kept.response_metadata["history"] == [history[-1], ["Third?", kept.content]]
    everything = llm.invoke(messages)
    assert everything.response_metadata["history"] == history + [["Third?", everything.content]]


@pytest.mark.parametrize("model", ["internlm2-tiny", "internlm2-tiny-stream"])
def test_stop_words_cut_the_answer(server, model):
    llm = chat_model(server, model, temperature=0, max_new_tokens=32)
    full = llm.invoke(PROMPT).content
    word = full[len(full) // 2:len(full) // 2 + 2]
    assert word.strip(), full
    cut = full[:full.index(word)]
    for answer in (llm.invoke(PROMPT, stop=[word]),  # a call's stop words
                   chat_model(server, model, temperature=0, max_new_tokens=32, stop=[word]).invoke(PROMPT),
                   # the model's stop words and the call's together
                   chat_model(server, model, temperature=0, max_new_tokens=32,
                              stop=["never in this answer"]).invoke(PROMPT, stop=[word])):
        assert answer.content == cut
        assert answer.response_metadata["finish_reason"] == "stop"
    chunks = list(llm.stream(PROMPT, stop=[word]))
    assert "".join(c.content for c in chunks) == cut


def test_max_token_is_passed(server):
    llm = chat_model(server, "chatglm2-tiny", temperature=0)
    prompt_tokens = llm.invoke("hi", max_new_tokens=4).usage_metadata["input_tokens"]
    answer = llm.invoke("hi", max_token=prompt_tokens + 3)
    assert answer.usage_metadata["output_tokens"] <= 3
    assert answer.content == seed(server, "chatglm2-tiny", "hi", max_token=prompt_tokens + 3)[0]
    for model in ("chatglm2-tiny", "chatglm2-tiny-stream"):
        with pytest.raises(TritonLLMError) as error:
            chat_model(server, model, max_token=3).invoke("hi")
        assert error.value.message.startswith("max_token: ") and "prompt alone is" in error.value.message


def test_a_system_message_is_the_system_prompt(server):
    system = "You are a terse assistant."
    answer = chat_model(server, "internlm2-tiny", temperature=0, max_new_tokens=16).invoke(
        [SystemMessage(system), HumanMessage("你好")])
    assert answer.content == seed(server, "internlm2-tiny", "你好", system_prompt=system, max_new_tokens=16)[0]
    field = chat_model(server, "internlm2-tiny", temperature=0, max_new_tokens=16, system_prompt=system)
    assert field.invoke("你好").content == answer.content
    # ChatGLM2 has no system prompt: the server's refusal, as the exception.
    with pytest.raises(TritonLLMError, match=r"^system_prompt: .*no system prompt"):
        chat_model(server, "chatglm2-tiny").invoke([SystemMessage(system), HumanMessage("你好")])


@pytest.mark.parametrize("model", ["chatglm2-tiny", "chatglm2-tiny-stream"])
@pytest.mark.parametrize("fields,name,problem", [
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"top_p": 7}, "top_p", "(0, 1]"),
    ({"stop": [""]}, "stop", "must not be empty"),
])
def test_a_bad_request_raises_the_servers_message(server, model, fields, name, problem):
    llm = chat_model(server, model, **fields)
    for call in (llm.invoke, lambda prompt: list(llm.stream(prompt))):
        with pytest.raises(TritonLLMError) as error:
            call("hi")
        assert isinstance(error.value, ValueError)
        assert error.value.message.startswith(f"{name}: ") and problem in error.value.message, error.value
        # A stream's error carries no status; a unary call's does.
        assert error.value.status == (None if model.endswith("-stream") else "StatusCode.INVALID_ARGUMENT")
    assert chat_model(server, model, max_new_tokens=4).invoke("hi").content  # the next one is served


def test_messages_the_seed_interface_cannot_carry_are_refused(server):
    llm = chat_model(server, "chatglm2-tiny")
    for messages, problem in [
        ([HumanMessage("q"), AIMessage("a")], "must end with a human message"),
        ([HumanMessage("q"), HumanMessage("q2")], "message 1 is human, where an AI message"),
        ([HumanMessage("q"), AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "0"}]),
          ToolMessage("42", tool_call_id="0"), HumanMessage("q2")], "message 1 has tool calls"),
        ([HumanMessage("q"), SystemMessage("s"), HumanMessage("q2")], "message 1 is system"),
    ]:
        with pytest.raises(ValueError, match=problem):
            llm.invoke(messages)
    with pytest.raises(TypeError, match="tools"):
        llm.invoke("hi", tools=[])
