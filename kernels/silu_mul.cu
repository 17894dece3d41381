// SwiGLU on packed `[gate | up]` rows of 2·width: out = silu(gate) ⊙ up.
// grid: ceil(rows · width / blockDim.x).
extern "C" __global__ void silu_mul(const elem* __restrict__ gate_up, elem* __restrict__ out,
                                    int width, long long total) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long row = i / width, col = i % width;
    const float g = to_f32(gate_up[row * 2 * width + col]);
    const float u = to_f32(gate_up[row * 2 * width + width + col]);
    out[i] = from_f32<elem>(g / (1.0f + expf(-g)) * u);
}
