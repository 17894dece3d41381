// Products with quantised weights, laid out at load (src/model/gpu/quant.rs):
//   W4: each row of W [n, k] as 4-bit levels, 8 to a 32-bit word in k order (input 8j + i in
//       bits 4i…4i+3 of word j), and per group of `group` inputs an f16 scale and an f16 zero,
//       packed as one word (scale low, zero high), [n, k / group]: w = (q − zero) · scale.
//       (AWQ's scales are f16 and its zeros small integers, so this is exact in f32.)
//   W8: each row as int8 levels in k order and one f32 scale per row: w = q · scale.
// Each weight is formed in f32 exactly as the CPU path dequantises it (cpu::QuantLinear),
// then the decode product runs as gemv.cu's: one row of W a block, each loaded chunk applied
// to all m ≤ GEMV_MAX_ROWS rows of x, the same summation order whatever m. Larger batches
// dequantise a weight into elems (dequant_w4 / dequant_w8) for cuBLAS.
// Needs k a multiple of 32 (W4; `group` too) or 16 (W8): checked at load.

// An f16's bits as f32, by hand: exact, and the module needs no half headers or PTX.
__device__ __forceinline__ float half_bits_to_f32(unsigned int h) {
    const unsigned int sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    unsigned int bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        // A subnormal: shift its leading one to the implicit bit.
        unsigned int m = mantissa, shifts = 0;
        while (!(m & 0x400u)) {
            m <<= 1;
            shifts++;
        }
        bits = sign | ((113u - shifts) << 23) | ((m & 0x3ffu) << 13);
    }
    return __uint_as_float(bits);
}

// 4-bit rows: 32 values (one 16-byte load) a chunk.
struct W4Rows {
    const int4* __restrict__ w;
    const unsigned int* __restrict__ params;
    int k, group;
    static constexpr int VALUES = 32;

    __device__ __forceinline__ int4 load(int row, int chunk) const {
        return __ldg(w + (size_t)row * (k / VALUES) + chunk);
    }
    __device__ __forceinline__ void dequantize(int row, int chunk, int4 packed, float (&out)[VALUES]) const {
        const unsigned int p = __ldg(params + (size_t)row * (k / group) + chunk * VALUES / group);
        const float scale = half_bits_to_f32(p & 0xffffu), zero = half_bits_to_f32(p >> 16);
        const unsigned int words[4] = {(unsigned int)packed.x, (unsigned int)packed.y,
                                       (unsigned int)packed.z, (unsigned int)packed.w};
#pragma unroll
        for (int word = 0; word < 4; word++)
#pragma unroll
            for (int i = 0; i < 8; i++)
                out[word * 8 + i] = ((float)((words[word] >> (4 * i)) & 0xfu) - zero) * scale;
    }
};

// 8-bit rows: 16 values a chunk.
struct W8Rows {
    const int4* __restrict__ w;
    const float* __restrict__ scales;
    int k;
    static constexpr int VALUES = 16;

