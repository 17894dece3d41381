#!/usr/bin/env bash
# Every GPU correctness check in one run, on the GPU machine, from the repo root, after
# scripts/gpu/pack.sh filled .carry here and .carry travelled with the tree (the
# measurements are scripts/gpu/bench.sh's):
#
#   bash scripts/gpu/check.sh
#
#   a  gpu_tests: the `cargo test --release --test gpu` executable (GPUCHECK lines -> rows)
#   b  compute-sanitizer memcheck on `triton-llm generate` (chatglm2-tiny, then internlm2-tiny)
#   c  `triton-llm bench` on the 6B/7B shapes with dummy weights (one JSON object each): the
#      bench runs on the device, and c1 is what d's served tokens/s is held against
#   d  tritonserver + libtriton_llm.so, KIND_GPU, chatglm2-6b dummy: HTTP generate, gRPC tokens/s
#      (lib/serve_check.py) against bench c1's output_tokens_per_s
#   s  (only when asked: GPUCHECK_STEPS=s GPUCHECK_BUDGET_S=590) the soak of
#      tests/e2e/test_soak.py on KIND_GPU instances: GPUCHECK_SOAK_STREAMS streams (256) for
#      what the budget leaves (a command runs 10 minutes at most: about 8 minutes of load),
#      0 unanswered, RSS and GPU memory flat, the engines idle after
#
# Every step has a timeout and the whole run a time limit (GPUCHECK_BUDGET_S, default 520 s):
# a step gets at most what is left after a reserve for the steps after it, and is skipped
# when too little is left, so a hung step cannot cost the run its table. No step stops the
# run. Full logs: $OUT/logs.txt; rows: $OUT/results.json (lib/results.py); the last thing
# printed is the table. Exit 0 when no row failed.
#
# Knobs (for trying it elsewhere, e.g. on a CPU box with the tiny model):
#   GPUCHECK_STEPS="a b c d"   steps to run      GPUCHECK_BUDGET_S=520
#   GPUCHECK_KIND=KIND_GPU     instance kind in d
#   GPUCHECK_SERVE_DIR=DIR     serve this model folder (real weights) in d instead of the
#                              chatglm2-6b shape with load_format dummy
#   GPUCHECK_DTYPE=bf16        the model's dtype parameter in d ("" leaves it out)
#   GPUCHECK_PORT=8000         HTTP port; gRPC and metrics are the next two
#   GPUCHECK_NEW=256           tokens per timed answer in d
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
START=$(date +%s)
BUDGET=${GPUCHECK_BUDGET_S:-520}
DEADLINE=$((START + BUDGET))
OUT=${OUT:-/tmp/gpucheck-out}
W=/tmp/gpucheck
CARRY=/tmp/carry
TS=/tmp/ts
STEPS=" ${GPUCHECK_STEPS:-a b c d} "
KIND=${GPUCHECK_KIND:-KIND_GPU}
DTYPE=${GPUCHECK_DTYPE-bf16}
HTTP_PORT=${GPUCHECK_PORT:-8000}
GRPC_PORT=$((HTTP_PORT + 1))
METRICS_PORT=$((HTTP_PORT + 2))
NEW=${GPUCHECK_NEW:-256}
SERVE_MODEL=chatglm2_6b_gpu

rm -rf "$W" "$CARRY"
mkdir -p "$W" "$OUT" "$CARRY"
ROWS=$W/rows.jsonl
LOGS=$OUT/logs.txt
: > "$ROWS"
: > "$LOGS"
[ -d /usr/local/cuda/bin ] && PATH=$PATH:/usr/local/cuda/bin
export PATH

R() { python3 "$REPO/scripts/gpu/lib/results.py" "$ROWS" "$@"; }
now() { date +%s; }
has() { [[ "$STEPS" == *" $1 "* ]]; }

# alloc NOMINAL RESERVE MIN: seconds a step may take (0 = skip it): at most NOMINAL, and
# leaving RESERVE seconds of the budget for the steps after it.
alloc() {
    local t=$1 left=$((DEADLINE - $(now) - $2))
    [ "$left" -lt "$t" ] && t=$left
    [ "$t" -lt "$3" ] && t=0
    echo "$t"
}

# keep_log NAME FILE: appends FILE to logs.txt (at most ~2 MB of it)
keep_log() {
    local size
    size=$(stat -c %s "$2" 2>/dev/null || echo 0)
    {
        echo "===== $1 ($size bytes) ====="
        if [ "$size" -gt 3000000 ]; then
            head -c 1000000 "$2"
            printf '\n... [middle cut] ...\n'
            tail -c 1000000 "$2"
        else
            cat "$2" 2>/dev/null
        fi
        echo
    } >> "$LOGS"
}

