// SwiGLU on packed `[gate | up]` rows of 2·width: out = silu(gate) ⊙ up.
// Bound by memory (a prompt's rows are tens of MB a layer): each thread takes one 16-byte
// chunk of gate, of up and of out, as single vector accesses where width·sizeof(elem) is a
// multiple of 16 (then every row starts on a 16-byte boundary), else element by element.
// grid: (ceil(ceil(width / chunk elems) / blockDim.x), min(rows, 65535)); rows past
// gridDim.y loop.
__device__ __forceinline__ elem silu_times(elem gate, elem up) {
    const float g = to_f32(gate);
    return from_f32<elem>(g / (1.0f + expf(-g)) * to_f32(up));
}

extern "C" __global__ void silu_mul(const elem* __restrict__ gate_up, elem* __restrict__ out,
                                    int width, int rows) {
    kernel_entry();
    constexpr int V = 16 / sizeof(elem);
    const int chunk = blockIdx.x * blockDim.x + threadIdx.x;
    const int first = chunk * V;
    if (first >= width) return;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const elem* gate = gate_up + (size_t)row * 2 * width;
        const elem* up = gate + width;
        elem* y = out + (size_t)row * width;
        if (width % V == 0) {
            Chunk g, u, o;
            g.raw = __ldg(reinterpret_cast<const int4*>(gate) + chunk);
            u.raw = __ldg(reinterpret_cast<const int4*>(up) + chunk);
#pragma unroll
            for (int j = 0; j < V; j++) o.e[j] = silu_times(g.e[j], u.e[j]);
            reinterpret_cast<int4*>(y)[chunk] = o.raw;
        } else {
            for (int i = first; i < first + V && i < width; i++) y[i] = silu_times(gate[i], up[i]);
        }
    }
}