    __device__ __forceinline__ int4 load(int row, int chunk) const {
        return __ldg(w + (size_t)row * (k / VALUES) + chunk);
    }
    __device__ __forceinline__ void dequantize(int row, int chunk, int4 packed, float (&out)[VALUES]) const {
        const float scale = __ldg(scales + row);
        const unsigned int words[4] = {(unsigned int)packed.x, (unsigned int)packed.y,
                                       (unsigned int)packed.z, (unsigned int)packed.w};
#pragma unroll
        for (int word = 0; word < 4; word++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                out[word * 4 + i] = (float)(signed char)((words[word] >> (8 * i)) & 0xffu) * scale;
    }
};

// acc[q][r] += Σ_k x[r, k] · W[rows[q], k] over this thread's chunks, DEPTH loads in flight.
template <typename Rows, int Q, int DEPTH>
__device__ __forceinline__ void accumulate_quant(const Rows& w, const elem* __restrict__ x,
                                                 const int (&rows)[Q], float (&acc)[Q][GEMV_MAX_ROWS],
                                                 int m, int k) {
    constexpr int N = Rows::VALUES, V = 16 / sizeof(elem);
    const int chunks = k / N;
    for (int first = threadIdx.x; first < chunks; first += DEPTH * GEMV_THREADS) {
        int4 packed[Q][DEPTH];
#pragma unroll
        for (int u = 0; u < DEPTH; u++) {
            const int c = first + u * GEMV_THREADS;
#pragma unroll
            for (int q = 0; q < Q; q++)
                if (c < chunks) packed[q][u] = w.load(rows[q], c);
        }
#pragma unroll
        for (int u = 0; u < DEPTH; u++) {
            const int c = first + u * GEMV_THREADS;
            if (c >= chunks) break;
            float weights[Q][N];
#pragma unroll
            for (int q = 0; q < Q; q++) w.dequantize(rows[q], c, packed[q][u], weights[q]);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; r++) {
                if (r < m) {
                    const int4* x4 = reinterpret_cast<const int4*>(x + (size_t)r * k + (size_t)c * N);
#pragma unroll
                    for (int v = 0; v < N / V; v++) {
                        Chunk xc;
                        xc.raw = __ldg(x4 + v);
#pragma unroll
                        for (int j = 0; j < V; j++) {
                            const float xv = to_f32(xc.e[j]);
#pragma unroll
                            for (int q = 0; q < Q; q++) acc[q][r] += weights[q][v * V + j] * xv;
                        }
                    }
                }
            }
        }
    }
}

