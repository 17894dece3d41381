"""Model lifecycle through a real tritonserver: a corrupt model folder fails only its own
model's load, with a clear log line; loading and unloading a model 20 times leaves the
server's memory flat."""

import shutil
import time
import urllib.request

import numpy as np
import tritonclient.http as httpclient

from conftest import FIXTURES, TEST_REPOSITORY, Server
from test_seed_interface import http_chat


def ask(server, model):
    client = httpclient.InferenceServerClient(server.http_url)
    prompt = httpclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array(["你好"], dtype=object))
    max_new = httpclient.InferInput("max_new_tokens", [1], "BYTES")
    max_new.set_data_from_numpy(np.array(["8"], dtype=object))
    return client.infer(model, [prompt, max_new]).as_numpy("response")[0].decode()


def is_ready(server, model):
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/ready", timeout=5):
            return True
    except OSError:
        return False


def test_a_corrupt_weight_file_fails_only_its_model(tmp_path):
    broken = tmp_path / "weights"
    shutil.copytree(FIXTURES / "chatglm2-tiny", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    repository = tmp_path / "repository"
    shutil.copytree(TEST_REPOSITORY / "internlm2-tiny", repository / "internlm2-tiny")
    (repository / "internlm2-tiny" / "config.pbtxt").write_text(
        (TEST_REPOSITORY / "internlm2-tiny" / "config.pbtxt").read_text().replace(
            "../../../fixtures/internlm2-tiny", str(FIXTURES / "internlm2-tiny")))
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text(
        (TEST_REPOSITORY / "chatglm2-tiny" / "config.pbtxt").read_text()
        .replace('name: "chatglm2-tiny"', 'name: "broken"')
        .replace("../../../fixtures/chatglm2-tiny", str(broken)))
    # A bad parameter value fails its model's load naming the key; an unknown key is a warning.
    (repository / "badparam" / "1").mkdir(parents=True)
    (repository / "badparam" / "config.pbtxt").write_text(
        (repository / "internlm2-tiny" / "config.pbtxt").read_text()
        .replace('name: "internlm2-tiny"', 'name: "badparam"')
        + 'parameters { key: "history_len_default" value { string_value: "-3" } }\n')
    config = repository / "internlm2-tiny" / "config.pbtxt"
    config.write_text(config.read_text() + 'parameters { key: "colour" value { string_value: "blue" } }\n')
    server = Server(repository, tmp_path / "server", "--exit-on-error=false").wait_live()
    try:
        server.wait_model_ready("internlm2-tiny")
        deadline = time.time() + 60
        while "failed to load 'broken'" not in server.log_text() or "failed to load 'badparam'" not in server.log_text():
            assert time.time() < deadline, server.log_text()
            time.sleep(0.3)
        assert not is_ready(server, "broken")
        log = server.log_text()
        failure = [line for line in log.splitlines() if "model.safetensors" in line and "broken" in line]
        assert failure, log
        print("\n".join(failure))
        assert any("truncated" in line or "bytes" in line for line in failure), failure
        assert ask(server, "internlm2-tiny")
        assert not is_ready(server, "badparam")
        assert "parameter history_len_default: expected an integer >= 0, got \\\"-3\\\"" in log, log
        assert 'model internlm2-tiny: unknown parameter \\"colour\\" is ignored' in log, log
        assert server.process.poll() is None
    finally:
        server.stop()


def test_load_unload_20_times_keeps_memory_flat(tmp_path):
    server = Server(TEST_REPOSITORY, tmp_path / "server", "--model-control-mode=explicit").wait_live()
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        def cycle():
            client.load_model("chatglm2-tiny")
            assert ask(server, "chatglm2-tiny")
            client.unload_model("chatglm2-tiny")
            deadline = time.time() + 30
            while is_ready(server, "chatglm2-tiny"):
                assert time.time() < deadline
                time.sleep(0.1)

        for _ in range(5):  # warm-up: allocator pools, thread pools, first-load caches
            cycle()
        time.sleep(1)
        before = server.rss_kib()
        for _ in range(20):
            cycle()
        time.sleep(1)
        after = server.rss_kib()
        print(f"tritonserver RSS after 5 warm-up cycles: {before} KiB; after 20 more: {after} KiB")
        # One leaked copy of the model (weights as f32, tokenizer, caches) is several MiB.
        assert after - before < 8 * 1024, f"RSS grew from {before} KiB to {after} KiB"
    finally:
        server.stop()


SEED_ONLY_CONFIG = """name: "seed-only"
backend: "llm"
max_batch_size: 0
input [
  { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "history" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "temperature" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "max_token" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "history_len" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "max_new_tokens" data_type: TYPE_STRING dims: [ 1 ] optional: true }
]
output [
  { name: "response" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "history" data_type: TYPE_STRING dims: [ -1, 2 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "model_dir" value { string_value: "MODEL_DIR" } }
"""


def test_a_config_with_only_the_seed_interface_still_serves_it(tmp_path):
    # The seed deployments' config.pbtxt (prompt required, no vLLM or TensorRT-LLM tensors
    # declared) loads and answers as the full one does.
    repository = tmp_path / "repository"
    (repository / "seed-only" / "1").mkdir(parents=True)
    (repository / "seed-only" / "config.pbtxt").write_text(
        SEED_ONLY_CONFIG.replace("MODEL_DIR", str(FIXTURES / "chatglm2-tiny")))
    shutil.copytree(TEST_REPOSITORY / "chatglm2-tiny", repository / "chatglm2-tiny")
    (repository / "chatglm2-tiny" / "config.pbtxt").write_text(
        (TEST_REPOSITORY / "chatglm2-tiny" / "config.pbtxt").read_text().replace(
            "../../../fixtures/chatglm2-tiny", str(FIXTURES / "chatglm2-tiny")))
    server = Server(repository, tmp_path / "server").wait_live()
    try:
        server.wait_model_ready("seed-only")
        server.wait_model_ready("chatglm2-tiny")
        greedy = {"prompt": "你好", "temperature": "0", "max_new_tokens": "8"}
        answer = http_chat(server, "seed-only", greedy)
        assert answer[0] and answer == http_chat(server, "chatglm2-tiny", greedy)
    finally:
        server.stop()
