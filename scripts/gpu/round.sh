# Sourced by the device rounds (serving_round.sh, ttft_round.sh, figures_round.sh) after
# they set BUDGET (seconds) and LOG (the round's summary file under $OUT): the CUDA
# libraries on the path, the carried binaries unpacked into /tmp/carry, `step`, which runs
# a command only while the budget allows and stops it when the budget runs out, and
# `serve`, a step of serve_load.sh.
OUT=${OUT:-/tmp/gpucheck-out}
mkdir -p "$OUT" /tmp/carry
START=$(date +%s)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
for binary in gpu_tests triton-llm; do
    [ -x /tmp/carry/$binary ] ||
        { xz -dc .carry/$binary.xz > /tmp/carry/$binary && chmod +x /tmp/carry/$binary; }
done

left() { echo $((START + BUDGET - $(date +%s))); }
step() { # step NAME NEEDED_SECONDS COMMAND...
    local name=$1 needed=$2
    shift 2
    if [ "$(left)" -lt "$needed" ]; then
        echo "== $name: skipped, $(left) s left of the budget" | tee -a "$OUT/$LOG"
        return
    fi
    echo "== $name" | tee -a "$OUT/$LOG"
    timeout "$(left)" "$@"
    echo "== $name: exit $?" | tee -a "$OUT/$LOG"
}
# serve NAME LOG NEEDED_SECONDS [VAR=VALUE ...]: scripts/gpu/serve_load.sh at the levels in
# the array LEVELS for SECONDS_EACH seconds each, the environment as given; the server's log
# kept as $OUT/LOG.
serve() {
    local name=$1 log=$2 needed=$3
    shift 3
    step "$name" "$needed" env "$@" bash scripts/gpu/serve_load.sh "$SECONDS_EACH" "${LEVELS[@]}"
    cp /tmp/load-server.log "$OUT/$log" 2>/dev/null
}
# A device call brings back 8 files at most: the servers' logs travel as one archive.
pack_server_logs() {
    (cd "$OUT" && tar -cJf servers.tar.xz server-*.log 2>/dev/null && rm -f server-*.log)
}
