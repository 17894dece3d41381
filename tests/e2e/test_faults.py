"""Every request gets exactly one final answer whatever fails, over HTTP, gRPC unary and
gRPC streaming: a panic while execute takes a request in, a failed forward pass, a dropped
sink, a failed final send, a dead engine thread and a lost device. The faults come from a
library built with the test-only `fault-injection` feature (TRITON_LLM_FAULT_LIB): a prompt
`fault:<name>` makes that part fail (src/faults.rs). The released library ignores such
prompts. A huge prompt is refused by its size, before it is tokenized."""

import os
import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import FIXTURES, TEST_REPOSITORY, Server

PROTOCOLS = ["http", "grpc", "grpc-stream"]


def write_repository(root):
    """`faulty` (one instance, unary) and `faulty-stream` (one instance, decoupled)."""
    for name, source in (("faulty", "chatglm2-tiny"), ("faulty-stream", "chatglm2-tiny-stream")):
        (root / name / "1").mkdir(parents=True)
        config = (TEST_REPOSITORY / source / "config.pbtxt").read_text()
        config = (config.replace(f'name: "{source}"', f'name: "{name}"')
                  .replace("count: 2", "count: 1")
                  .replace("../../../fixtures/chatglm2-tiny", str(FIXTURES / "chatglm2-tiny")))
        (root / name / "config.pbtxt").write_text(config)
    return root


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    library = os.environ.get("TRITON_LLM_FAULT_LIB")
    if not library:
        pytest.skip("TRITON_LLM_FAULT_LIB is not set (scripts/test.sh builds it)")
    root = tmp_path_factory.mktemp("faults")
    server = Server(write_repository(root / "repository"), root / "server",
                    "--model-control-mode=explicit", library=library).wait_live()
    client = httpclient.InferenceServerClient(server.http_url)
    for model in ("faulty", "faulty-stream"):
        client.load_model(model)
    yield server
    assert server.process.poll() is None, "the server died:\n" + server.log_text()
    server.stop()


def inputs(module, prompt):
    tensors = []
    for name, value in (("prompt", prompt), ("max_new_tokens", "6"), ("temperature", "0")):
        tensor = module.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
        tensors.append(tensor)
    return tensors


def ask(server, protocol, prompt):
    """("ok", response) or ("error", message) of one request; fails on a hang, and on a
    second final answer for a streamed request."""
    if protocol == "http":
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
        try:
            return "ok", client.infer("faulty", inputs(httpclient, prompt)).as_numpy("response")[0].decode()
        except InferenceServerException as error:
            return "error", error.message()
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            result = client.infer("faulty", inputs(grpcclient, prompt), client_timeout=60)
            return "ok", result.as_numpy("response")[0].decode()
        except InferenceServerException as error:
            return "error", error.message()
        finally:
            client.close()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    events = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        client.async_stream_infer("faulty-stream", inputs(grpcclient, prompt), request_id="one",
                                  enable_empty_final_response=True)
        pieces, answer = [], None
        while answer is None:
            try:
                result, error = events.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"no final answer to {prompt!r} over a gRPC stream in 60 s")
            if error is not None:
                answer = ("error", error.message())
                break
            text = result.as_numpy("response")
            if text is not None:
                pieces.append(text.reshape(-1)[0].decode())
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                answer = ("ok", "".join(pieces))
        try:
            extra = events.get(timeout=0.5)
            pytest.fail(f"a second answer after the final one: {extra}")
        except queue.Empty:
            pass
        return answer
    finally:
        client.stop_stream()
        client.close()


def healthy(server, model):
    return server.metric("llm_engine_healthy", model)


def reload(server, model):
    client = httpclient.InferenceServerClient(server.http_url)
    client.unload_model(model)
    deadline = time.time() + 60
    while True:
        try:
            client.load_model(model)
            break
        except InferenceServerException:
            # Still unloading.
            assert time.time() < deadline
            time.sleep(0.2)
    server.wait_model_ready(model)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fault, says", [
    ("execute-panic", "taking the request in panicked: injected fault"),
    ("step-error", "injected fault: a step error"),
    ("sink-dropped", "dropped before it was answered"),
    ("final-send-fails", "the final response could not be sent"),
])
def test_a_fault_ends_only_its_own_request(fault_server, protocol, fault, says):
    outcome, message = ask(fault_server, protocol, f"fault:{fault}")
    assert outcome == "error" and says in message, (outcome, message)
    # The engine and the server go on.
    outcome, answer = ask(fault_server, protocol, "你好")
    assert outcome == "ok" and answer, (outcome, answer)
    model = "faulty-stream" if protocol == "grpc-stream" else "faulty"
    assert healthy(fault_server, model) == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fault, says, logged", [
    ("engine-panic", "dropped before it was answered", "the engine thread panicked: injected fault"),
    ("device-lost", "the engine failed: GPU fault, the device context is lost",
     "the engine failed: GPU fault, the device context is lost: injected fault"),
])
def test_a_dead_engine_answers_unavailable_until_reloaded(fault_server, protocol, fault, says, logged):
    model = "faulty-stream" if protocol == "grpc-stream" else "faulty"
    outcome, message = ask(fault_server, protocol, f"fault:{fault}")
    assert outcome == "error" and says in message, (outcome, message)
    for _ in range(3):
        outcome, message = ask(fault_server, protocol, "你好")
        assert outcome == "error" and "reload the model" in message, (outcome, message)
        assert "UNAVAILABLE" in message.upper() or "engine has stopped" in message, message
    assert healthy(fault_server, model) == 0
    assert logged in fault_server.log_text()
    reload(fault_server, model)
    outcome, answer = ask(fault_server, protocol, "你好")
    assert outcome == "ok" and answer, (outcome, answer)
    assert healthy(fault_server, model) == 1


def test_the_released_library_ignores_fault_prompts(server):
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("chatglm2-tiny", inputs(httpclient, "fault:execute-panic"))
    assert result.as_numpy("response")[0].decode()


def test_a_huge_prompt_is_refused_by_its_size(server):
    """About 20 MB of prompt: refused with INVALID_ARG before any tokenizing (which took the
    engine thread 13 s), naming the parameter that sets the limit."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        started = time.time()
        with pytest.raises(InferenceServerException) as refused:
            client.infer("chatglm2-tiny", inputs(grpcclient, "字" * (7 << 20)), client_timeout=60)
        took = time.time() - started
    finally:
        client.close()
    assert "max_input_bytes" in refused.value.message(), refused.value.message()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value.status()
    assert took < 10, took
