#!/usr/bin/env bash
# Packs into the git-ignored .carry/ what the GPU scripts (scripts/gpu/check.sh, the
# correctness checks, and scripts/gpu/bench.sh, the measurements) need on a machine without
# cargo, network or tritonclient. Run here, in the dev checkout; then carry `.carry` along
# with the working tree and run `bash scripts/gpu/check.sh` or `bash scripts/gpu/bench.sh
# PART` there.
#
#   .carry/triton-llm.xz         release CLI, stripped
#   .carry/libtriton_llm.so.xz   release backend, stripped
#   .carry/gpu_tests.xz          `cargo test --release --test gpu --features fault-injection`
#                                executable, stripped (the feature makes the lost-device test's fault)
#   .carry/tritonserver.tar.xz   Triton 2.51.0 (../shared/tools/pack-tritonserver; reused if present)
#   .carry/pylib.tar.xz          tritonclient 2.51.0 (pure Python) + packaging + python-rapidjson (cp312)
#                                + pytest, pluggy, iniconfig (the GPU soak runs tests/e2e/test_soak.py)
#   .carry/MANIFEST.txt          what was packed, from which commit, the build's repo path
#
# Usage: scripts/gpu/pack.sh [--no-build] [--deps-only] [--force-server]
#   --no-build      do not run cargo: pack the artifacts already in ${CARGO_TARGET_DIR:-target}/release
#                   (the gpu test binary: the newest release/deps/gpu-* executable)
#   --deps-only     only the tritonserver archive and the Python client (no cargo, no binaries)
#   --force-server  repack tritonserver.tar.xz even if it exists (about a minute)
# Exit status 1 when an artifact is missing or .carry is over the size limit; what is missing
# is named in the summary. Everything that could be packed is packed regardless.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
build=1 binaries=1 force_server=0
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --deps-only) build=0 binaries=0 ;;
        --force-server) force_server=1 ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "pack: unknown option $arg" >&2; exit 2 ;;
    esac
done

LIMIT_MIB=50
carry=.carry
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$repo/$target" ;; esac
release="$target/release"
wheel_cache="${TMPDIR:-/tmp}/triton-llm-gpu-wheels"
mkdir -p "$carry"
missing=()
say() { echo "pack: $*" >&2; }

# xz-compresses a stripped copy of $1 to .carry/$2.xz
pack_binary() {
    local src=$1 name=$2
    if [ ! -f "$src" ]; then
        say "MISSING $name: $src does not exist"
        missing+=("$name ($src)")
        rm -f "$carry/$name.xz"
        return
    fi
    rm -f "$carry/$name" "$carry/$name.xz"
    if ! strip --strip-unneeded -o "$carry/$name" "$src" 2>/dev/null; then
        say "strip failed for $src; packing it unstripped"
        cp "$src" "$carry/$name"
    fi
    chmod +x "$carry/$name"
    xz -T2 -9 -f "$carry/$name"
    say "$name: $(stat -c %s "$src") bytes -> $(stat -c %s "$carry/$name.xz") bytes xz"
}

gpu_test_exe=""
if [ "$build" = 1 ]; then
    say "cargo test --release --locked --test gpu --features fault-injection --no-run"
    json=$(mktemp)
    # json-render-diagnostics: compiler errors print readably on stderr, the JSON lines
    # (artifacts) go to stdout.
    if ! cargo test --release --locked --test gpu --features fault-injection --no-run --message-format=json-render-diagnostics >"$json"; then
        say "FAILED: cargo test --release --locked --test gpu --features fault-injection --no-run (is there a tests/gpu.rs that compiles?)"
    fi
    gpu_test_exe=$(python3 - "$json" <<'PY'
import json, sys
exe = ""
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "gpu" \
            and msg.get("executable"):
        exe = msg["executable"]
print(exe)
PY
)
    rm -f "$json"
    [ -n "$gpu_test_exe" ] || say "MISSING gpu_tests: cargo reported no executable for the test target 'gpu'"
    # After the tests' build, whose fault-injection library would otherwise be the one packed.
    say "cargo build --release --locked"
    if ! cargo build --release --locked; then
        say "FAILED: cargo build --release --locked (see the errors above)"
        missing+=("cargo build --release failed")
    fi
elif [ "$binaries" = 1 ]; then
    # newest executable release/deps/gpu-<hash> (not the .d file)
    gpu_test_exe=$(find "$release/deps" -maxdepth 1 -type f -name 'gpu-*' -perm -u+x ! -name '*.d' \
        -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2-)
    [ -n "$gpu_test_exe" ] || say "MISSING gpu_tests: no executable $release/deps/gpu-* (build it with cargo test --release --test gpu --features fault-injection --no-run)"
fi

if [ "$binaries" = 1 ]; then
    pack_binary "$release/triton-llm" triton-llm
    pack_binary "$release/libtriton_llm.so" libtriton_llm.so
    if [ -n "$gpu_test_exe" ]; then
        pack_binary "$gpu_test_exe" gpu_tests
    else
        missing+=("gpu_tests (no executable for the test target 'gpu')")
        rm -f "$carry/gpu_tests.xz"
    fi
fi

