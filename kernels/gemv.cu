// Decode-time matrix product for a few rows: y[m, n] = Σ_k x[m, k] · W[n, k] (+ bias[n]),
// W as PyTorch stores it ([out, in], row-major). Decode is bound by reading W once, so a
// block of GEMV_THREADS streams one row of W with 16-byte loads, four in flight per thread,
// and applies each loaded chunk to all m ≤ GEMV_MAX_ROWS rows of x (x is small and stays in
// L1/L2). One row of W per block gives thousands of small blocks: the last wave is a small
// share of the work, where a warp per row left the last of few waves mostly idle.
// Every output is summed in the same order whatever m is, so a sequence's result does not
// depend on its batch.
// grid: N; block: GEMV_THREADS.
#define GEMV_MAX_ROWS 8
#define GEMV_THREADS 128

// acc[r] += Σ_k x[r, k] · w_row[k] for r < m, over this block's share of k.
__device__ __forceinline__ void accumulate_row(const elem* __restrict__ x,
                                               const elem* __restrict__ w_row,
                                               float acc[GEMV_MAX_ROWS], int m, int k) {
    constexpr int V = 16 / sizeof(elem);
    const int tid = threadIdx.x;
    if (k % V == 0) {
        // Rows of W and x start on 16-byte boundaries: k·sizeof(elem) is a multiple of 16
        // and every buffer comes from cudaMalloc.
        const int chunks = k / V;
        const int4* w4 = reinterpret_cast<const int4*>(w_row);
        int c = tid;
        for (; c + 3 * GEMV_THREADS < chunks; c += 4 * GEMV_THREADS) {
            Chunk wc[4];
#pragma unroll
            for (int u = 0; u < 4; u++) wc[u].raw = __ldg(w4 + c + GEMV_THREADS * u);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < m) {
                    const int4* x4 = reinterpret_cast<const int4*>(x + (size_t)r * k);
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        Chunk xc;
                        xc.raw = __ldg(x4 + c + GEMV_THREADS * u);
#pragma unroll
                        for (int j = 0; j < V; j++) acc[r] += to_f32(wc[u].e[j]) * to_f32(xc.e[j]);
                    }
                }
            }
        }
        for (; c < chunks; c += GEMV_THREADS) {
            Chunk wc;
            wc.raw = __ldg(w4 + c);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < m) {
                    Chunk xc;
                    xc.raw = __ldg(reinterpret_cast<const int4*>(x + (size_t)r * k) + c);
#pragma unroll
                    for (int j = 0; j < V; j++) acc[r] += to_f32(wc.e[j]) * to_f32(xc.e[j]);
                }
            }
        }
    } else {
        for (int i = tid; i < k; i += GEMV_THREADS) {
            const float wv = to_f32(w_row[i]);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++)
                if (r < m) acc[r] += wv * to_f32(x[(size_t)r * k + i]);
        }
    }
}

// Sums acc[r] over the block; thread r < m gets row r's total.
__device__ __forceinline__ float block_row_sum(float acc[GEMV_MAX_ROWS], int m,
                                               float (*partial)[GEMV_THREADS / 32]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) partial[r][warp] = s;
        }
    }
    __syncthreads();
    float sum = 0.0f;
    if ((int)threadIdx.x < m) {
#pragma unroll
        for (int w = 0; w < GEMV_THREADS / 32; w++) sum += partial[threadIdx.x][w];
    }
    return sum;
}

template <typename OUT>
__device__ __forceinline__ void gemv(const elem* __restrict__ x, const elem* __restrict__ w,
                                     const elem* __restrict__ bias, OUT* __restrict__ y, int m,
                                     int n, int k) {
    const int col = blockIdx.x;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[r] = 0.0f;
    accumulate_row(x, w + (size_t)col * k, acc, m, k);
    __shared__ float partial[GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_row_sum(acc, m, partial);
    if ((int)threadIdx.x < m) {
        const float b = bias ? to_f32(bias[col]) : 0.0f;
        y[(size_t)threadIdx.x * n + col] = from_f32<OUT>(sum + b);
    }
}

// The [gate | up] product and SwiGLU in one: block `col` reads W rows col (gate) and
// width + col (up) and writes act[r, col] = silu(gate) · up, rounding gate and up to elem
// first as the unfused path (product, then silu_mul) does. grid: width.
extern "C" __global__ void gemv_swiglu(const elem* __restrict__ x, const elem* __restrict__ w,
                                       elem* __restrict__ act, int m, int width, int k) {
    const int col = blockIdx.x;
    float gate[GEMV_MAX_ROWS], up[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) gate[r] = up[r] = 0.0f;
    accumulate_row(x, w + (size_t)col * k, gate, m, k);
    accumulate_row(x, w + (size_t)(width + col) * k, up, m, k);
    __shared__ float partial[GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float g = to_f32(from_f32<elem>(block_row_sum(gate, m, partial)));
    __syncthreads();  // `partial` is reused
    const float u = to_f32(from_f32<elem>(block_row_sum(up, m, partial)));
    if ((int)threadIdx.x < m) act[(size_t)threadIdx.x * width + col] = from_f32<elem>(g / (1.0f + expf(-g)) * u);
}

extern "C" __global__ void gemv_elem(const elem* x, const elem* w, const elem* bias, elem* y, int m,
                                     int n, int k) {
    gemv<elem>(x, w, bias, y, m, n, k);
}

// The output projection: logits in f32 for the sampler.
extern "C" __global__ void gemv_f32(const elem* x, const elem* w, const elem* bias, float* y, int m,
                                    int n, int k) {
    gemv<float>(x, w, bias, y, m, n, k);
}

// Bias for the cuBLAS path (prefill): y[r, c] += bias[c].
extern "C" __global__ void add_bias(elem* __restrict__ y, const elem* __restrict__ bias, int n,
                                    int total) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) y[i] = from_f32<elem>(to_f32(y[i]) + to_f32(bias[i % n]));
}
