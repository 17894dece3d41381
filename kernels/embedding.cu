// Embedding lookup into the f32 residual stream: out[t, :] = table[ids[t], :].
// Ids are checked against the vocabulary on the host before launch.
// grid: tokens; block: any multiple of 32 (wide, so a row takes few rounds of loads).
extern "C" __global__ void embedding(const int* __restrict__ ids, const elem* __restrict__ table,
                                     float* __restrict__ out, int width) {
    kernel_entry();
    const size_t t = blockIdx.x;
    const elem* row = table + (size_t)ids[t] * width;
#pragma unroll 4
    for (int i = threadIdx.x; i < width; i += blockDim.x) out[t * width + i] = to_f32(row[i]);
}