// y[r, n] = Σ_k x[r, k] · W[n, k] (+ bias[n]), row blockIdx.x of W.
template <typename Rows>
__device__ __forceinline__ void gemv_quant(const Rows& w, const elem* __restrict__ x,
                                           const elem* __restrict__ bias, elem* __restrict__ y, int m,
                                           int n, int k) {
    const int rows[1] = {(int)blockIdx.x};
    float acc[1][GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[0][r] = 0.0f;
    accumulate_quant<Rows, 1, 4>(w, x, rows, acc, m, k);
    __shared__ float partial[GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_rows_sum<1>(acc, m, partial);
    const int t = threadIdx.x, col = blockIdx.x;
    if (t < m) y[(size_t)t * n + col] = from_f32<elem>(sum + (bias ? to_f32(bias[col]) : 0.0f));
}

// act[r, c] = silu(gate) · up for column c = blockIdx.x, gate and up the rows c and width + c
// of a [gate | up] weight, each rounded to elem first (as the unfused path does).
template <typename Rows>
__device__ __forceinline__ void gemv_quant_swiglu(const Rows& w, const elem* __restrict__ x,
                                                  elem* __restrict__ act, int m, int width, int k) {
    const int col = blockIdx.x;
    const int rows[2] = {col, width + col};
    float acc[2][GEMV_MAX_ROWS];
#pragma unroll
    for (int q = 0; q < 2; q++)
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[q][r] = 0.0f;
    accumulate_quant<Rows, 2, 2>(w, x, rows, acc, m, k);
    __shared__ float partial[2 * GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_rows_sum<2>(acc, m, partial);
    __shared__ float rounded[2 * GEMV_MAX_ROWS];
    const int t = threadIdx.x;
    if (t < 2 * GEMV_MAX_ROWS) rounded[t] = to_f32(from_f32<elem>(sum));
    __syncthreads();
    if (t < m) {
        const float g = rounded[t], u = rounded[GEMV_MAX_ROWS + t];
        act[(size_t)t * width + col] = from_f32<elem>(g / (1.0f + expf(-g)) * u);
    }
}

// grid: n; block: GEMV_THREADS.
extern "C" __global__ void gemv_w4(const int4* w, const unsigned int* params, const elem* x,
                                   const elem* bias, elem* y, int m, int n, int k, int group) {
    kernel_entry();
    gemv_quant(W4Rows{w, params, k, group}, x, bias, y, m, n, k);
}

extern "C" __global__ void gemv_w8(const int4* w, const float* scales, const elem* x,
                                   const elem* bias, elem* y, int m, int n, int k) {
    kernel_entry();
    gemv_quant(W8Rows{w, scales, k}, x, bias, y, m, n, k);
}

// grid: width; block: GEMV_THREADS.
extern "C" __global__ void gemv_w4_swiglu(const int4* w, const unsigned int* params, const elem* x,
                                          elem* act, int m, int width, int k, int group) {
    kernel_entry();
    gemv_quant_swiglu(W4Rows{w, params, k, group}, x, act, m, width, k);
}

extern "C" __global__ void gemv_w8_swiglu(const int4* w, const float* scales, const elem* x,
                                          elem* act, int m, int width, int k) {
    kernel_entry();
    gemv_quant_swiglu(W8Rows{w, scales, k}, x, act, m, width, k);
}

// W as elems [n, k] for cuBLAS, one chunk of a row per thread. grid: (ceil(k / VALUES / 128), n);
// block: 128.
template <typename Rows>
__device__ __forceinline__ void dequantize_rows(const Rows& w, elem* __restrict__ out, int k) {
    constexpr int N = Rows::VALUES;
    const int row = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= k / N) return;
    float values[N];
    w.dequantize(row, c, w.load(row, c), values);
    elem* dst = out + (size_t)row * k + (size_t)c * N;
#pragma unroll
    for (int i = 0; i < N; i++) dst[i] = from_f32<elem>(values[i]);
}

extern "C" __global__ void dequant_w4(const int4* w, const unsigned int* params, elem* out, int k,
                                      int group) {
    kernel_entry();
    dequantize_rows(W4Rows{w, params, k, group}, out, k);
}

extern "C" __global__ void dequant_w8(const int4* w, const float* scales, elem* out, int k) {
    kernel_entry();
    dequantize_rows(W8Rows{w, scales, k}, out, k);
}

// ---- FP8 E4M3 (src/cpu/fp8.rs): weights per output row with an f32 scale, activations per
// token with theirs, the product summed over the E4M3 values in f32 and scaled after, as the
// CPU path computes it. The conversions are common.cuh's.

// Activations per token: a row's largest magnitude gives its scale (amax / 448, read back)
// and inverse (448 / amax, applied); an all-zero row takes 1. Returns (scale, inverse) of
// row `row` of x to every thread of the block (256 threads).
__device__ __forceinline__ float2 e4m3_row_scale(const elem* xr, int k) {
    float amax = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(to_f32(xr[i])));
    __shared__ float largest[256];
    largest[threadIdx.x] = amax;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if ((int)threadIdx.x < stride)
            largest[threadIdx.x] = fmaxf(largest[threadIdx.x], largest[threadIdx.x + stride]);
        __syncthreads();
    }
    amax = largest[0];
    const bool usable = amax > 0.0f && amax <= 3.402823466e38f;
    float2 out;
    out.x = usable ? amax / 448.0f : 1.0f;
    out.y = usable ? 448.0f / amax : 1.0f;
    return out;
}

// `xq` gets the E4M3 values as elems (exact in f32, bf16 and f16), for the E4M3 GEMV and
// cuBLAS over dequant_fp8's values; `scales` each row's scale. grid: m; block: 256.
extern "C" __global__ void quantize_rows_e4m3(const elem* x, elem* xq, float* scales, int k) {
    kernel_entry();
    const size_t row = blockIdx.x;
    const elem* xr = x + row * k;
    const float2 scale = e4m3_row_scale(xr, k);
    for (int i = threadIdx.x; i < k; i += blockDim.x)
        xq[row * k + i] = from_f32<elem>(e4m3_to_f32(e4m3_from_f32(to_f32(xr[i]) * scale.y)));
    if (threadIdx.x == 0) scales[row] = scale.x;
}

// As quantize_rows_e4m3, `xq` the E4M3 bytes themselves ([m, k]), for cuBLASLt's FP8
// product. grid: m; block: 256.
extern "C" __global__ void quantize_rows_e4m3_bytes(const elem* x, unsigned char* xq,
                                                    float* scales, int k) {
    kernel_entry();
    const size_t row = blockIdx.x;
    const elem* xr = x + row * k;
    const float2 scale = e4m3_row_scale(xr, k);
    for (int i = threadIdx.x; i < k; i += blockDim.x)
        xq[row * k + i] = (unsigned char)e4m3_from_f32(to_f32(xr[i]) * scale.y);
    if (threadIdx.x == 0) scales[row] = scale.x;
}

