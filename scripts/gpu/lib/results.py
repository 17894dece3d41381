#!/usr/bin/env python3
"""Result rows of scripts/gpu/check.sh: collected one JSON line each in a rows file, then
printed as one aligned table and written to results.json. Standard library only.

  results.py ROWS row STEP WHAT FIGURE PASS [--data JSON] [--seconds S]
  results.py ROWS gpucheck STEP LOG          rows from the `GPUCHECK {...}` lines of LOG
  results.py ROWS bench STEP WHAT STDOUT RC SECONDS   one row from a bench's JSON stdout
  results.py ROWS serve STEP WHAT STDOUT RC SECONDS   rows from serve_check.py's JSON stdout
  results.py ROWS final OUT_JSON [--meta JSON]        the table on stdout, results.json; exit 1 unless all PASS
PASS is one of PASS FAIL SKIP (or true/false/1/0).
"""

import json
import sys

BENCH_KEYS = [
    # (key in the bench JSON, label in the table)
    ("decode_tokens_per_s", "decode tok/s"),
    ("decode_percent_of_limit", "decode %lim"),
    ("ttft_ms", "ttft ms"),
    ("prefill_percent_of_limit", "prefill %lim"),
    ("output_tokens_per_s", "out tok/s"),
    ("bandwidth_gb_s", "GB/s"),
    ("matmul_tflops", "TFLOP/s"),
]
RATIO_LIMIT = 0.05  # gRPC tokens/s within 5% of the bench's output_tokens_per_s


