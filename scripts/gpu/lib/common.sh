# Sourced from the repo root by scripts/gpu/bench.sh and its helpers (serve_load.sh,
# profile.sh): what runs on the GPU machine needs the CUDA libraries on the loader path and
# the binaries pack.sh put in .carry unpacked, since that machine has no cargo or network.
OUT=${OUT:-/tmp/gpucheck-out}
CARRY=/tmp/carry
mkdir -p "$OUT" "$CARRY"
case ":$PATH:" in *:/usr/local/cuda/bin:*) ;; *) [ -d /usr/local/cuda/bin ] && PATH=$PATH:/usr/local/cuda/bin ;; esac
export PATH
# cudarc opens libcuda, libnvrtc and libcublas at run time (a deployment sets
# LD_LIBRARY_PATH the same way).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$d:"*) ;;
        *) [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d" ;;
    esac
done

# carry_binary NAME...: .carry/NAME.xz unpacked once into $CARRY/NAME, executable
carry_binary() {
    local name
    for name in "$@"; do
        [ -x "$CARRY/$name" ] ||
            { xz -dc ".carry/$name.xz" > "$CARRY/$name" && chmod +x "$CARRY/$name"; }
    done
}

# carry_server: tritonserver into /tmp/ts and the Python client into $CARRY/pylib, once;
# the carried cp312 rapidjson first, the json shim (lib/pyshim) where it does not load.
carry_server() {
    [ -x /tmp/ts/tritonserver/bin/tritonserver ] || python3 -m tarfile -e .carry/tritonserver.tar.xz /tmp/ts
    [ -d "$CARRY/pylib" ] || python3 -m tarfile -e .carry/pylib.tar.xz "$CARRY/pylib"
    case ":${PYTHONPATH:-}:" in
        *":$CARRY/pylib:"*) ;;
        *) export PYTHONPATH="$CARRY/pylib:$PWD/scripts/gpu/lib/pyshim${PYTHONPATH:+:$PYTHONPATH}" ;;
    esac
}

# The budgeted runner of bench.sh's composite parts: `budget SECONDS LOG` starts the clock
# (LOG: the part's summary file under $OUT); `step` runs a command only while the budget
# allows and stops it when the budget runs out, so that one slow step costs the steps after
# it, not the whole run's results.
budget() {
    START=$(date +%s) BUDGET=$1 LOG=$2
    record_run
}
# record_run: what a part's figures came from, at the top of its log: the date, the commit
# and build pack.sh recorded, and the device.
record_run() {
    {
        echo "== run $(date -u +%FT%TZ), part ${PART:-?}"
        grep -iE "commit|dirty" .carry/MANIFEST.txt 2>/dev/null | head -3 | sed 's/^/== /'
        nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/== device: /'
    } | tee -a "$OUT/$LOG"
}
left() { echo $((START + BUDGET - $(date +%s))); }
step() { # step NAME NEEDED_SECONDS COMMAND... (returns the command's exit status)
    local name=$1 needed=$2 rc
    shift 2
    if [ "$(left)" -lt "$needed" ]; then
        echo "== $name: skipped, $(left) s left of the budget" | tee -a "$OUT/$LOG"
        return 125
    fi
    echo "== $name" | tee -a "$OUT/$LOG"
    timeout "$(left)" "$@"
    rc=$?
    echo "== $name: exit $rc" | tee -a "$OUT/$LOG"
    return $rc
}
# gpu_tests NEEDED_SECONDS [GREP_PATTERN]: the GPU tests first, so that a part's figures
# come from a build that passed them: a failing (or skipped) run stops the part, with no
# figures. The whole log is $OUT/gpu_tests.log, the console gets the lines GREP_PATTERN
# picks (default: the failed checks and the summary); the step's exit is the tests'.
gpu_tests() {
    local pattern=${2:-'^GPUCHECK.*"pass":false|^    [a-z_]+$|test result'}
    carry_binary gpu_tests
    if ! step "gpu tests" "$1" bash -c "$CARRY/gpu_tests --include-ignored --skip sticky_cuda_error_in_this_process --test-threads 1 --nocapture > '$OUT/gpu_tests.log' 2>&1; \
        rc=\$?; grep -E '$pattern' '$OUT/gpu_tests.log'; exit \$rc"; then
        echo "== the GPU tests did not pass: this part stops here (gpu_tests.log)" | tee -a "$OUT/$LOG"
        summary
        exit 1
    fi
}
# serve NAME LOG NEEDED_SECONDS [VAR=VALUE ...]: lib/serve_load.sh at the levels in the
# array LEVELS for SECONDS_EACH seconds each, the environment as given; the server's log
# kept as $OUT/LOG.
serve() {
    local name=$1 log=$2 needed=$3
    shift 3
    step "$name" "$needed" env "$@" bash scripts/gpu/lib/serve_load.sh "$SECONDS_EACH" "${LEVELS[@]}"
    cp /tmp/load-server.log "$OUT/$log" 2>/dev/null
}
# The servers' logs go back as one archive: fewer files to bring back from the machine.
pack_server_logs() {
    (cd "$OUT" && tar -cJf servers.tar.xz server-*.log 2>/dev/null && rm -f server-*.log)
}
# summary: the part's one table (lib/table.py: the GPU tests, the benches with their A/B,
# the served levels, the peer) on the console and at the end of the part's log; no file of
# its own, since at most 8 files come back from the machine.
summary() {
    echo
    python3 scripts/gpu/lib/table.py "$OUT" | tee -a "$OUT/${LOG:-summary.txt}"
}
