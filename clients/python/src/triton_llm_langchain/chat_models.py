"""`ChatTritonLLM`: a LangChain chat model over the seed interface of `libtriton_llm.so`.

The seed interface is a chat turn, not a conversation: `prompt` is the user's new message,
`history` the earlier (query, answer) pairs flattened oldest first, `system_prompt` the
system message, every number decimal text. This module maps LangChain messages onto it and
back, over gRPC: unary calls for a model that answers once, a gRPC stream for a decoupled
model (`model_transaction_policy { decoupled: true }`), whose pieces arrive as they are made.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr
from tritonclient.utils import InferenceServerException

# The seed interface's sampling and length inputs; each is sent only when set, so that an
# unset one keeps the model's default (its config's `history_len_default`, ...).
SEED_PARAMETERS = ("temperature", "max_token", "history_len", "max_new_tokens", "top_p", "top_k",
                   "repetition_penalty", "seed")


class TritonLLMError(ValueError):
    """The server refused or failed a request. Its message is the server's, which names the
    input at fault (`temperature: "hot" is not a number`); `status` is the call's gRPC status
    (`StatusCode.INVALID_ARGUMENT` for a bad request), None for an error that came inside a
    gRPC stream (a decoupled model's), which carries only the message."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @classmethod
    def from_triton(cls, error: InferenceServerException) -> TritonLLMError:
        return cls(error.message() or str(error), error.status())


def seed_fields(messages: Sequence[BaseMessage]) -> dict[str, Any]:
    """`prompt`, `history` and `system_prompt` of a conversation, the way the seed
    deployments kept history: an optional leading system message, then (human, AI) pairs,
    then the human message being answered. Anything else has no place in a seed request
    and raises a ValueError rather than being dropped or reordered silently."""

    def text(message: BaseMessage) -> str:
        if not isinstance(message.content, str):
            raise ValueError(f"{message.type} message: only text content is supported")
        return message.content

    fields: dict[str, Any] = {}
    rest = list(messages)
    if rest and isinstance(rest[0], SystemMessage):
        fields["system_prompt"] = text(rest.pop(0))
    offset = len(messages) - len(rest)
    for i, message in enumerate(rest):
        expected, name = (HumanMessage, "a human") if i % 2 == 0 else (AIMessage, "an AI")
        if not isinstance(message, expected):
            raise ValueError(f"message {offset + i} is {message.type}, where {name} message was "
                             "expected: the seed interface takes one optional system message, "
                             "then human and AI messages in turn, ending with a human one")
        if isinstance(message, AIMessage) and message.tool_calls:
            raise ValueError(f"message {offset + i} has tool calls, which the seed interface cannot carry")
    if not rest or not isinstance(rest[-1], HumanMessage):
        raise ValueError("the conversation must end with a human message (the prompt)")
    history = [text(message) for message in rest[:-1]]
    fields["prompt"] = text(rest[-1])
    if history:
        fields["history"] = history
    return fields


def make_inputs(fields: dict[str, Any]) -> list[grpcclient.InferInput]:
    """One BYTES tensor per field: a list is a [n] tensor (`history`, `stop`), anything
    else a [1] tensor of its decimal text."""
    inputs = []
    for name, value in fields.items():
        values = [v.encode() for v in value] if isinstance(value, list) else [str(value).encode()]
        tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=object))
        inputs.append(tensor)
    return inputs


def final_metadata(result: grpcclient.InferResult, model_name: str) -> dict[str, Any]:
    """What a final response says besides the text: the server's token counts (as LangChain's
    `usage_metadata`), `finish_reason`, and the seed `history` output (the pairs the server
    kept, plus the new one), in the message's `response_metadata`."""
    parameters = result.get_response().parameters
    metadata: dict[str, Any] = {"model_name": model_name}
    if "finish_reason" in parameters:
        metadata["finish_reason"] = parameters["finish_reason"].string_param
    history = result.as_numpy("history")
    if history is not None:
        metadata["history"] = [[q.decode(), a.decode()] for q, a in history.reshape(-1, 2)]
    usage = None
    if "prompt_tokens" in parameters and "generated_tokens" in parameters:
        prompt, generated = parameters["prompt_tokens"].int64_param, parameters["generated_tokens"].int64_param
        usage = UsageMetadata(input_tokens=prompt, output_tokens=generated, total_tokens=prompt + generated)
    return {"response_metadata": metadata, "usage_metadata": usage}


def response_text(result: grpcclient.InferResult) -> str:
    text = result.as_numpy("response")
    return text.reshape(-1)[0].decode() if text is not None and text.size else ""