# say STEP WHAT VERDICT SECONDS [LOG]: one progress line; a failure shows the log's tail
say() {
    printf '[%s] %-40s %-4s %4ss\n' "$1" "$2" "$3" "$4"
    if [ "$3" = FAIL ] && [ -n "${5:-}" ] && [ -s "$5" ]; then
        tail -n 6 "$5" | cut -c1-220 | sed 's/^/      | /'
    fi
}

# timed T LOG CMD...: runs CMD with a timeout, all output to LOG; sets RC and SECS
timed() {
    local t=$1 log=$2 t0
    shift 2
    t0=$(now)
    timeout -k 5 "$t" "$@" > "$log" 2>&1
    RC=$?
    SECS=$(($(now) - t0))
}

skip() { # STEP WHAT WHY
    R row "$1" "$2" "$3" SKIP
    say "$1" "$2" SKIP 0
}

# ---------------------------------------------------------------------------- unpack
unxz_to() { # SRC DST
    if command -v xz >/dev/null; then
        xz -dc "$1" > "$2"
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
    fi
}
echo "gpucheck: $(head -n1 .carry/MANIFEST.txt 2>/dev/null || echo 'no .carry/MANIFEST.txt')"
for name in triton-llm libtriton_llm.so gpu_tests; do
    if [ -f ".carry/$name.xz" ] && unxz_to ".carry/$name.xz" "$CARRY/$name"; then
        chmod +x "$CARRY/$name"
    else
        rm -f "$CARRY/$name"
        R row setup "$name" "missing .carry/$name.xz" FAIL
        say setup "$name (missing .carry/$name.xz)" FAIL 0
    fi
done
# tritonserver unpacks in the background while a-c run
rm -rf "$TS"
mkdir -p "$TS"
if [ -f .carry/tritonserver.tar.xz ]; then
    (python3 -m tarfile -e .carry/tritonserver.tar.xz "$TS" > "$W/ts_unpack.log" 2>&1; echo $? > "$W/ts_unpack.rc") &
    TS_UNPACK=$!
else
    TS_UNPACK=""
fi
if [ -f .carry/pylib.tar.xz ] && python3 -m tarfile -e .carry/pylib.tar.xz "$CARRY/pylib" > "$W/pylib.log" 2>&1; then
    :
else
    R row setup pylib "missing or broken .carry/pylib.tar.xz" FAIL
fi
# The carried cp312 rapidjson first; the json shim where it does not load.
export PYTHONPATH="$CARRY/pylib:$REPO/scripts/gpu/lib/pyshim${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_LLM_CLI=$CARRY/triton-llm TRITON_LLM_LIB=$CARRY/libtriton_llm.so
# Tests compiled with env!("CARGO_MANIFEST_DIR") look for fixtures under the build's path.
build_repo=$(sed -n 's/^build_repo=//p' .carry/MANIFEST.txt 2>/dev/null)
if [ -n "$build_repo" ] && [ "$build_repo" != "$REPO" ] && [ ! -e "$build_repo" ]; then
    mkdir -p "$(dirname "$build_repo")" && ln -s "$REPO" "$build_repo" \
        && echo "gpucheck: linked $build_repo -> $REPO (the tests' compile-time CARGO_MANIFEST_DIR)"
fi

