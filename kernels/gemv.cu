// Decode-time matrix product for a few rows: y[m, n] = Σ_k x[m, k] · W[n, k] (+ bias[n]),
// W as PyTorch stores it ([out, in], row-major). Decode is bound by reading W once, so a
// block of GEMV_THREADS streams W with 16-byte loads, several in flight per thread, and
// applies each loaded chunk to all m ≤ GEMV_MAX_ROWS rows of x (x is small and stays in
// L1/L2). A block takes one row of W (thousands of small blocks: the last wave is a small
// share of the work). Each extra row of x is read from L1 again for every byte of W, so the
// kernel beats cuBLAS for one row only (BENCHMARKS.md). The engine runs it for a single
// sequence (GEMV_UP_TO_ROWS in src/cuda/blas.rs); `triton-llm bench` times both.
// Every output is summed in the same order whatever m and the rows a block takes (each
// thread's chunks in rising k, then the same block reduction), so a sequence's result does
// not depend on its batch.
// grid: N; block: GEMV_THREADS.
#define GEMV_MAX_ROWS 8
#define GEMV_THREADS 128

// acc[q][r] += Σ_k x[r, k] · w_rows[q][k] for r < m and q < Q, k < `k`, with DEPTH chunks of
// each row in flight; x's rows are `ldx` elems apart (a split of k passes its first element
// and the whole row's width).
template <int Q, int DEPTH>
__device__ __forceinline__ void accumulate_rows(const elem* __restrict__ x,
                                                const elem* const (&w_rows)[Q],
                                                float (&acc)[Q][GEMV_MAX_ROWS], int m, int k,
                                                int ldx) {
    constexpr int V = 16 / sizeof(elem);
    const int tid = threadIdx.x;
    if (k % V == 0) {
        // Rows of W and x start on 16-byte boundaries: k·sizeof(elem) is a multiple of 16
        // (and so are a split's first element and ldx) and every buffer comes from
        // cudaMalloc.
        const int chunks = k / V;
        int c = tid;
        for (; c + (DEPTH - 1) * GEMV_THREADS < chunks; c += DEPTH * GEMV_THREADS) {
            Chunk wc[Q][DEPTH];
#pragma unroll
            for (int q = 0; q < Q; q++)
#pragma unroll
                for (int u = 0; u < DEPTH; u++)
                    wc[q][u].raw = __ldg(reinterpret_cast<const int4*>(w_rows[q]) + c + GEMV_THREADS * u);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < m) {
                    const int4* x4 = reinterpret_cast<const int4*>(x + (size_t)r * ldx);
#pragma unroll
                    for (int u = 0; u < DEPTH; u++) {
                        Chunk xc;
                        xc.raw = __ldg(x4 + c + GEMV_THREADS * u);
                        float xv[V];
#pragma unroll
                        for (int j = 0; j < V; j++) xv[j] = to_f32(xc.e[j]);
#pragma unroll
                        for (int q = 0; q < Q; q++)
#pragma unroll
                            for (int j = 0; j < V; j++) acc[q][r] += to_f32(wc[q][u].e[j]) * xv[j];
                    }
                }
            }
        }
        for (; c < chunks; c += GEMV_THREADS) {
            Chunk wc[Q];
#pragma unroll
            for (int q = 0; q < Q; q++) wc[q].raw = __ldg(reinterpret_cast<const int4*>(w_rows[q]) + c);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < m) {
                    Chunk xc;
                    xc.raw = __ldg(reinterpret_cast<const int4*>(x + (size_t)r * ldx) + c);
                    float xv[V];
#pragma unroll
                    for (int j = 0; j < V; j++) xv[j] = to_f32(xc.e[j]);
#pragma unroll
                    for (int q = 0; q < Q; q++)
#pragma unroll
                        for (int j = 0; j < V; j++) acc[q][r] += to_f32(wc[q].e[j]) * xv[j];
                }
            }
        }
    } else {
        for (int i = tid; i < k; i += GEMV_THREADS) {
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < m) {
                    const float xv = to_f32(x[(size_t)r * ldx + i]);
#pragma unroll
                    for (int q = 0; q < Q; q++) acc[q][r] += to_f32(w_rows[q][i]) * xv;
                }
            }
        }
    }
}

