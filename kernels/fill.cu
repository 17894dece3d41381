// Dummy weights (load_format dummy): uniform values in ±bound from a counter-based hash
// of (seed, index), so a 12 GB model fills on the device in milliseconds.
__device__ __forceinline__ unsigned int mix(unsigned long long x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (unsigned int)x;
}

extern "C" __global__ void fill_uniform(elem* __restrict__ out, unsigned long long n,
                                        unsigned long long seed, float bound) {
    kernel_entry();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float unit = (mix(seed * 0x9e3779b97f4a7c15ULL + i) >> 8) * (1.0f / 16777216.0f);
        out[i] = from_f32<elem>((2.0f * unit - 1.0f) * bound);
    }
}
