"""scripts/gpu/lib/table.py: the one table a GPU bench part ends with, read from the files the
part leaves (a real `triton-llm bench` line from the CPU path, and lines shaped as the GPU
path and serve_load.sh write them)."""

import json
import subprocess
import sys

from conftest import FIXTURES, REPO, required_env

TABLE = REPO / "scripts" / "gpu" / "lib" / "table.py"


def table(out):
    done = subprocess.run([sys.executable, str(TABLE), str(out)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def row_of(text, *cells):
    """The table line holding every one of `cells`."""
    lines = [line for line in text.splitlines() if all(cell in line for cell in cells)]
    assert len(lines) == 1, (cells, text)
    return lines[0]


def cell(text, line, column):
    """The cell of `line` under the header `column` (the columns are aligned)."""
    header = next(h for h in text.splitlines() if column in h)
    return line[header.index(column):].split("  ")[0].strip()


def test_an_empty_part_says_nothing_was_measured(tmp_path):
    assert table(tmp_path).strip() == f"nothing measured in {tmp_path}"


def test_the_table_holds_the_tests_the_benches_with_their_ab_and_the_served_levels(tmp_path):
    bench = subprocess.run(
        [required_env("TRITON_LLM_CLI"), "bench", "--model", str(FIXTURES / "chatglm2-tiny"),
         "--batch", "2", "--prompt", "8", "--new", "4"],
        capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    cpu = json.loads(bench.stdout)
    assert cpu["model"] == "chatglm2-tiny"
    # The GPU path's rows: a base bench, the same with programmatic launch (step 4 ms against
    # 5 ms: 1.25x), with FP8 weights (3 ms: 1.667x) and over an int8 cache (4.5 ms: 1.111x).
    gpu = dict(cpu, model="chatglm2-6b", batch=1, dtype="bf16", weights="dummy (computed in f32)",
               decode_step_ms=5.0, decode_step_floor_ms=2.8, decode_percent_of_limit=56.0,
               decode_attention_percent_of_bandwidth={
                   "256": {"tensor_cores": 61.5, "cuda_cores": 40.25},
                   "1024": {"tensor_cores": 70.0, "cuda_cores": 45.0},
                   "8192": {"tensor_cores": 81.0, "cuda_cores": 52.0}})
    with_pdl = dict(gpu, programmatic_launch=True, decode_step_ms=4.0, runs=5,
                    decode_step_ms_min=3.9, decode_step_ms_max=4.25)
    fp8 = dict(gpu, weights="fp8 e4m3, activations per token", decode_step_ms=3.0)
    int8_kv = dict(gpu, kv_format="int8", decode_step_ms=4.5)
    (tmp_path / "bench.jsonl").write_text(
        "\n".join(["== a step line", json.dumps(cpu), json.dumps(gpu), json.dumps(with_pdl),
                   json.dumps(fp8), json.dumps(int8_kv), "{not json"]) + "\n")
    summary = {"summary": True, "shape": "chatglm2-6b", "level": 256, "server_version": "2.51.0",
               "runs": 3, "of": 3, "output_tokens_per_s_median": 12345.6,
               "output_tokens_per_s_min": 12000.0, "output_tokens_per_s_max": 12500.4, "errors": 0,
               "quantization": "fp8", "kv_cache_dtype": "auto", "cuda_graphs": "true",
               "temperature": "0"}
    (tmp_path / "serve_summary.jsonl").write_text(json.dumps(summary) + "\n")
    (tmp_path / "gpu_tests.log").write_text(
        "running 25 tests\ntest result: ok. 24 passed; 0 failed; 1 ignored; 0 measured\n")

    text = table(tmp_path)
    assert text.splitlines()[0] == "GPU tests: ok: 24 passed, 0 failed, 1 ignored"
    assert "chatglm2-tiny" in row_of(text, "chatglm2-tiny", "f32")
    base = row_of(text, "chatglm2-6b", "bf16", "5.000")
    assert "2.800" in base and "56.0" in base and "256: 61.5/40.2 8192: 81.0/52.0" in base
    assert cell(text, base, "vs base") == "-"
    assert cell(text, base, "step ms") == "5.000"
    assert cell(text, row_of(text, "pdl", "4.000"), "vs base") == "1.250x"
    assert cell(text, row_of(text, "pdl", "4.000"), "step ms") == "4.000 (3.900-4.250)"
    assert cell(text, row_of(text, "fp8", "3.000"), "vs base") == "1.667x"
    assert cell(text, row_of(text, "int8", "4.500"), "vs base") == "1.111x"
    # The CPU bench has no base of its own model and batch.
    assert cell(text, row_of(text, "chatglm2-tiny", "f32"), "vs base") == "-"
    served = row_of(text, "chatglm2-6b", "256", "quantization=fp8")
    assert "12,346" in served and "12,000-12,500" in served and "3/3" in served
    assert "kv_cache_dtype" not in served and "2.51.0" in served


def test_a_test_run_that_found_no_device_is_no_pass(tmp_path):
    (tmp_path / "gpu_tests.log").write_text(
        "kernels: skipped (no CUDA device here)\ntest result: ok. 25 passed; 0 failed; 0 ignored\n")
    assert "(no CUDA device: skipped)" in table(tmp_path)
    (tmp_path / "gpu_tests.log").write_text("running 25 tests\n")
    assert "did not finish" in table(tmp_path)
