"""A real tritonserver (2.51, from the nvidia-pytriton wheel) with the freshly built
libtriton_llm.so, for the end-to-end tests. scripts/test.sh sets the environment:

  TRITONSERVER_BIN   the tritonserver executable
  TRITON_LLM_LIB     the built libtriton_llm.so
  TRITON_LLM_CLI     the built triton-llm binary (the reference answers)
  TRITON_LLM_FAULT_LIB  libtriton_llm.so built with the test-only `fault-injection` feature
"""

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_REPOSITORY = REPO / "tests" / "model_repository"
FIXTURES = REPO / "tests" / "fixtures"


def free_ports(count):
    """`count` distinct free loopback ports (all held open until each is known)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def required_env(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set; run the tests through scripts/test.sh", returncode=2)
    return value


class Server:
    """One tritonserver process on free loopback ports; its log goes to a file."""

    def __init__(self, repository, workdir, *extra_args, library=None):
        self.workdir = Path(workdir)
        backends = self.workdir / "backends" / "llm"
        backends.mkdir(parents=True, exist_ok=True)
        shutil.copy(library or required_env("TRITON_LLM_LIB"), backends / "libtriton_llm.so")
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log_path = self.workdir / "tritonserver.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [
                required_env("TRITONSERVER_BIN"),
                f"--model-repository={repository}",
                f"--backend-directory={self.workdir / 'backends'}",
                "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1",
                f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}",
                # Shutdown waits this long for open client connections (30 s by default).
                "--exit-timeout-secs=5",
                *extra_args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def http_url(self):
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self):
        return f"127.0.0.1:{self.grpc_port}"

    def wait_live(self, timeout=120):
        """Waits until the server answers (live, not necessarily every model ready) and its
        metrics endpoint too: tritonserver starts that one after HTTP, so a test reading a
        metric right after `live` could find nothing listening yet on a loaded machine."""
        deadline = time.time() + timeout
        for url in (f"http://{self.http_url}/v2/health/live", f"http://127.0.0.1:{self.metrics_port}/metrics"):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_text()}")
                try:
                    with urllib.request.urlopen(url, timeout=2):
                        break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"tritonserver did not answer {url}:\n{self.log_text()}")
                    time.sleep(0.3)
        return self

    def wait_model_ready(self, model, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"model {model} never became ready:\n{self.log_text()}")

    def metric(self, name, model):
        """The sum of a metric over a model's instances (histograms: their _count)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") and f'model="{model}"' in line:
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"no {name} for {model}"
        return total

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_kib(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The test repository's models (the tiny fixtures, KIND_CPU) on one server."""
    s = Server(TEST_REPOSITORY, tmp_path_factory.mktemp("server")).wait_live()
    for model in ("chatglm2-tiny", "internlm2-tiny", "chatglm2-tiny-batched", "chatglm2-tiny-stream",
                  "internlm2-tiny-stream", "chatglm2-tiny-nocache", "chatglm2-tiny-smallkv",
                  "chatglm2-tiny-kvint8", "chatglm2-tiny-kvfp8", "chatglm2-tiny-awq", "chatglm2-tiny-w8a16",
                  "chatglm2-tiny-bin", "vicuna-tiny", "vicuna-tiny-llama2", "llama3-tiny",
                  "llama3-tiny-stream"):
        s.wait_model_ready(model)
    yield s
    s.stop()


def stream_responses(server, model, inputs, timeout=120):
    """Every response of one request over gRPC streaming, the (maybe empty) final one
    included, in order; an error response raises."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    responses = []
    try:
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            responses.append(result)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return responses
    finally:
        client.stop_stream()
        client.close()


def raw_outputs(result):
    """The text_input/messages contract's outputs a response carries: texts as str, counts as
    int."""
    out = {}
    for name in ("text_output", "finish_reason", "tool_calls"):
        if result.as_numpy(name) is not None:
            out[name] = result.as_numpy(name).reshape(-1)[0].decode()
    for name in ("num_input_tokens", "num_output_tokens"):
        if result.as_numpy(name) is not None:
            out[name] = int(result.as_numpy(name).reshape(-1)[0])
    return out


def write_hf_tokenizer(folder, model="internlm2-tiny"):
    """A fixture's tokenizer as transformers loads it without remote code (genai-perf and
    Triton's OpenAI frontend load tokenizers so), written by deploy/openai-frontend/
    make_tokenizer.py: Llama's SentencePiece tokenizer (InternLM2's on text without special
    tokens) and the family's chat template."""
    subprocess.run([sys.executable, str(REPO / "deploy" / "openai-frontend" / "make_tokenizer.py"),
                    str(FIXTURES / model), str(folder)], check=True)
    return folder


def cli_generate(model, prompt, history=(), session_len=None, **flags):
    """The reference answer: `triton-llm generate` on the same folder, greedy."""
    args = [
        required_env("TRITON_LLM_CLI"), "generate", "--model", str(FIXTURES / model),
        "--prompt", prompt, "--history", json.dumps([list(p) for p in history]),
        "--temperature", "0",
    ]
    if session_len:
        args += ["--session-len", str(session_len)]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)
