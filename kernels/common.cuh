// Shared by every kernel: the element type a module is compiled for (one module per
// device and dtype, chosen with -DELEM_BF16 / -DELEM_F16 / neither for f32) and the
// reductions. Activations between ops are `elem`; sums, norms and softmax run in f32.
// bf16 and f16 are plain 16-bit storage converted here, so the module needs no CUDA
// headers at run time (NVRTC alone, as deployments ship it).
struct bf16 {
    unsigned short bits;
};
struct f16 {
    unsigned short bits;
};

#if defined(ELEM_BF16)
typedef bf16 elem;
#elif defined(ELEM_F16)
typedef f16 elem;
#else
typedef float elem;
#endif

// 16 bytes of elems, loaded or stored as one vector access.
union Chunk {
    int4 raw;
    elem e[16 / sizeof(elem)];
};

#define NEG_INFINITY __int_as_float(0xff800000)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((unsigned int)x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as PyTorch's and the `half` crate's conversions do.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16 out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = 0x7fc0;  // NaN stays NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        out.bits = (unsigned short)(u >> 16);
    }
    return out;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 out;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(x));
    return out;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    __syncthreads();  // `partial` may still be read by an earlier call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    float total = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(total);
}
