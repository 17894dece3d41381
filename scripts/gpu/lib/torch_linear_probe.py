"""What PyTorch's bf16 linear (cuBLASLt) reaches for the skinny products of a decode step,
as a share of the copy bandwidth measured here: the reference for our cuBLAS path.

    bash scripts/gpu/bench.sh torch      (on the GPU machine; JSON lines, also $OUT/torch_linear.jsonl)
"""
import json

import torch

dev = torch.device("cuda")
torch.manual_seed(0)


def time_ms(fn, repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
copy_ms = time_ms(lambda: dst.copy_(src), 20)
bandwidth = 2 * src.numel() / (copy_ms * 1e-3)
print(json.dumps({"copy_gb_s": bandwidth / 1e9}), flush=True)
# PyTorch's own choice of library, then each of cuBLAS and cuBLASLt where it can be chosen.
libraries = ["default"]
if hasattr(torch.backends.cuda, "preferred_blas_library"):
    libraries += ["cublas", "cublaslt"]
for n, k in ((27392, 4096), (4096, 13696), (4608, 4096), (4096, 4096), (65024, 4096)):
    copies = max(2, (512 << 20) // (n * k * 2) + 1)
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.01 for _ in range(copies)]
    for library in libraries:
        if library != "default":
            torch.backends.cuda.preferred_blas_library(library)
        for m in (4, 8, 16, 64, 256, 512, 8192) if library == "default" else (8, 64, 8192):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            state = {"i": 0}

            def step():
                state["i"] = (state["i"] + 1) % copies
                torch.nn.functional.linear(x, weights[state["i"]])

            ms = time_ms(step, 8 * copies if m <= 512 else 10)
            print(json.dumps({"library": library, "n": n, "k": k, "m": m, "us": round(ms * 1e3, 1),
                              "percent_of_bandwidth": round(100 * n * k * 2 / (ms * 1e-3) / bandwidth, 1),
                              "tflops": round(2 * m * n * k / (ms * 1e-3) / 1e12, 1)}), flush=True)
    del weights
