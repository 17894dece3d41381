#!/usr/bin/env python3
"""One table of what a bench.sh part measured, from the files it left in OUT: the GPU tests'
summary (gpu_tests.log), each `triton-llm bench` (bench.jsonl) with its step (the median
of its runs, and their range) against the floor and its speed-up over its base (the same model and batch in the model's dtype with no
lever, in the same run: the A/B of programmatic launch, the fused QKV product, FP8 weights
or a quantised KV cache), each served level (serve_summary.jsonl)
and each transformers peer row (peer.jsonl). Standard library only.

  table.py OUT        the table on stdout
"""

import json
import os
import re
import sys


def rows_of(path):
    """The JSON objects of a file of one JSON object a line (other lines skipped)."""
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return rows


def num(value, digits=2):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def aligned(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def gpu_tests(out):
    """`passed/failed/ignored` of the GPU test run, or None where none ran."""
    try:
        text = open(os.path.join(out, "gpu_tests.log"), encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    found = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", text)
    if not found:
        return "did not finish (no test result line)"
    verdict, passed, failed, ignored = found[-1]
    skipped = " (no CUDA device: skipped)" if "skipped (no CUDA device" in text else ""
    return f"{verdict}: {passed} passed, {failed} failed, {ignored} ignored{skipped}"


def weights(bench):
    text = str(bench.get("weights", ""))
    first = text.split(" ")[0]
    return first if first in ("fp8", "w8a16", "w4a16", "awq") else bench.get("dtype", "?")


def attention(bench):
    """The decode attention alone, tensor cores / CUDA cores, in % of the copy rate, at the
    shortest and longest context measured."""
    shares = bench.get("decode_attention_percent_of_bandwidth") or {}
    cells = []
    contexts = sorted(shares, key=int)
    for context in contexts[:1] + contexts[1:][-1:]:
        share = shares[context]
        cells.append(f"{context}: {num(share.get('tensor_cores'), 1)}/{num(share.get('cuda_cores'), 1)}")
    return " ".join(cells) or "-"


def step(bench):
    """The decode step in ms, with the spread of its runs where it ran more than once."""
    cell = num(bench.get("decode_step_ms"), 3)
    if (bench.get("runs") or 1) > 1:
        cell += f" ({num(bench.get('decode_step_ms_min'), 3)}-{num(bench.get('decode_step_ms_max'), 3)})"
    return cell


def dense(bench):
    """Whether a bench ran the model's own dtype: weights unquantised, K/V in the dtype."""
    return weights(bench) == bench.get("dtype") and bench.get("kv_format") == "model dtype"


def bench_table(benches):
    # A bench's base: the same model and batch (graphs and sampling alike) in its own dtype
    # with no lever, in the same run; "vs base" is the base's step over this one's.
    key = lambda b: (b.get("model"), b.get("batch"), b.get("cuda_graphs"), b.get("sample_on_device"))
    base = {}
    for b in benches:
        if dense(b) and not b.get("programmatic_launch") and not b.get("fused_qkv_rope"):
            base.setdefault(key(b), b)
    rows = []
    for b in benches:
        levers = [name for flag, name in (("programmatic_launch", "pdl"), ("fused_qkv_rope", "qkv+rope"))
                  if b.get(flag)]
        reference = base.get(key(b))
        speedup = "-"
        if reference is not None and reference is not b and b.get("decode_step_ms"):
            speedup = f"{reference['decode_step_ms'] / b['decode_step_ms']:.3f}x"
        rows.append([b.get("model", b.get("family", "?")), b.get("batch", "?"), weights(b),
                     b.get("kv_format", "?"), "+".join(levers) or "-",
                     step(b), num(b.get("decode_step_floor_ms"), 3),
                     num(b.get("decode_percent_of_limit"), 1), speedup,
                     num(b.get("decode_tokens_per_s"), 1), num(b.get("ttft_ms"), 1),
                     attention(b)])
    header = ["model", "batch", "weights", "kv", "levers", "step ms (runs' range)", "floor ms",
              "% floor", "vs base", "decode tok/s", "ttft ms", "attention tc/cc % by context"]
    return aligned(header, rows) + [
        "vs base: the step of the same model and batch in its dtype without levers, this run, "
        "over this one's"]


# serve_load.sh's defaults: a level's settings column names only what differs from them.
SERVE_DEFAULTS = {"quantization": "none", "kv_cache_dtype": "auto", "quant_policy": "0",
                  "programmatic_launch": "false", "fused_qkv_rope": "false", "cuda_graphs": "true",
                  "sample_on_device": "true", "temperature": "0", "new_tokens": "128",
                  "max_num_batched_tokens": "8192"}


def serve_table(summaries):
    rows = []
    for s in summaries:
        settings = " ".join(f"{k}={s[k]}" for k, default in SERVE_DEFAULTS.items()
                            if k in s and str(s[k]) != default)
        spread = "-"
        if s.get("output_tokens_per_s_min") is not None:
            spread = f"{num(s.get('output_tokens_per_s_min'), 0)}-{num(s.get('output_tokens_per_s_max'), 0)}"
        rows.append([s.get("shape", "?"), s.get("level", "?"), settings or "-",
                     num(s.get("output_tokens_per_s_median"), 0), spread,
                     f"{s.get('runs', '?')}/{s.get('of', '?')}", s.get("errors", "?"),
                     s.get("server_version") or "-"])
    header = ["served shape", "streams", "settings", "out tok/s (median)", "min-max", "runs",
              "errors", "server"]
    return aligned(header, rows)


def peer_table(peers):
    rows = [[p.get("shape"), p.get("batch"), p.get("variant"), num(p.get("decode_step_ms"), 3),
             num(p.get("decode_tokens_per_s"), 1), num(p.get("ttft_ms"), 1),
             (p.get("error") or "")[:60]] for p in peers if "variant" in p]
    header = ["transformers shape", "batch", "variant", "step ms", "decode tok/s", "ttft ms", "error"]
    return aligned(header, rows)


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = argv[1]
    lines = []
    tests = gpu_tests(out)
    if tests is not None:
        lines.append(f"GPU tests: {tests}")
    benches = [b for b in rows_of(os.path.join(out, "bench.jsonl")) if "decode_step_ms" in b]
    summaries = [s for s in rows_of(os.path.join(out, "serve_summary.jsonl")) if s.get("summary")]
    peers = rows_of(os.path.join(out, "peer.jsonl"))
    for part, table in ((benches, bench_table), (summaries, serve_table), (peers, peer_table)):
        if part:
            lines += [""] + table(part)
    if not lines:
        lines.append(f"nothing measured in {out}")
    print("\n".join(lines).strip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
