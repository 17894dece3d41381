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

// Programmatic dependent launch (sm_90 on, where src/cuda/launch.rs launches with it): a
// kernel's blocks may be scheduled while earlier kernels still run. Every kernel calls
// kernel_entry before it reads or writes memory another kernel uses. It first lets the next
// kernel be scheduled once all of this one's blocks have started (so the next product's
// blocks take the SMs this one's last blocks free, fetching their weights, even across a
// small kernel between them), then waits until the previous kernel has finished and its
// writes are visible. Each kernel waits for its predecessor, so a kernel that has waited
// comes after all earlier ones. What depends on no earlier kernel (a product's weights)
// may be fetched before it. Launched without the attribute, or before sm_90, both are
// no-ops.
__device__ __forceinline__ void kernel_entry() {
#if !defined(EMU_HOST) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Starts bringing `bytes` bytes from `p` into L2, a 128-byte line a thread at a time
// (weights a block is about to stream, fetched while the previous kernel drains).
__device__ __forceinline__ void prefetch_l2(const void* p, size_t bytes) {
#if !defined(EMU_HOST)
    const char* base = static_cast<const char*>(p);
    for (size_t at = (size_t)threadIdx.x * 128; at < bytes; at += (size_t)blockDim.x * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(base + at));
#endif
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

// f32 → f16 bits, round to nearest even, as the `half` crate's from_f32 (its portable
// path; overflow → ±inf, NaN stays NaN with the top mantissa bits). Integer operations only,
// so the KV cache's scales come out the same on the device and on CPU threads.
__device__ __forceinline__ unsigned short f32_to_half_bits(float value) {
    const unsigned int x = __float_as_uint(value);
    const unsigned int sign = x & 0x80000000u, exp = x & 0x7f800000u, man = x & 0x007fffffu;
    if (exp == 0x7f800000u)
        return (unsigned short)((sign >> 16) | 0x7c00u | (man ? 0x0200u : 0u) | (man >> 13));
    const unsigned int half_sign = sign >> 16;
    const int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (unsigned short)(half_sign | 0x7c00u);
    if (half_exp <= 0) {  // subnormal or zero
        if (14 - half_exp > 24) return (unsigned short)half_sign;
        const unsigned int m = man | 0x00800000u;
        unsigned int half_man = m >> (14 - half_exp);
        const unsigned int round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) && (m & (3u * round_bit - 1u))) half_man++;
        return (unsigned short)(half_sign | half_man);
    }
    const unsigned int bits = half_sign | ((unsigned int)half_exp << 10) | (man >> 13);
    const unsigned int round_bit = 0x1000u;
    // A carry out of the mantissa moves into the exponent, as rounding up should.
    return (unsigned short)((man & round_bit) && (man & (3u * round_bit - 1u)) ? bits + 1 : bits);
}

// f16 bits → f32 (exact), with integer operations only.
__device__ __forceinline__ float half_bits_to_f32(unsigned short h) {
    const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    const unsigned int exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man · 2^-24, exact in f32
        const float magnitude = (float)man * 5.9604644775390625e-8f;
        return __uint_as_float(__float_as_uint(magnitude) | sign);
    }
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// FP8 E4M3 (src/cpu/fp8.rs) by hand, as CUDA's __NV_SATFINITE conversions (round to nearest
// even, saturating to ±448, NaN kept), so the module needs no fp8 headers and forms the same
// values as the CPU path.
__device__ __forceinline__ float e4m3_to_f32(unsigned int bits) {
    const unsigned int sign = (bits & 0x80u) << 24, field = (bits >> 3) & 15u, mantissa = bits & 7u;
    if (field == 15u && mantissa == 7u) return __uint_as_float(0x7fc00000u);
    if (field == 0u) return __uint_as_float(sign | __float_as_uint((float)mantissa * (1.0f / 512.0f)));
    return __uint_as_float(sign | ((field + 120u) << 23) | (mantissa << 20));
}

__device__ __forceinline__ unsigned int e4m3_from_f32(float x) {
    const unsigned int u = __float_as_uint(x), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fu;          // NaN
    if (a >= 0x43e00000u) return sign | 0x7eu;  // 448 and past it (infinity too): ±448
    if (a < 0x3c800000u)                        // below 2^-6: steps of 2^-9, ties to even
        return sign | (unsigned int)rintf(__uint_as_float(a) * 512.0f);
    unsigned int field = (a >> 23) - 120u, keep = (a >> 20) & 7u;
    const unsigned int rest = a & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) keep++;
    if (keep == 8u) {
        keep = 0u;
        field++;
    }
    if (field > 15u || (field == 15u && keep == 7u)) return sign | 0x7eu;
    return sign | (field << 3) | keep;
}

