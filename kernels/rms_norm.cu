// RMSNorm fused with the residual add that precedes it, one pass over the row:
//   residual[r] += delta[r]            (when delta is given: the block's last output)
//   out[r] = weight ⊙ residual[r] / sqrt(mean(residual[r]²) + eps)
// The residual stream stays f32 across layers; `out` feeds the next matrix product.
// `rows` (optional) picks which residual rows to normalise into consecutive output rows
// (the final norm runs only on each sequence's last token).
// Each thread keeps its NORM_PER_THREAD values in registers, so all its loads are issued at
// once and the row is read once: a decode step's rows are single blocks, bound by latency.
// grid: output rows; block: a multiple of 32 with width ≤ NORM_PER_THREAD · blockDim.x.
#define NORM_PER_THREAD 16

template <int BYTES> struct VectorOf;
template <> struct VectorOf<8> { typedef int2 type; };
template <> struct VectorOf<16> { typedef int4 type; };

// Four elems, loaded or stored as one 8-byte (bf16, f16) or 16-byte (f32) access.
union Quad {
    typename VectorOf<4 * sizeof(elem)>::type raw;
    elem e[4];
};

// Widths divisible by 4 (every model's): each thread takes runs of four values, a 16-byte
// access to the f32 residual and one to the elems, so a prompt's rows stream at the
// memory's rate rather than the load instructions' (scalar accesses reach well under the
// copy rate over a long prompt).
__device__ __forceinline__ void add_rms_norm_quads(float* __restrict__ x,
                                                   const elem* __restrict__ delta,
                                                   const elem* __restrict__ weight,
                                                   elem* __restrict__ y, int width, float eps) {
    constexpr int RUNS = NORM_PER_THREAD / 4;
    const int quads = width / 4;
    float4 v[RUNS];
#pragma unroll
    for (int j = 0; j < RUNS; j++) {
        const int q = threadIdx.x + j * blockDim.x;
        v[j] = float4{0.0f, 0.0f, 0.0f, 0.0f};
        if (q < quads) {
            v[j] = reinterpret_cast<const float4*>(x)[q];
            if (delta) {
                Quad d;
                d.raw = reinterpret_cast<const decltype(d.raw)*>(delta)[q];
                v[j].x += to_f32(d.e[0]);
                v[j].y += to_f32(d.e[1]);
                v[j].z += to_f32(d.e[2]);
                v[j].w += to_f32(d.e[3]);
                reinterpret_cast<float4*>(x)[q] = v[j];
            }
        }
    }
    float square_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < RUNS; j++)
        square_sum += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    const float scale = 1.0f / sqrtf(block_sum(square_sum) / (float)width + eps);
#pragma unroll
    for (int j = 0; j < RUNS; j++) {
        const int q = threadIdx.x + j * blockDim.x;
        if (q < quads) {
            Quad w, out;
            w.raw = reinterpret_cast<const decltype(w.raw)*>(weight)[q];
            out.e[0] = from_f32<elem>(to_f32(w.e[0]) * (v[j].x * scale));
            out.e[1] = from_f32<elem>(to_f32(w.e[1]) * (v[j].y * scale));
            out.e[2] = from_f32<elem>(to_f32(w.e[2]) * (v[j].z * scale));
            out.e[3] = from_f32<elem>(to_f32(w.e[3]) * (v[j].w * scale));
            reinterpret_cast<decltype(out.raw)*>(y)[q] = out.raw;
        }
    }
}

extern "C" __global__ void __launch_bounds__(512) add_rms_norm(float* __restrict__ residual,
                                        const elem* __restrict__ delta,
                                        const int* __restrict__ rows,
                                        const elem* __restrict__ weight, elem* __restrict__ out,
                                        int width, float eps) {
    kernel_entry();
    const size_t r = rows ? rows[blockIdx.x] : blockIdx.x;
    float* x = residual + r * width;
    elem* y = out + (size_t)blockIdx.x * width;
    if (width % 4 == 0) {
        // Rows start on 16 bytes (f32) and 8 bytes (elems): width is a multiple of 4.
        add_rms_norm_quads(x, delta ? delta + r * width : nullptr, weight, y, width, eps);
        return;
    }
    float v[NORM_PER_THREAD];
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = 0.0f;
        if (i < width) v[j] = x[i] + (delta ? to_f32(delta[r * width + i]) : 0.0f);
    }
    float square_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < width) {
            if (delta) x[i] = v[j];
            square_sum += v[j] * v[j];
        }
    }
    const float scale = 1.0f / sqrtf(block_sum(square_sum) / (float)width + eps);
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < width) y[i] = from_f32<elem>(to_f32(weight[i]) * (v[j] * scale));
    }
}