// Sums acc[q][r] over the block; thread q·GEMV_MAX_ROWS + r (r < m) gets that total.
template <int Q>
__device__ __forceinline__ float block_rows_sum(float (&acc)[Q][GEMV_MAX_ROWS], int m,
                                                float (*partial)[GEMV_THREADS / 32]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int q = 0; q < Q; q++) {
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) {
            if (r < m) {
                const float s = warp_sum(acc[q][r]);
                if (lane == 0) partial[q * GEMV_MAX_ROWS + r][warp] = s;
            }
        }
    }
    __syncthreads();
    float sum = 0.0f;
    const int t = threadIdx.x;
    if (t < Q * GEMV_MAX_ROWS && t % GEMV_MAX_ROWS < m) {
#pragma unroll
        for (int w = 0; w < GEMV_THREADS / 32; w++) sum += partial[t][w];
    }
    return sum;
}

// Columns COLS·blockIdx.x onwards (the last block's rows past n repeat row n - 1 and are
// not written).
template <int COLS, int DEPTH, typename OUT>
__device__ __forceinline__ void gemv(const elem* __restrict__ x, const elem* __restrict__ w,
                                     const elem* __restrict__ bias, OUT* __restrict__ y, int m,
                                     int n, int k) {
    const int first = blockIdx.x * COLS;
    const elem* w_rows[COLS];
    float acc[COLS][GEMV_MAX_ROWS];
#pragma unroll
    for (int q = 0; q < COLS; q++) {
        w_rows[q] = w + (size_t)min(first + q, n - 1) * k;
        prefetch_l2(w_rows[q], (size_t)k * sizeof(elem));
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[q][r] = 0.0f;
    }
    kernel_entry();  // x comes from the previous kernel; the rows of W do not
    accumulate_rows<COLS, DEPTH>(x, w_rows, acc, m, k, k);
    __shared__ float partial[COLS * GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_rows_sum<COLS>(acc, m, partial);
    const int t = threadIdx.x, col = first + t / GEMV_MAX_ROWS, r = t % GEMV_MAX_ROWS;
    if (t < COLS * GEMV_MAX_ROWS && r < m && col < n) {
        const float b = bias ? to_f32(bias[col]) : 0.0f;
        y[(size_t)r * n + col] = from_f32<OUT>(sum + b);
    }
}

// The [gate | up] product and SwiGLU in one: a block reads the W rows of COLS columns of
// gate (col) and up (width + col) and writes act[r, col] = silu(gate) · up, rounding gate
// and up to elem first as the unfused path (product, then silu_mul) does.
// grid: ceil(width / COLS).
template <int COLS, int DEPTH>
__device__ __forceinline__ void gemv_swiglu_cols(const elem* __restrict__ x,
                                                 const elem* __restrict__ w,
                                                 elem* __restrict__ act, int m, int width, int k) {
    const int first = blockIdx.x * COLS;
    const elem* w_rows[2 * COLS];
    float acc[2 * COLS][GEMV_MAX_ROWS];
#pragma unroll
    for (int q = 0; q < COLS; q++) {
        const int col = min(first + q, width - 1);
        w_rows[q] = w + (size_t)col * k;                    // gate
        w_rows[COLS + q] = w + (size_t)(width + col) * k;   // up
        prefetch_l2(w_rows[q], (size_t)k * sizeof(elem));
        prefetch_l2(w_rows[COLS + q], (size_t)k * sizeof(elem));
    }
    kernel_entry();
#pragma unroll
    for (int q = 0; q < 2 * COLS; q++)
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[q][r] = 0.0f;
    accumulate_rows<2 * COLS, DEPTH>(x, w_rows, acc, m, k, k);
    __shared__ float partial[2 * COLS * GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_rows_sum<2 * COLS>(acc, m, partial);
    // Thread q·GEMV_MAX_ROWS + r holds gate (q < COLS) or up (q ≥ COLS) of column q mod
    // COLS, row r: the gate threads take the up totals through shared memory.
    __shared__ float rounded[2 * COLS * GEMV_MAX_ROWS];
    const int t = threadIdx.x;
    if (t < 2 * COLS * GEMV_MAX_ROWS) rounded[t] = to_f32(from_f32<elem>(sum));
    __syncthreads();
    const int col = first + t / GEMV_MAX_ROWS, r = t % GEMV_MAX_ROWS;
    if (t < COLS * GEMV_MAX_ROWS && r < m && col < width) {
        const float g = rounded[t], u = rounded[COLS * GEMV_MAX_ROWS + t];
        act[(size_t)r * width + col] = from_f32<elem>(g / (1.0f + expf(-g)) * u);
    }
}

// One row of W a block, four chunks in flight (a single sequence).
extern "C" __global__ void gemv_elem(const elem* x, const elem* w, const elem* bias, elem* y, int m,
                                     int n, int k) {
    gemv<1, 4, elem>(x, w, bias, y, m, n, k);
}

// The output projection: logits in f32 for the sampler.
extern "C" __global__ void gemv_f32(const elem* x, const elem* w, const elem* bias, float* y, int m,
                                    int n, int k) {
    gemv<1, 4, float>(x, w, bias, y, m, n, k);
}

// Its gate and up rows two chunks each in flight: four loads a thread, as the products.
extern "C" __global__ void gemv_swiglu(const elem* __restrict__ x, const elem* __restrict__ w,
                                       elem* __restrict__ act, int m, int width, int k) {
    gemv_swiglu_cols<1, 2>(x, w, act, m, width, k);
}

// Split-K for rows much longer than the output is wide (the down product at one sequence):
// block (col, s) sums split s of the row's 16-byte chunks and leaves it in
// partials[(s·m + r)·n + col]; the block that finishes last for the column adds the splits
// in split order (the same sum whichever finished first), with the bias, writes y and resets
// the column's counter for the next call. Shorter blocks than a whole row each: the chip's
// last wave drains sooner. k a multiple of 16 bytes of elems. grid: (n, splits); block:
// GEMV_THREADS; partials: splits·m·n floats; counters: n ints, zero between calls.
extern "C" __global__ void gemv_split_k(const elem* x, const elem* w, const elem* bias, elem* y,
                                        float* partials, int* counters, int m, int n, int k) {
    constexpr int V = 16 / sizeof(elem);
    const int col = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int chunks = k / V, per = (chunks + splits - 1) / splits;
    const int begin = min(chunks, split * per) * V, end = min(chunks, (split + 1) * per) * V;
    const elem* w_rows[1] = {w + (size_t)col * k + begin};
    prefetch_l2(w_rows[0], (size_t)(end - begin) * sizeof(elem));
    float acc[1][GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[0][r] = 0.0f;
    kernel_entry();  // x comes from the previous kernel; the row of W does not
    accumulate_rows<1, 4>(x + begin, w_rows, acc, m, end - begin, k);
    __shared__ float partial[GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_rows_sum<1>(acc, m, partial);
    const int t = threadIdx.x;
    if (t < m) partials[((size_t)split * m + t) * n + col] = sum;
    // The fence makes this block's share visible before it is counted.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (t == 0) last = atomicAdd(counters + col, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (t < m) {
        float total = 0.0f;
        for (int s = 0; s < splits; s++) total += __ldcg(partials + ((size_t)s * m + t) * n + col);
        y[(size_t)t * n + col] = from_f32<elem>(total + (bias ? to_f32(bias[col]) : 0.0f));
    }
    if (t == 0) counters[col] = 0;
}

// Bias for the cuBLAS path (prefill): y[r, c] += bias[c].
extern "C" __global__ void add_bias(elem* __restrict__ y, const elem* __restrict__ bias, int n,
                                    int total) {
    kernel_entry();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) y[i] = from_f32<elem>(to_f32(y[i]) + to_f32(bias[i % n]));
}
