"""NVIDIA's genai-perf (pinned in scripts/requirements-genai-perf.txt, driving the perf_analyzer
of the pinned tritonclient 2.51.0 wheel) profiles the tiny InternLM2 model over gRPC streaming,
as Triton's vLLM backend (`--backend vllm`) and as its TensorRT-LLM backend
(`--backend tensorrtllm`). genai-perf 0.0.16 names Triton's protocol `--endpoint-type kserve`
(its older `--service-kind triton`).

Checked from genai-perf's exports: the request count; every request's generated tokens as the
server reported them (`num_output_tokens` of each response, recorded by perf_analyzer)
equal to the length genai-perf asked for; genai-perf's output lengths equal to our tokenizer's
count of the text it received (genai-perf counts output tokens by re-tokenizing the text; for
the random-weight tiny model that is more than were generated, so the two are checked
separately); and its request throughput within 10% of tools/load.py sending the same requests.
The machine's speed can change by half between two runs (10.5 to 19 requests/s here, both tools
agreeing on each side), so the runs alternate, each genai-perf run after the first is compared
with the mean of the tools/load.py runs just before and after it (a steady drift cancels, a jump
spoils one ratio), and the median of the seven ratios is checked. The model runs
without prefix caching and with long prompts, so that the server, not either client's Python,
sets the pace.
"""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO, TEST_REPOSITORY, Server, required_env, write_hf_tokenizer

MODEL = "internlm2-tiny-genai"
REQUESTS = 48
CONCURRENCY = 4
INPUT_TOKENS = 1024
OUTPUT_TOKENS = 16
# genai-perf runs; each but the first between two tools/load.py runs.
RUNS = 8


@pytest.fixture(scope="module")
def genai_server(tmp_path_factory):
    """internlm2-tiny decoupled, without prefix caching (every prompt computed in full), for
    prompts up to 2048 tokens."""
    repository = tmp_path_factory.mktemp("genai-repository")
    (repository / MODEL / "1").mkdir(parents=True)
    config = (TEST_REPOSITORY / "internlm2-tiny-stream" / "config.pbtxt").read_text()
    config = config.replace('name: "internlm2-tiny-stream"', f'name: "{MODEL}"')
    config = config.replace("../../../fixtures/internlm2-tiny", str(FIXTURES / "internlm2-tiny"))
    assert 'string_value: "512"' in config
    config += 'parameters { key: "enable_prefix_caching" value { string_value: "false" } }\n'
    # Long prompts (past the tiny model's trained context; rope extrapolates) make each request
    # mostly the server's work.
    config = config.replace('key: "session_len" value { string_value: "512" }',
                            'key: "session_len" value { string_value: "2048" }')
    (repository / MODEL / "config.pbtxt").write_text(config)
    server = Server(repository, tmp_path_factory.mktemp("genai-server")).wait_live()
    server.wait_model_ready(MODEL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """Checked below against ours on every text genai-perf counted."""
    return write_hf_tokenizer(tmp_path_factory.mktemp("genai-tokenizer"))


def genai_perf(server, tokenizer, backend, artifacts, seed):
    """One profile run; returns (genai-perf's summary, perf_analyzer's per-request export,
    the inputs file it sent)."""
    env = dict(os.environ)
    # genai-perf runs the `perf_analyzer` it finds on PATH; it needs CUDA 12's runtime library
    # (no GPU).
    env["PATH"] = f"{os.path.dirname(required_env('PERF_ANALYZER_BIN'))}:{env['PATH']}"
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [required_env("PERF_ANALYZER_LIB"),
                                                    env.get("LD_LIBRARY_PATH")]))
    command = [
        required_env("GENAI_PERF_BIN"), "profile", "-m", MODEL, "--endpoint-type", "kserve",
        "--backend", backend, "--streaming", "-u", server.grpc_url, "--tokenizer", str(tokenizer),
        "--synthetic-input-tokens-mean", str(INPUT_TOKENS), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(OUTPUT_TOKENS), "--output-tokens-mean-deterministic",
        "--extra-inputs", "return_num_output_tokens:true", "--random-seed", str(seed),
        "--request-count", str(REQUESTS), "--concurrency", str(CONCURRENCY),
        "--artifact-dir", str(artifacts),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"genai-perf failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    [folder] = [p for p in artifacts.iterdir() if p.is_dir()]
    summary = json.loads((folder / "profile_export_genai_perf.json").read_text())
    export = json.loads((folder / "profile_export.json").read_text())
    return summary, export, folder / "inputs.json"


def load_py(server, inputs):
    command = [sys.executable, str(REPO / "tools" / "load.py"), "--url", server.grpc_url,
               "--model", MODEL, "--input-data", str(inputs), "--requests", str(REQUESTS),
               "--concurrency", str(CONCURRENCY), "--processes", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(run.stdout)
    assert figures["errors"] == 0, figures["error_examples"]
    assert figures["requests"] == REQUESTS
    assert figures["output_tokens"] == REQUESTS * OUTPUT_TOKENS
    # Over the span genai-perf measures: first request sent to last answer ended.
    return figures["window_requests_per_s"]


def our_token_count(text):
    run = subprocess.run([required_env("TRITON_LLM_CLI"), "tokenize", "--model", str(FIXTURES / "internlm2-tiny"),
                          "--no-special", "-"], input=text, capture_output=True, text=True, check=True)
    return len(json.loads(run.stdout)["ids"])


@pytest.mark.parametrize("backend", ["vllm", "tensorrtllm"])
def test_genai_perf_measures_what_the_server_did(genai_server, hf_tokenizer, tmp_path, backend):
    genai_rates, load_rates = [], []
    for run in range(RUNS):
        summary, export, inputs = genai_perf(genai_server, hf_tokenizer, backend, tmp_path / f"run{run}", run)
        genai_rates.append(summary["request_throughput"]["avg"])
        # On the inputs genai-perf just sent (the next run's have the same shape, another seed).
        load_rates.append(load_py(genai_server, inputs))
        if run > 0:
            continue
        # The counts, from the first run's exports.
        assert summary["request_count"]["avg"] == REQUESTS
        [experiment] = export["experiments"]
        requests = experiment["requests"]
        assert len(requests) == REQUESTS
        assert summary["input_sequence_length"]["avg"] == INPUT_TOKENS
        texts = []
        for request in requests:
            outputs = request["response_outputs"]
            # The server's own count: each streamed response counts its new tokens.
            assert sum(o["num_output_tokens"] for o in outputs) == OUTPUT_TOKENS, outputs
            assert len(outputs) == len(request["response_timestamps"]) > 1
            texts.append("".join(o["text_output"] for o in outputs))
        counted = [our_token_count(text) for text in texts]
        lengths = summary["output_sequence_length"]
        assert lengths["avg"] == pytest.approx(statistics.mean(counted))
        assert (lengths["min"], lengths["max"]) == (min(counted), max(counted))
    # genai_rates[i] ran between load_rates[i - 1] and load_rates[i].
    ratios = [genai_rates[i] / statistics.mean(load_rates[i - 1:i + 1]) for i in range(1, RUNS)]
    ratio = statistics.median(ratios)
    print(f"{backend}: genai-perf {genai_rates} req/s, tools/load.py {load_rates}, "
          f"ratios {[round(r, 3) for r in ratios]} (median {ratio:.3f})")
    assert abs(ratio - 1) <= 0.10, (genai_rates, load_rates, ratios)