# cudarc opens libcuda, libnvrtc and libcublas at run time: make sure the toolkit's are on
# the loader path (a deployment sets LD_LIBRARY_PATH the same way).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so' && ! ls /usr/local/cuda/lib64/libnvrtc.so* >/dev/null 2>&1; then
    nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)
    for d in "$nv"/nvidia/cu13/lib "$nv"/nvidia/*/lib; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
    done
fi
{ echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; ldconfig -p 2>/dev/null | grep -E 'libnvrtc|libcublas\.|libcuda\.' ; ls /usr/local/cuda/lib64 2>/dev/null | grep -E 'nvrtc|cublas' ; } > "$W/libs.txt" 2>&1
keep_log libraries "$W/libs.txt"
GPU=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1)
echo "$GPU"
{
    echo "===== environment ====="
    echo "$GPU"
    cat .carry/MANIFEST.txt 2>/dev/null
    (nvcc --version 2>&1 | tail -n 2; command -v compute-sanitizer; python3 -V) 2>&1
    python3 -c 'import numpy, grpc, google.protobuf as p; print("numpy", numpy.__version__, "grpcio", grpc.__version__, "protobuf", p.__version__)' 2>&1
    python3 -c 'import tritonclient.grpc, rapidjson; print("tritonclient.grpc imports; rapidjson from", rapidjson.__file__)' 2>&1
} >> "$LOGS"

# ---------------------------------------------------------------------------- a: gpu tests
if has a; then
    what="gpu_tests (cargo test --test gpu)"
    t=$(alloc 120 330 30)
    if [ ! -x "$CARRY/gpu_tests" ]; then
        skip a "$what" "no gpu_tests in .carry"
    elif [ "$t" = 0 ]; then
        skip a "$what" "no time left"
    else
        log=$W/a_gpu_tests.log
        timed "$t" "$log" "$CARRY/gpu_tests" --include-ignored --skip sticky_cuda_error_in_this_process --test-threads 1 --nocapture
        summary=$(grep -E '^test result:' "$log" | tail -n1 | sed -E 's/^test result: //; s/; [0-9]+ measured.*//')
        lines=$(grep -c 'GPUCHECK ' "$log")
        if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
            # with --test-threads 1 the last "test NAME ... " without a verdict is the one that hung
            hung=$(grep -E '^test [^ ]+ \.\.\. ' "$log" | tail -n1 | grep -vE '\.\.\. (ok|FAILED|ignored)' | cut -d' ' -f2)
            summary="timed out after ${t}s${hung:+ in $hung}; $summary"
        fi
        skipped=$(grep -ci 'skipped' "$log")
        [ "$skipped" -gt 0 ] || skipped=""
        # a run whose tests all skipped (no CUDA found) prints no GPUCHECK line: not a pass
        verdict=$([ "$RC" = 0 ] && [ "$lines" -gt 0 ] && echo PASS || echo FAIL)
        R row a "$what" "${summary:-exit $RC}; $lines GPUCHECK lines${skipped:+, $skipped lines say skipped}" \
            "$verdict" --seconds "$SECS"
        say a "$what" "$verdict" "$SECS" "$log"
        # names under libtest's last "failures:" header (the verdict may not share the test's line)
        awk '/^failures:$/ { n = 1; c = 0; next } n && /^    [^ ]/ { names[c++] = $1 } n && /^$/ { n = 0 }
             END { for (i = 0; i < c; i++) print names[i] }' "$log" | while read -r name; do
            R row a "failed: $name" "see logs.txt" FAIL
        done
        R gpucheck a "$log" > /dev/null
        keep_log "a: gpu_tests" "$log"
    fi
fi

# ---------------------------------------------------------------------------- b: memcheck
if has b; then
    sanitizer=$(command -v compute-sanitizer || true)
    for model in chatglm2-tiny internlm2-tiny; do
        what="memcheck generate $model"
        if [ "$model" = chatglm2-tiny ]; then t=$(alloc 90 270 30); else t=$(alloc 90 300 30); fi
        if [ -z "$sanitizer" ]; then
            R row b "$what" "compute-sanitizer not found" FAIL
            say b "$what (no compute-sanitizer)" FAIL 0
            continue
        elif [ ! -x "$CARRY/triton-llm" ]; then
            skip b "$what" "no triton-llm in .carry"
            continue
        elif [ "$t" = 0 ]; then
            skip b "$what" "no time left"
            continue
        fi
        log=$W/b_memcheck_$model.log
        timed "$t" "$log" "$sanitizer" --tool memcheck --error-exitcode 1 "$CARRY/triton-llm" generate \
            --model "tests/fixtures/$model" --device cuda --prompt "你好" --max-new-tokens 8
        summary=$(grep -oE 'ERROR SUMMARY: [0-9]+ errors?' "$log" | tail -n1)
        if [ "$RC" = 0 ] && [ "$summary" = "ERROR SUMMARY: 0 errors" ]; then verdict=PASS; else verdict=FAIL; fi
        figure="${summary:-no ERROR SUMMARY}, exit $RC"
        { [ "$RC" = 124 ] || [ "$RC" = 137 ]; } && figure="timed out after ${t}s; $figure"
        R row b "$what" "$figure" "$verdict" --seconds "$SECS"
        say b "$what" "$verdict" "$SECS" "$log"
        keep_log "b: $what" "$log"
    done
fi

