#!/usr/bin/env bash
# Per-kernel times of one forward call of a 6B/7B shape, read with Nsight Compute on the GPU
# machine; run by `bash scripts/gpu/bench.sh profile`:
#
#   bash scripts/gpu/lib/profile.sh [SHAPE] [BATCH] [PROMPT] [NEW]
#
# Records every kernel of a short bench run and keeps those of its last forward call (from
# the last `embedding` launch to the logits product after it): with NEW=2 (default) a decode
# step at context PROMPT+1, with NEW=1 the prefill of PROMPT tokens. LAUNCHES (default 1700):
# the launches ncu records, which must reach past the profiled call.
# Prints a table by kernel: count, total µs, share of the call, and GB/s read+written.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source scripts/gpu/lib/common.sh
SHAPE=${1:-chatglm2-6b}
BATCH=${2:-1}
PROMPT=${3:-128}
NEW=${4:-2}
TAG=$SHAPE-b$BATCH-p$PROMPT-n$NEW
carry_binary triton-llm
CLI=$CARRY/triton-llm
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 240 "$NCU" --clock-control none --csv --print-units base \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    --launch-count "${LAUNCHES:-1700}" \
    "$CLI" bench --shape "$SHAPE" --load-format dummy --device cuda --batch "$BATCH" --prompt "$PROMPT" --new "$NEW" \
    > "$OUT/ncu-$TAG.csv" 2> "/tmp/ncu-$TAG.err"
echo "ncu exit $?"
echo "== $TAG"
python3 - "$OUT/ncu-$TAG.csv" <<'PY'
import csv, sys, collections
# The application's own stdout and ncu's ==PROF== lines come before the CSV header.
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
starts = [n for n, r in enumerate(rows) if r[0] == "ID"]
if not starts:
    print("no ncu rows"); print(open(sys.argv[1]).read()[-3000:]); sys.exit(0)
rows = rows[starts[0]:]
head = rows[0]
ix = {name: head.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
per = collections.defaultdict(dict)
names = {}
for r in rows[1:]:
    i = int(r[ix["ID"]])
    names[i] = r[ix["Kernel Name"]].split("(")[0][:60]
    try:
        per[i][r[ix["Metric Name"]]] = float(r[ix["Metric Value"]].replace(",", ""))
    except ValueError:
        pass
order = sorted(per)
starts = [i for i in order if names[i].startswith("embedding")]
if starts:
    first = starts[-1]
    # The call ends with the logits product (gemv_f32 for a single row); with more rows
    # cuBLAS makes the logits, and the bench's kernel sweep after it begins with fill_uniform.
    ends = [i for i in order if i > first and names[i].startswith(("gemv_f32", "fill_uniform"))]
    last = ends[0] if ends else order[-1]
    if names[last].startswith("fill_uniform"):
        last -= 1
    per = {i: per[i] for i in order if first <= i <= last}
    print(f"decode step: launches {first}..{last}")
agg = collections.defaultdict(lambda: [0, 0.0, 0.0])
for i, m in per.items():
    a = agg[names[i]]
    a[0] += 1
    a[1] += m.get("gpu__time_duration.sum", 0)
    a[2] += m.get("dram__bytes_read.sum", 0) + m.get("dram__bytes_write.sum", 0)
total = sum(a[1] for a in agg.values())
print(f"{len(per)} kernels, {total/1e3:.1f} us of kernel time")
print(f"{'kernel':60} {'n':>5} {'total us':>10} {'share':>6} {'GB/s':>8}")
for name, (n, ns, by) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{name:60} {n:5d} {ns/1e3:10.1f} {100*ns/total:5.1f}% {by/ns if ns else 0:8.0f}")
PY