class ChatTritonLLM(BaseChatModel):
    """A chat model served by `libtriton_llm.so` in Triton, spoken to over gRPC.

    Example:
        llm = ChatTritonLLM(model_name="chatglm2-6b", temperature=0, max_token=2048)
        llm.invoke([HumanMessage("你好"), AIMessage("你好！"), HumanMessage("What is RMSNorm?")])

    A decoupled model streams (`stream()` yields its pieces as they arrive; `invoke()` gathers
    them); any other model answers once, as one chunk when streamed. Fields left None are
    not sent, so the model's own defaults apply. Per-call overrides go through `bind()` or
    keyword arguments of the same names (`llm.invoke(messages, temperature=0)`).
    """

    url: str = "localhost:8001"
    """Triton's gRPC address."""
    model_name: str = Field(alias="model")
    temperature: float | None = None
    max_token: int | None = None
    """Prompt plus answer tokens (ChatGLM2's `max_length`)."""
    history_len: int | None = None
    """How many of the past (query, answer) pairs the server keeps (the most recent ones)."""
    max_new_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    """Stop strings of every call; those given to a call are added to them."""
    system_prompt: str | None = None
    """InternLM2's meta instruction ("" for none); a system message in the conversation wins.
    ChatGLM2 has none and refuses a non-empty one."""
    timeout: float | None = None
    """Seconds for a whole request (None: no limit)."""

    model_config = ConfigDict(populate_by_name=True)

    _decoupled: dict[tuple[str, str], bool] = PrivateAttr(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "triton-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"url": self.url, "model_name": self.model_name, "stop": self.stop,
                "system_prompt": self.system_prompt,
                **{name: getattr(self, name) for name in SEED_PARAMETERS}}

    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> list[grpcclient.InferInput]:
        unknown = set(kwargs) - set(SEED_PARAMETERS) - {"system_prompt"}
        if unknown:
            raise TypeError(f"ChatTritonLLM takes no argument(s) {sorted(unknown)}")
        fields: dict[str, Any] = {}
        if self.system_prompt is not None:
            fields["system_prompt"] = self.system_prompt
        fields.update({name: getattr(self, name) for name in SEED_PARAMETERS})
        fields.update(kwargs)
        fields.update(seed_fields(messages))
        if stop_words := [*self.stop, *(stop or [])]:
            fields["stop"] = stop_words
        return make_inputs({k: v for k, v in fields.items() if v is not None})

    def _is_decoupled(self, client: grpcclient.InferenceServerClient) -> bool:
        """Whether the model streams, from its config (asked once per url and model)."""
        key = (self.url, self.model_name)
        if key not in self._decoupled:
            config = client.get_model_config(self.model_name, client_timeout=self.timeout).config
            self._decoupled[key] = config.model_transaction_policy.decoupled
        return self._decoupled[key]

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        inputs = self._request(messages, stop, kwargs)
        client = grpcclient.InferenceServerClient(self.url)
        try:
            if self._is_decoupled(client):
                return generate_from_stream(self._stream_inputs(client, inputs, run_manager))
            result = client.infer(self.model_name, inputs, client_timeout=self.timeout)
        except InferenceServerException as error:
            raise TritonLLMError.from_triton(error) from None
        finally:
            client.close()
        message = AIMessage(content=response_text(result), **final_metadata(result, self.model_name))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        inputs = self._request(messages, stop, kwargs)
        client = grpcclient.InferenceServerClient(self.url)
        try:
            if self._is_decoupled(client):
                yield from self._stream_inputs(client, inputs, run_manager)
                return
            result = client.infer(self.model_name, inputs, client_timeout=self.timeout)
        except InferenceServerException as error:
            raise TritonLLMError.from_triton(error) from None
        finally:
            client.close()
        chunk = ChatGenerationChunk(message=AIMessageChunk(
            content=response_text(result), chunk_position="last", **final_metadata(result, self.model_name)))
        if run_manager:
            run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk

    def _stream_inputs(self, client: grpcclient.InferenceServerClient, inputs: list[grpcclient.InferInput],
                       run_manager: CallbackManagerForLLMRun | None) -> Iterator[ChatGenerationChunk]:
        """One request on a gRPC stream: a chunk per piece as it arrives, then one empty
        chunk with the final response's metadata. The stream is closed when the consumer
        stops early, and then the request is cancelled so that the server stops generating."""
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            stream_timeout=self.timeout)
        finished = False
        try:
            client.async_stream_infer(self.model_name, inputs, enable_empty_final_response=True)
            while not finished:
                result, error = results.get()
                if error is not None:
                    finished = True  # the server has ended the request
                    raise TritonLLMError.from_triton(error)
                final = result.get_response().parameters.get("triton_final_response")
                finished = final is not None and final.bool_param
                text = response_text(result)
                if not text and not finished:
                    continue
                extra = final_metadata(result, self.model_name) if finished else {}
                chunk = ChatGenerationChunk(message=AIMessageChunk(
                    content=text, chunk_position="last" if finished else None, **extra))
                if run_manager and text:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        finally:
            client.stop_stream(cancel_requests=not finished)
