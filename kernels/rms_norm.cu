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

extern "C" __global__ void __launch_bounds__(512) add_rms_norm(float* __restrict__ residual,
                                        const elem* __restrict__ delta,
                                        const int* __restrict__ rows,
                                        const elem* __restrict__ weight, elem* __restrict__ out,
                                        int width, float eps) {
    const size_t r = rows ? rows[blockIdx.x] : blockIdx.x;
    float* x = residual + r * width;
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
    elem* y = out + (size_t)blockIdx.x * width;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < width) y[i] = from_f32<elem>(to_f32(weight[i]) * (v[j] * scale));
    }
}