# --- tritonserver -------------------------------------------------------------------------
server_archive="$carry/tritonserver.tar.xz"
if [ "$force_server" = 1 ] || [ ! -s "$server_archive" ]; then
    server_args=()
    if [ -z "${TRITONSERVER_BIN:-}" ] && [ -x .venv-triton/bin/python ]; then
        # scripts/setup.sh's venv: scripts/env.sh knows where its tritonserver lives.
        site=$(.venv-triton/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        [ -x "$site/pytriton/tritonserver/bin/tritonserver" ] && server_args=(--site "$site")
    fi
    say "packing tritonserver (about a minute)"
    if ! ../shared/tools/pack-tritonserver -o "$server_archive" "${server_args[@]}" >&2; then
        say "MISSING tritonserver.tar.xz: ../shared/tools/pack-tritonserver failed"
        missing+=("tritonserver.tar.xz")
    fi
else
    say "tritonserver.tar.xz exists; reusing it (--force-server repacks)"
fi

# --- Python client ------------------------------------------------------------------------
# tritonclient.grpc imports grpc, google.protobuf, numpy (on the GPU machine) and packaging,
# rapidjson (not there). The tritonclient wheel is 14 MB because it bundles perf_analyzer
# etc. under .data/data; only its pure-Python package is kept.
pylib_ok=1
mkdir -p "$wheel_cache"
if ! ls "$wheel_cache"/tritonclient-2.51.0-*.whl >/dev/null 2>&1 \
    || ! ls "$wheel_cache"/python_rapidjson-*-cp312-*.whl >/dev/null 2>&1 \
    || ! ls "$wheel_cache"/packaging-*.whl >/dev/null 2>&1 \
    || ! ls "$wheel_cache"/pytest-*.whl >/dev/null 2>&1 \
    || ! ls "$wheel_cache"/pluggy-*.whl >/dev/null 2>&1 \
    || ! ls "$wheel_cache"/iniconfig-*.whl >/dev/null 2>&1; then
    say "downloading wheels into $wheel_cache"
    if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux1_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$wheel_cache" tritonclient==2.51.0 python-rapidjson packaging pytest pluggy iniconfig >&2; then
        say "MISSING pylib: pip download failed"
        missing+=("pylib.tar.xz (pip download)")
        pylib_ok=0
    fi
fi
if [ "$pylib_ok" = 1 ]; then
    if ! python3 - "$wheel_cache" "$carry/pylib.tar.xz" <<'PY'
import glob, io, lzma, os, sys, tarfile, zipfile
cache, out = sys.argv[1], sys.argv[2]

def newest(pattern):
    found = sorted(glob.glob(os.path.join(cache, pattern)))
    if not found:
        sys.exit(f"no wheel {pattern} in {cache}")
    return found[-1]

members = []  # (archive name, bytes)
with zipfile.ZipFile(newest("tritonclient-2.51.0-*.whl")) as z:
    prefix = "tritonclient-2.51.0.data/purelib/"
    for name in z.namelist():
        if name.startswith(prefix + "tritonclient/") and not name.endswith("/"):
            members.append((name[len(prefix):], z.read(name)))
for pattern, tops in (("python_rapidjson-*-cp312-*.whl", ("rapidjson",)),
                      ("packaging-*.whl", ("packaging",)),
                      ("pytest-*.whl", ("pytest/", "_pytest/", "py.py")),
                      ("pluggy-*.whl", ("pluggy/",)),
                      ("iniconfig-*.whl", ("iniconfig/",))):
    with zipfile.ZipFile(newest(pattern)) as z:
        for name in z.namelist():
            if name.startswith(tops) and ".dist-info/" not in name and not name.endswith("/"):
                members.append((name, z.read(name)))
with lzma.open(out + ".part", "w", preset=9) as xzf, tarfile.open(fileobj=xzf, mode="w") as tf:
    for name, data in sorted(members):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tf.addfile(info, io.BytesIO(data))
os.replace(out + ".part", out)
print(f"pack: pylib.tar.xz: {len(members)} files, {sum(len(d) for _, d in members)} bytes unpacked",
      file=sys.stderr)
PY
    then
        missing+=("pylib.tar.xz")
    fi
fi

# --- manifest and size --------------------------------------------------------------------
{
    echo "packed $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
    # Integration tests compiled with env!("CARGO_MANIFEST_DIR") carry this absolute path.
    echo "build_repo=$repo"
    echo "missing=${missing[*]:-}"
    (cd "$carry" && for f in *; do [ "$f" = MANIFEST.txt ] || printf '%10d  %s\n' "$(stat -c %s "$f")" "$f"; done)
} > "$carry/MANIFEST.txt"

total=$(du -sb "$carry" | cut -f1)
echo "pack: .carry contents:" >&2
(cd "$carry" && ls -l --block-size=1 | tail -n +2 | awk '{printf "  %10d  %s\n", $5, $9}') >&2
printf 'pack: .carry total %d bytes (%.1f MiB; limit %d MiB; the tree itself travels too, 64 MiB in all)\n' \
    "$total" "$(awk -v t="$total" 'BEGIN { print t / 1048576 }')" "$LIMIT_MIB" >&2
status=0
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    say "ERROR: .carry is over $LIMIT_MIB MiB"
    status=1
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "ERROR: missing: ${missing[*]}"
    status=1
else
    say "ready: carry [\".carry\"], run: bash scripts/gpu/check.sh or bash scripts/gpu/bench.sh PART"
fi
exit $status
