# Sourced: points at the tritonserver that scripts/setup.sh installed into .venv-triton and
# at the release build of this crate.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_site="$("$_repo/.venv-triton/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export TRITONSERVER_BIN="$_site/pytriton/tritonserver/bin/tritonserver"
export TRITON_PYTHON="$_repo/.venv-triton/bin/python"
_target="${CARGO_TARGET_DIR:-$_repo/target}"
export TRITON_LLM_LIB="$_target/release/libtriton_llm.so"
export TRITON_LLM_CLI="$_target/release/triton-llm"
# The same library built with the test-only `fault-injection` feature (scripts/test.sh).
export TRITON_LLM_FAULT_LIB="$_target/fault-injection/libtriton_llm.so"
# CUDA 13's NVRTC and ptxas from PyPI wheels, for compiling the kernels without a GPU.
export TRITON_LLM_NVRTC_LIB="$_site/nvidia/cu13/lib"
export TRITON_LLM_PTXAS="$_site/nvidia/cu13/bin/ptxas"
# CUDA 12's (the `cuda-12` build, for Triton 24.10 to 25.07).
export TRITON_LLM_NVRTC12_LIB="$_site/nvidia/cuda_nvrtc/lib"
export TRITON_LLM_PTXAS12="$_site/nvidia/cuda_nvcc/bin/ptxas"
# NVIDIA's load generators: perf_analyzer of the tritonclient 2.51.0 wheel (with CUDA 12's
# runtime library from PyPI) and genai-perf, which drives it.
export PERF_ANALYZER_BIN="$_repo/.venv-triton/bin/perf_analyzer"
export PERF_ANALYZER_LIB="$_site/nvidia/cuda_runtime/lib"
export GENAI_PERF_BIN="$_repo/.venv-genai-perf/bin/genai-perf"
unset _repo _site _target