// The KV cache's quantised formats (src/cpu/kv_quant.rs has the reference). A cache row
// (one position of one layer's K or V) is num_kv_heads heads of kv_head_bytes(head_dim,
// bits) bytes: the head_dim levels (int8 and fp8: byte d is value d; int4: byte i holds
// value 2i in its low nibble and 2i + 1 in its high one), then the head's scale and zero as
// little-endian f16. int8 and int4 per head: scale = f16((max − min) / (2^bits − 1)),
// zero = f16(min), both clamped to ±65504 first; level = clamp(rint((x − zero) / scale), 0,
// 2^bits − 1), 0 where the scale is 0. fp8: scale = f16(max|x| / 448) (clamped likewise, 0
// where max|x| is not finite), zero 0, level = e4m3(x / scale), 0 where the scale is 0.
// value = level · scale + zero (fp8: the level's E4M3 value). Every operation is rounded on
// its own (no fused multiply-add), so both engines store and read the same numbers.
// The formats as kernels take them (KvFormat::kernel_code in src/dtype.rs):
#define KV_ELEM 0
#define KV_FP8 1
#define KV_INT4 4
#define KV_INT8 8
// Bits a quantised format's level takes.
#define KV_BITS(format) ((format) == KV_INT4 ? 4 : 8)
#define KV_F16_MAX 65504.0f

__device__ __forceinline__ int kv_head_bytes(int head_dim, int bits) {
    return head_dim * bits / 8 + 4;
}

// The head's (scale, zero) as f16 bits from its min and max.
__device__ __forceinline__ void kv_scale_zero(float lo, float hi, int bits, unsigned short* scale,
                                              unsigned short* zero) {
    // Not finite (an infinity, or no value but NaNs): scale and zero 0.
    if (!(fabsf(lo) <= 3.402823466e38f && fabsf(hi) <= 3.402823466e38f)) {
        *scale = 0;
        *zero = 0;
        return;
    }
    const float levels = (float)((1 << bits) - 1);
    const float s = fminf(fmaxf(__fdiv_rn(__fsub_rn(hi, lo), levels), 0.0f), KV_F16_MAX);
    *scale = f32_to_half_bits(s);
    *zero = f32_to_half_bits(fminf(fmaxf(lo, -KV_F16_MAX), KV_F16_MAX));
}

// One value's level under s and z (the f32 values of the stored scale and zero).
__device__ __forceinline__ unsigned int kv_level(float x, float s, float z, int bits) {
    if (s == 0.0f) return 0;
    const float top = (float)((1 << bits) - 1);
    // fmaxf first: a NaN quotient becomes level 0, as Rust's saturating cast makes it.
    return (unsigned int)fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x, z), s)), 0.0f), top);
}

// The f16 scale of an fp8 head from its min and max.
__device__ __forceinline__ unsigned short kv_fp8_scale(float lo, float hi) {
    const float amax = fmaxf(fabsf(lo), fabsf(hi));
    if (!(amax <= 3.402823466e38f)) return 0;  // an infinity, or no value but NaNs
    return f32_to_half_bits(fminf(__fdiv_rn(amax, 448.0f), KV_F16_MAX));
}

// One value's E4M3 bits under the fp8 scale s.
__device__ __forceinline__ unsigned int kv_fp8_level(float x, float s) {
    return s == 0.0f ? 0u : e4m3_from_f32(__fdiv_rn(x, s));
}

// A level of a head in FORMAT back to its value.
template <int FORMAT>
__device__ __forceinline__ float kv_value(unsigned int q, float s, float z) {
    const float level = FORMAT == KV_FP8 ? e4m3_to_f32(q) : (float)q;
    return __fadd_rn(__fmul_rn(level, s), z);
}

// The (scale, zero) of the head whose levels start at `head` (bytes, any alignment).
__device__ __forceinline__ void kv_read_scale_zero(const unsigned char* head, int head_dim,
                                                   int bits, float* s, float* z) {
    const unsigned char* p = head + head_dim * bits / 8;
    *s = half_bits_to_f32((unsigned short)(p[0] | (p[1] << 8)));
    *z = half_bits_to_f32((unsigned short)(p[2] | (p[3] << 8)));
}

// Level d of a head's packed levels.
template <int BITS>
__device__ __forceinline__ unsigned int kv_level_at(const unsigned char* levels, int d) {
    if (BITS == 8) return levels[d];
    const unsigned int byte = levels[d >> 1];
    return (d & 1) ? byte >> 4 : byte & 0xfu;
}