// 8-bit E4M3 rows: 16 values a chunk, read as E4M3 values (their scale applies after the sum).
struct Fp8Rows {
    const int4* __restrict__ w;
    int k;
    static constexpr int VALUES = 16;

    __device__ __forceinline__ int4 load(int row, int chunk) const {
        return __ldg(w + (size_t)row * (k / VALUES) + chunk);
    }
    __device__ __forceinline__ void dequantize(int, int, int4 packed, float (&out)[VALUES]) const {
        const unsigned int words[4] = {(unsigned int)packed.x, (unsigned int)packed.y,
                                       (unsigned int)packed.z, (unsigned int)packed.w};
#pragma unroll
        for (int word = 0; word < 4; word++)
#pragma unroll
            for (int i = 0; i < 4; i++) out[word * 4 + i] = e4m3_to_f32((words[word] >> (8 * i)) & 0xffu);
    }
};

// y[r, n] = (Σ_k xq[r, k] · q[n, k]) · (xscale[r] · wscale[n]) (+ bias[n]), row blockIdx.x of
// W, with xq and xscale from quantize_rows_e4m3. grid: n; block: GEMV_THREADS.
extern "C" __global__ void gemv_fp8(const int4* w, const float* wscales, const elem* xq,
                                    const float* xscales, const elem* bias, elem* y, int m, int n,
                                    int k) {
    kernel_entry();
    const int rows[1] = {(int)blockIdx.x};
    float acc[1][GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[0][r] = 0.0f;
    accumulate_quant<Fp8Rows, 1, 4>(Fp8Rows{w, k}, xq, rows, acc, m, k);
    __shared__ float partial[GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_rows_sum<1>(acc, m, partial);
    const int t = threadIdx.x, col = blockIdx.x;
    if (t < m) {
        const float scaled = sum * (xscales[t] * wscales[col]);
        y[(size_t)t * n + col] = from_f32<elem>(scaled + (bias ? to_f32(bias[col]) : 0.0f));
    }
}

// The E4M3 GEMV on the tensor cores (sm_89 on): mma.m16n8k32 takes 16 rows of W as A and
// the (up to 8) activation rows as B's 8 columns, converting and multiplying the E4M3 values
// in hardware with f32 sums, where the CUDA-core kernel above spends about ten integer
// operations converting each weight. A block takes 16 rows of W, its FP8_MMA_WARPS warps
// each every FP8_MMA_WARPS-th chunk of 64 inputs; a lane loads 16 bytes of W rows g and g + 8
// and of activation row g at byte 16·(lane % 4) of the chunk, used as k slots 4t..4t+3 and
// 16+4t..16+4t+3 of two k-steps (A and B take the same k order, so the sums are the
// product's). The warps' sums are added in warp order, then both scales and the bias. Its
// f32 sums run in another order than the CUDA-core kernel's: `quantization fp8` on 16-bit
// dtypes only. k a multiple of 64; xq the E4M3 bytes of quantize_rows_e4m3_bytes.
// grid: ceil(n / 16); block: 32 · FP8_MMA_WARPS.
#define FP8_MMA_WARPS 8
#if defined(EMU_HOST) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890)
__device__ __forceinline__ void mma_e4m3_16832(float c[4], const unsigned a[4], unsigned b0,
                                               unsigned b1) {
#if defined(EMU_HOST)
    emu_mma_m16n8k32_e4m3(c, a, b0, b1, e4m3_to_f32);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

extern "C" __global__ void __launch_bounds__(32 * FP8_MMA_WARPS) gemv_fp8_mma(
    const unsigned char* __restrict__ w, const float* __restrict__ wscales,
    const unsigned char* __restrict__ xq, const float* __restrict__ xscales,
    const elem* __restrict__ bias, elem* __restrict__ y, int m, int n, int k) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
    const int first = blockIdx.x * 16;
    // Rows past n repeat the last one (their sums are not written).
    const unsigned char* w0 = w + (size_t)min(first + g, n - 1) * k + 16 * c;
    const unsigned char* w1 = w + (size_t)min(first + g + 8, n - 1) * k + 16 * c;
    prefetch_l2(w + (size_t)first * k, (size_t)min(16, n - first) * k);
    kernel_entry();  // the activations come from earlier kernels; W does not
    const bool has_x = g < m;
    const unsigned char* x0 = xq + (size_t)(has_x ? g : 0) * k + 16 * c;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int chunks = k / 64;
    constexpr int DEPTH = 2;
    for (int ch0 = warp; ch0 < chunks; ch0 += FP8_MMA_WARPS * DEPTH) {
        int4 wa[DEPTH], wb[DEPTH], xv[DEPTH];
#pragma unroll
        for (int u = 0; u < DEPTH; u++) {
            const int ch = ch0 + u * FP8_MMA_WARPS;
            wa[u] = wb[u] = xv[u] = make_int4(0, 0, 0, 0);
            if (ch < chunks) {
                wa[u] = __ldg(reinterpret_cast<const int4*>(w0 + (size_t)ch * 64));
                wb[u] = __ldg(reinterpret_cast<const int4*>(w1 + (size_t)ch * 64));
                if (has_x) xv[u] = __ldg(reinterpret_cast<const int4*>(x0 + (size_t)ch * 64));
            }
        }
#pragma unroll
        for (int u = 0; u < DEPTH; u++) {
            const unsigned first_half[4] = {(unsigned)wa[u].x, (unsigned)wb[u].x, (unsigned)wa[u].y,
                                            (unsigned)wb[u].y};
            mma_e4m3_16832(acc, first_half, (unsigned)xv[u].x, (unsigned)xv[u].y);
            const unsigned second_half[4] = {(unsigned)wa[u].z, (unsigned)wb[u].z, (unsigned)wa[u].w,
                                             (unsigned)wb[u].w};
            mma_e4m3_16832(acc, second_half, (unsigned)xv[u].z, (unsigned)xv[u].w);
        }
    }
    // Lane (g, c): acc[0], acc[1] = W row g against activation rows 2c, 2c + 1; acc[2],
    // acc[3] the same for W row g + 8.
    __shared__ float sums[FP8_MMA_WARPS][32][4];
#pragma unroll
    for (int i = 0; i < 4; i++) sums[warp][lane][i] = acc[i];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float total = 0.0f;
            for (int v = 0; v < FP8_MMA_WARPS; v++) total += sums[v][lane][i];
            const int row = first + g + (i >= 2 ? 8 : 0), r = 2 * c + i % 2;
            if (row < n && r < m) {
                const float scaled = total * (xscales[r] * wscales[row]);
                y[(size_t)r * n + row] = from_f32<elem>(scaled + (bias ? to_f32(bias[row]) : 0.0f));
            }
        }
    }
}
#endif

// W as its E4M3 values in elems [n, k] (exact), for cuBLAS over quantize_rows_e4m3's rows;
// the scales apply to the product after. grid: (ceil(k / 16 / 128), n); block: 128.
extern "C" __global__ void dequant_fp8(const int4* w, elem* out, int k) {
    kernel_entry();
    dequantize_rows(Fp8Rows{w, k}, out, k);
}

// After cuBLAS over quantize_rows_e4m3's rows and dequant_fp8's values: y[r, c] = y[r, c] ·
// (xscale[r] · wscale[c]) (+ bias[c]), in place. grid: (ceil(n / 256), m); block: 256.
extern "C" __global__ void fp8_scale(elem* y, const float* xscales, const float* wscales,
                                     const elem* bias, int n) {
    kernel_entry();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    const size_t r = blockIdx.y;
    const float scaled = to_f32(y[r * n + c]) * (xscales[r] * wscales[c]);
    y[r * n + c] = from_f32<elem>(scaled + (bias ? to_f32(bias[c]) : 0.0f));
}
