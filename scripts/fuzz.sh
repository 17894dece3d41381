#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS (default 20) on its corpus in
# fuzz/corpus/<target>. Inputs found on the way go to a temporary directory, so the
# repository stays clean; a crash saves its input to fuzz/artifacts/<target>/, and the
# script fails after running the rest. Arguments name a subset of the targets.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
# cargo fuzz passes nightly-only flags to rustc; this lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# No sanitizer: only safe code is reached (unsafe lives in src/triton and src/cuda), and
# uninstrumented builds are faster to build and to run. Overflow checks stay on.
flags=(--sanitizer none)
cargo fuzz build "${flags[@]}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for target in "${targets[@]}"; do
    mkdir -p "$work/$target"
    dict=()
    [ -f "fuzz/dict/$target.dict" ] && dict=(-dict="fuzz/dict/$target.dict")
    # The first directory receives new inputs; the committed one is only read.
    if ! cargo fuzz run "${flags[@]}" "$target" "$work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1 "${dict[@]}"; then
        failed+=("$target")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