# ---------------------------------------------------------------------------- c: bench
if has c; then
    benches=(
        "chatglm2-6b b1 p128 n256|--shape chatglm2-6b --batch 1 --prompt 128 --new 256"
        "internlm2_5-7b b1 p128 n256|--shape internlm2_5-7b --batch 1 --prompt 128 --new 256"
        "chatglm2-6b b16 p128 n256|--shape chatglm2-6b --batch 16 --prompt 128 --new 256"
        "chatglm2-6b b1 p1024 n16|--shape chatglm2-6b --batch 1 --prompt 1024 --new 16"
    )
    i=0
    for entry in "${benches[@]}"; do
        i=$((i + 1))
        what="bench ${entry%%|*}"
        read -r -a bargs <<< "${entry#*|}"
        t=$(alloc 150 150 30)
        if [ ! -x "$CARRY/triton-llm" ]; then
            skip c "$what" "no triton-llm in .carry"
            continue
        elif [ "$t" = 0 ]; then
            skip c "$what" "no time left"
            continue
        fi
        out=$W/c$i.stdout err=$W/c$i.stderr
        t0=$(now)
        # The medians of 3 runs: what d's served tokens/s is held against.
        timeout -k 5 "$t" "$CARRY/triton-llm" bench "${bargs[@]}" --load-format dummy --device cuda \
            --runs 3 > "$out" 2> "$err"
        RC=$?
        SECS=$(($(now) - t0))
        R bench c "$what" "$out" "$RC" "$SECS"
        verdict=$(tail -n1 "$ROWS" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pass"])')
        cat "$out" "$err" > "$W/c$i.log"
        say c "$what" "$verdict" "$SECS" "$W/c$i.log"
        keep_log "c: $what (stdout, then stderr)" "$W/c$i.log"
    done
fi

# ---------------------------------------------------------------------------- d: tritonserver
SERVER=""
stop_server() {
    [ -n "$SERVER" ] || return 0
    kill -TERM "$SERVER" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$SERVER" 2>/dev/null
    wait "$SERVER" 2>/dev/null
    SERVER=""
}
trap stop_server EXIT

if has d; then
    what="tritonserver $KIND $SERVE_MODEL"
    step_start=$(now)
    t=$(alloc 240 5 60)
    [ -n "$TS_UNPACK" ] && wait "$TS_UNPACK"
    if [ "$(cat "$W/ts_unpack.rc" 2>/dev/null)" != 0 ] || [ ! -x "$TS/tritonserver/bin/tritonserver" ]; then
        cat "$W/ts_unpack.log" >> "$LOGS" 2>/dev/null
        R row d "$what" "tritonserver did not unpack from .carry/tritonserver.tar.xz" FAIL
        say d "$what (no tritonserver)" FAIL 0
    elif [ ! -f "$CARRY/libtriton_llm.so" ]; then
        skip d "$what" "no libtriton_llm.so in .carry"
    elif [ "$t" = 0 ]; then
        skip d "$what" "no time left"
    else
        step_end=$((step_start + t))
        rm -rf /tmp/repo /tmp/backends /tmp/models
        mkdir -p "/tmp/repo/$SERVE_MODEL/1" /tmp/backends/llm
        cp "$CARRY/libtriton_llm.so" /tmp/backends/llm/libtriton_llm.so
        if [ -n "${GPUCHECK_SERVE_DIR:-}" ]; then
            model_dir=$(cd "$GPUCHECK_SERVE_DIR" && pwd)
            load_format=""
        else
            model_dir=/tmp/models/chatglm2-6b
            load_format=dummy
            mkdir -p "$model_dir"
            cp bench/shapes/chatglm2-6b/config.json tests/fixtures/chatglm2/tokenizer.model "$model_dir/"
        fi
        python3 - "$SERVE_MODEL" "$KIND" "$model_dir" "$load_format" "$DTYPE" > "/tmp/repo/$SERVE_MODEL/config.pbtxt" <<'PY'
import re, sys
name, kind, model_dir, load_format, dtype = sys.argv[1:]
text = open("tests/model_repository/chatglm2-tiny/config.pbtxt").read()
text = "\n".join(l for l in text.splitlines() if not l.startswith("#")) + "\n"
text = re.sub(r'^name: ".*"$', f'name: "{name}"', text, flags=re.M)
text = re.sub(r"^instance_group .*$", f"instance_group [ {{ kind: {kind} count: 1 }} ]", text, flags=re.M)
text = re.sub(r"^parameters .*\n", "", text, flags=re.M)
params = {"model_dir": model_dir, "load_format": load_format, "dtype": dtype}
for key, value in params.items():
    if value:
        text += f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
print(text, end="")
PY
        slog=$W/d_server.log
        "$TS/tritonserver/bin/tritonserver" --model-repository /tmp/repo --backend-directory /tmp/backends \
            --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
            --allow-gpu-metrics=false > "$slog" 2>&1 &
        SERVER=$!
        ready_by=$(( $(now) + 120 < step_end - 30 ? $(now) + 120 : step_end - 30 ))
        ready=0
        while [ "$(now)" -lt "$ready_by" ]; do
            if ! kill -0 "$SERVER" 2>/dev/null; then break; fi
            if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$HTTP_PORT/v2/health/ready', timeout=2)" 2>/dev/null; then
                ready=1
                break
            fi
            sleep 1
        done
        load_s=$(($(now) - step_start))
        if [ "$ready" != 1 ]; then
            if kill -0 "$SERVER" 2>/dev/null; then why="not ready after ${load_s}s"; else why="server exited before ready"; fi
            R row d "$what ready" "$why" FAIL --seconds "$load_s"
            say d "$what ready" FAIL "$load_s" "$slog"
        else
            R row d "$what ready" "ready after ${load_s}s (config: $KIND${load_format:+, $load_format}${DTYPE:+, $DTYPE})" PASS --seconds "$load_s"
            say d "$what ready" PASS "$load_s"
            left=$((step_end - $(now) - 20))
            if [ "$left" -lt 20 ]; then
                skip d "$SERVE_MODEL requests" "no time left"
            else
                per=$(( left < 120 ? left : 120 ))
                clog=$W/d_client.log
                t0=$(now)
                timeout -k 5 "$left" python3 scripts/gpu/lib/serve_check.py --model "$SERVE_MODEL" \
                    --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
                    --new "$NEW" --timeout "$per" > "$W/d_client.stdout" 2> "$clog"
                RC=$?
                SECS=$(($(now) - t0))
                R serve d "$SERVE_MODEL" "$W/d_client.stdout" "$RC" "$SECS"
                verdict=$([ "$RC" = 0 ] && echo PASS || echo FAIL)
                cat "$W/d_client.stdout" >> "$clog"
                say d "$SERVE_MODEL http + grpc requests" "$verdict" "$SECS" "$clog"
                keep_log "d: lib/serve_check.py (stderr, then stdout)" "$clog"
            fi
        fi
        stop_server
        keep_log "d: tritonserver log" "$slog"
    fi
fi

# ---------------------------------------------------------------------------- s: GPU soak
if has s; then
    streams=${GPUCHECK_SOAK_STREAMS:-256}
    what="soak KIND_GPU $streams streams"
    t=$(alloc 600 5 120)
    [ -n "$TS_UNPACK" ] && wait "$TS_UNPACK"
    if [ ! -x "$TS/tritonserver/bin/tritonserver" ]; then
        R row s "$what" "tritonserver did not unpack from .carry/tritonserver.tar.xz" FAIL
        say s "$what (no tritonserver)" FAIL 0
    elif [ ! -f "$CARRY/libtriton_llm.so" ]; then
        skip s "$what" "no libtriton_llm.so in .carry"
    elif [ "$t" = 0 ]; then
        skip s "$what" "no time left"
    else
        # The load runs for what is left after the server's start and the drain after it.
        soak_s=$((t - 100))
        log=$W/s_soak.log
        timed "$t" "$log" env SOAK_KIND=KIND_GPU SOAK_STREAMS="$streams" SOAK_SECONDS="$soak_s" \
            TRITONSERVER_BIN="$TS/tritonserver/bin/tritonserver" \
            python3 -m pytest -q -s -p no:cacheprovider tests/e2e/test_soak.py
        line=$(grep -E '^soak ' "$log" | tail -n1 | cut -c1-400)
        verdict=$([ "$RC" = 0 ] && echo PASS || echo FAIL)
        { [ "$RC" = 124 ] || [ "$RC" = 137 ]; } && line="timed out after ${t}s; $line"
        R row s "$what, ${soak_s}s of load" "${line:-exit $RC}" "$verdict" --seconds "$SECS"
        say s "$what" "$verdict" "$SECS" "$log"
        keep_log "s: GPU soak" "$log"
    fi
fi

# ---------------------------------------------------------------------------- e: table
elapsed=$(($(now) - START))
meta=$(GPU="$GPU" ELAPSED="$elapsed" BUDGET="$BUDGET" python3 -c '
import json, os
manifest = open(".carry/MANIFEST.txt").read().splitlines() if os.path.exists(".carry/MANIFEST.txt") else []
print(json.dumps({"gpu": os.environ["GPU"], "elapsed_s": int(os.environ["ELAPSED"]),
                  "budget_s": int(os.environ["BUDGET"]), "carry": manifest[:1]}))')
R final "$OUT/results.json" --meta "$meta"