def fmt(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 1000 else f"{value:.1f}"
    return f"{value:.4g}"


def verdict(value):
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    text = str(value).strip().upper()
    if text in ("PASS", "TRUE", "1", "OK"):
        return "PASS"
    if text == "SKIP":
        return "SKIP"
    return "FAIL"


def append(rows_path, row):
    with open(rows_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def last_json_object(path):
    """The last line of a file that parses as a JSON object (bench prints exactly one)."""
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def cmd_row(rows, args):
    step, what, figure, passed = args[:4]
    row = {"step": step, "what": what, "figure": figure, "pass": verdict(passed)}
    rest = args[4:]
    while rest:
        flag, value = rest[0], rest[1]
        rest = rest[2:]
        if flag == "--data":
            try:
                row["data"] = json.loads(value)
            except ValueError:
                row["data"] = value
        elif flag == "--seconds":
            row["seconds"] = float(value)
    append(rows, row)


def cmd_gpucheck(rows, args):
    step, log = args
    count = 0
    for line in open(log, encoding="utf-8", errors="replace"):
        at = line.find("GPUCHECK ")
        if at < 0:
            continue
        text = line[at + len("GPUCHECK "):].strip()
        try:
            data = json.loads(text)
        except ValueError:
            append(rows, {"step": step, "what": "unparsable GPUCHECK line", "figure": text[:80],
                          "pass": "FAIL"})
            count += 1
            continue
        what = " ".join(str(data[k]) for k in ("check", "model", "dtype") if k in data) or "check"
        figure = ", ".join(
            f"{k}={fmt(v)}" for k, v in data.items() if k not in ("check", "model", "dtype", "pass")
        )
        append(rows, {"step": step, "what": what, "figure": figure,
                      "pass": verdict(data.get("pass", False)), "data": data})
        count += 1
    print(count)


def cmd_bench(rows, args):
    step, what, stdout, rc, seconds = args
    data = last_json_object(stdout)
    if data is None:
        figure = f"exit {rc}, no JSON on stdout" if rc != "124" else "timed out, no JSON"
        passed = "FAIL"
    else:
        parts = [f"{label} {fmt(data[key])}" for key, label in BENCH_KEYS if key in data]
        # Decode attention alone: K/V read rate as % of the copy rate, tensor / CUDA cores.
        attention = data.get("decode_attention_percent_of_bandwidth") or {}
        if attention:
            parts.append("attn %bw tc/cc " + ", ".join(
                f"{ctx}: {fmt(v.get('tensor_cores'))}/{fmt(v.get('cuda_cores'))}"
                for ctx, v in attention.items()))
        figure = ", ".join(parts) or "JSON without the expected keys"
        passed = "PASS" if rc == "0" else "FAIL"
        if rc != "0":
            figure = f"exit {rc}; " + figure
    append(rows, {"step": step, "what": what, "figure": figure, "pass": passed,
                  "seconds": float(seconds), "data": data})


def cmd_serve(rows, args):
    step, what, stdout, rc, seconds = args
    data = last_json_object(stdout)
    if data is None:
        append(rows, {"step": step, "what": what, "figure": f"exit {rc}, no result",
                      "pass": "FAIL", "seconds": float(seconds)})
        return
    http = data.get("http_generate") or {}
    append(rows, {"step": step, "what": f"{what} http generate",
                  "figure": (f"{http.get('generated_tokens')} tokens, {http.get('response_chars')} chars, "
                             f"prompt {http.get('prompt_tokens')} tokens" if http.get("ok")
                             else str(http.get("error", "failed"))[:90]),
                  "pass": "PASS" if http.get("ok") else "FAIL"})
    grpc = data.get("grpc") or {}
    figure = (f"{fmt(grpc.get('tokens_per_s', 0))} tok/s ({grpc.get('tokens')} tokens / "
              f"{fmt(grpc.get('wall_s', 0))} s, {grpc.get('requests')} requests, "
              f"{grpc.get('response_chars')} chars)" + (f"; {grpc['note']}" if grpc.get("note") else "")) \
        if grpc.get("ok") else str(grpc.get("error", "failed"))[:90]
    append(rows, {"step": step, "what": f"{what} grpc timed", "figure": figure,
                  "pass": "PASS" if grpc.get("ok") and rc == "0" else "FAIL",
                  "seconds": float(seconds), "data": data})


def ratio_row(all_rows):
    bench = next((r for r in all_rows if r["what"].startswith("bench chatglm2-6b b1 p128")), None)
    serve = next((r for r in all_rows if r["what"].endswith("grpc timed")), None)
    if not bench or not serve:
        return None
    base = (bench.get("data") or {}).get("output_tokens_per_s")
    got = ((serve.get("data") or {}).get("grpc") or {}).get("tokens_per_s")
    if not base or not got:
        return {"step": "d", "what": "grpc vs bench out tok/s", "figure": "no figure to compare",
                "pass": "FAIL"}
    ratio = got / base
    return {"step": "d", "what": "grpc vs bench out tok/s",
            "figure": f"{fmt(got)} / {fmt(base)} = {ratio:.3f} (target 1 +- {RATIO_LIMIT:g})",
            "pass": "PASS" if abs(ratio - 1) <= RATIO_LIMIT else "FAIL", "data": {"ratio": ratio}}


def cmd_final(rows, args):
    out = args[0]
    meta = {}
    if len(args) >= 3 and args[1] == "--meta":
        try:
            meta = json.loads(args[2])
        except ValueError:
            meta = {"meta": args[2]}
    try:
        all_rows = [json.loads(line) for line in open(rows, encoding="utf-8") if line.strip()]
    except OSError:
        all_rows = []
    extra = ratio_row(all_rows)
    if extra:
        all_rows.append(extra)
    counts = {v: sum(r["pass"] == v for r in all_rows) for v in ("PASS", "FAIL", "SKIP")}
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "counts": counts, "rows": all_rows}, f, ensure_ascii=False, indent=1)

    table = [("step", "what", "figure", "pass")]
    for r in all_rows:
        figure = str(r.get("figure", ""))
        if len(figure) > 100:
            figure = figure[:97] + "..."
        table.append((r["step"], str(r["what"])[:44], figure, r["pass"]))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print()
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skip"
          + (f"; {meta.get('elapsed_s')} s" if "elapsed_s" in meta else ""))
    return 0 if counts["FAIL"] == 0 and counts["PASS"] > 0 else 1


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rows, command, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    handler = {"row": cmd_row, "gpucheck": cmd_gpucheck, "bench": cmd_bench, "serve": cmd_serve,
               "final": cmd_final}.get(command)
    if handler is None:
        sys.exit(f"unknown command {command}\n{__doc__}")
    sys.exit(handler(rows, args) or 0)


if __name__ == "__main__":
    main()
