// After the fused QKV product: adds the QKV bias, rotates q and k, writes q for attention
// and k, v into the paged cache. The row layout is [q heads | k heads | v heads] (InternLM2's
// per-group packing is reordered into it when the weights load).
// Rotary modes (spec chatglm2.md §3.5, internlm2.md §4):
//   0 — GLM: pairs (2i, 2i+1) for 2i < rot_dim, the rest of the head passes through;
//   1 — rotate half: pairs (i, i + head_dim/2) over the whole head.
// `cos_sin[t]` holds token t's cos then sin of each frequency (freq_len of each), computed
// on the host exactly as the CPU path computes them (angle in f32, cos/sin in f64), so
// both engines rotate alike and no thread spends time on trigonometry. The rotation's
// products and sums are rounded one by one (no fused multiply-add), as the CPU's are.
// `slots[t]` = block · block_size + offset, where token t's K/V go; -1: nowhere.
// kv_format KV_ELEM: cache rows of num_kv_heads · head_dim elems. KV_INT8, KV_INT4, KV_FP8:
// rows of num_kv_heads quantised heads (common.cuh), each quantised from its f32 values after
// bias and rotation (never rounded to elem first), as the CPU path quantises its f32 values.
// grid: (tokens, head groups); a block takes its token's heads of group blockIdx.y (all
// heads split evenly over gridDim.y groups). Elem caches: a thread a pair of values at a
// time. Decode steps launch a group per head (64 threads: one pair each); prompts one group
// a token (a block per head and token leaves the chip scheduling tiny blocks, far below
// the memory's rate over a long prompt). Quantised caches: q heads as above, each K/V head
// a warp (its min and max are a warp reduction); blockDim a multiple of 32, at most
// ROPE_MAX_WARPS warps, head_dim ≤ ROPE_MAX_HEAD_DIM.
#define ROPE_MAX_WARPS 8
#define ROPE_MAX_HEAD_DIM 128

// Head `head`'s pair i of token row `row`, biased and rotated: dims *a_dim, *b_dim.
__device__ __forceinline__ void rope_pair(const elem* row, const elem* bias, const float* cos_t,
                                          const float* sin_t, int head, int i, int head_dim,
                                          int rope_mode, int rot_dim, int* a_dim, int* b_dim,
                                          float* a_out, float* b_out) {
    const int base = head * head_dim;
    bool rotate;
    if (rope_mode == 0) {
        *a_dim = 2 * i;
        *b_dim = 2 * i + 1;
        rotate = *a_dim < rot_dim;
    } else {
        *a_dim = i;
        *b_dim = i + head_dim / 2;
        rotate = true;
    }
    float a = to_f32(row[base + *a_dim]), b = to_f32(row[base + *b_dim]);
    if (bias) {
        a += to_f32(bias[base + *a_dim]);
        b += to_f32(bias[base + *b_dim]);
    }
    if (rotate) {
        const float c = cos_t[i], s = sin_t[i];
        const float ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        const float rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        a = ra;
        b = rb;
    }
    *a_out = a;
    *b_out = b;
}

extern "C" __global__ void rope_write_kv(const elem* __restrict__ qkv,
                                         const elem* __restrict__ bias, elem* __restrict__ q_out,
                                         void* __restrict__ k_cache, void* __restrict__ v_cache,
                                         const int* __restrict__ slots,
                                         const float* __restrict__ cos_sin, int freq_len,
                                         int num_heads, int num_kv_heads, int head_dim,
                                         int rope_mode, int rot_dim, int kv_format) {
    kernel_entry();
    const size_t t = blockIdx.x;
    const int q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
    const size_t row_width = q_width + 2 * kv_width;
    const elem* row = qkv + t * row_width;
    const int all_heads = num_heads + 2 * num_kv_heads;
    const int per_group = (all_heads + gridDim.y - 1) / gridDim.y;
    const int first = blockIdx.y * per_group;
    const int heads_here = min(per_group, all_heads - first);
    // A negative slot is a padding token (a CUDA graph's batch rounded up): q only.
    const bool keep_kv = slots[t] >= 0;
    const size_t slot = keep_kv ? slots[t] : 0;
    const float* cos_t = cos_sin + t * 2 * freq_len;
    const float* sin_t = cos_t + freq_len;
    const int half = head_dim / 2;
    // Elem caches: every head a pair a thread. Quantised: the q heads only.
    const int pair_heads =
        kv_format == KV_ELEM ? heads_here : max(0, min(heads_here, num_heads - first));
    for (int work = threadIdx.x; work < pair_heads * half; work += blockDim.x) {
        const int head = first + work / half, i = work % half;
        if (head >= num_heads && !keep_kv) continue;
        const int base = head * head_dim;
        if (head >= num_heads + num_kv_heads) {  // a v head: copied with its bias
            elem* dst = static_cast<elem*>(v_cache) + slot * kv_width + (base - q_width - kv_width);
#pragma unroll
            for (int d = i; d < head_dim; d += half) {
                float v = to_f32(row[base + d]);
                if (bias) v += to_f32(bias[base + d]);
                dst[d] = from_f32<elem>(v);
            }
            continue;
        }
        elem* dst = head < num_heads ? q_out + t * q_width + base
                                     : static_cast<elem*>(k_cache) + slot * kv_width + (base - q_width);
        int a_dim, b_dim;
        float a, b;
        rope_pair(row, bias, cos_t, sin_t, head, i, head_dim, rope_mode, rot_dim, &a_dim, &b_dim,
                  &a, &b);
        dst[a_dim] = from_f32<elem>(a);
        dst[b_dim] = from_f32<elem>(b);
    }
    if (kv_format == KV_ELEM || !keep_kv) return;

    // Quantised K/V heads, a warp each: its f32 values staged in shared memory, then its
    // scale and zero from the warp's min and max, then its levels.
    const int kv_bits = KV_BITS(kv_format);
    __shared__ float head_s[ROPE_MAX_WARPS][ROPE_MAX_HEAD_DIM];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int head_bytes = kv_head_bytes(head_dim, kv_bits);
    float* values = head_s[warp];
    for (int head = max(first, num_heads) + warp; head < first + heads_here; head += warps) {
        const bool is_v = head >= num_heads + num_kv_heads;
        const int kv_head = head - num_heads - (is_v ? num_kv_heads : 0);
        float lo = __int_as_float(0x7f800000), hi = NEG_INFINITY;
        for (int i = lane; i < half; i += 32) {
            int a_dim, b_dim;
            float a, b;
            if (is_v) {
                a_dim = i;
                b_dim = i + half;
                const int base = head * head_dim;
                a = to_f32(row[base + a_dim]);
                b = to_f32(row[base + b_dim]);
                if (bias) {
                    a += to_f32(bias[base + a_dim]);
                    b += to_f32(bias[base + b_dim]);
                }
            } else {
                rope_pair(row, bias, cos_t, sin_t, head, i, head_dim, rope_mode, rot_dim, &a_dim,
                          &b_dim, &a, &b);
            }
            values[a_dim] = a;
            values[b_dim] = b;
            // fminf/fmaxf pass over NaN, as the CPU's min/max fold does.
            lo = fminf(lo, fminf(a, b));
            hi = fmaxf(hi, fmaxf(a, b));
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
            hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
        }
        __syncwarp();  // every lane's values are staged
        unsigned short scale_bits, zero_bits = 0;
        if (kv_format == KV_FP8)
            scale_bits = kv_fp8_scale(lo, hi);
        else
            kv_scale_zero(lo, hi, kv_bits, &scale_bits, &zero_bits);
        const float s = half_bits_to_f32(scale_bits), z = half_bits_to_f32(zero_bits);
        unsigned char* dst = static_cast<unsigned char*>(is_v ? v_cache : k_cache) +
                             slot * num_kv_heads * head_bytes + (size_t)kv_head * head_bytes;
        const int packed = head_dim * kv_bits / 8;
        for (int j = lane; j < packed; j += 32) {
            if (kv_format == KV_FP8)
                dst[j] = (unsigned char)kv_fp8_level(values[j], s);
            else if (kv_format == KV_INT8)
                dst[j] = (unsigned char)kv_level(values[j], s, z, 8);
            else
                dst[j] = (unsigned char)(kv_level(values[2 * j], s, z, 4) |
                                         (kv_level(values[2 * j + 1], s, z, 4) << 4));
        }
        if (lane == 0) {
            dst[packed] = (unsigned char)scale_bits;
            dst[packed + 1] = (unsigned char)(scale_bits >> 8);
            dst[packed + 2] = (unsigned char)zero_bits;
            dst[packed + 3] = (unsigned char)(zero_bits >> 8);
        }
        __syncwarp();  // the values are read before the warp's next head overwrites them
    }
}

// The QKV product of up to GEMV_MAX_ROWS tokens (a single sequence's decode step) with
// rope_write_kv's work in its epilogue, over an elem cache: block p takes pair p of the
// [q heads | k heads | v heads] row — columns a_dim and b_dim of its head, paired as
// rope_pair pairs them (v heads alike, never rotated) — and sums both rows of W as gemv_elem
// sums a row (the same order: accumulate_rows in gemv.cu), rounds each sum to elem as the
// product's output, then adds the bias, rotates q and k and files q, k and v exactly as
// rope_write_kv does. So it writes the bits the two kernels write, with one launch fewer
// and two rows of W in flight a block. grid: qkv_width / 2; block: GEMV_THREADS.
extern "C" __global__ void gemv_qkv_rope(const elem* __restrict__ x, const elem* __restrict__ w,
                                         const elem* __restrict__ bias, elem* __restrict__ q_out,
                                         elem* __restrict__ k_cache, elem* __restrict__ v_cache,
                                         const int* __restrict__ slots,
                                         const float* __restrict__ cos_sin, int freq_len, int m,
                                         int num_heads, int num_kv_heads, int head_dim,
                                         int rope_mode, int rot_dim, int k) {
    const int half = head_dim / 2;
    const int head = blockIdx.x / half, i = blockIdx.x % half, base = head * head_dim;
    const bool is_v = head >= num_heads + num_kv_heads;
    const int a_dim = rope_mode == 0 ? 2 * i : i, b_dim = rope_mode == 0 ? 2 * i + 1 : i + half;
    const bool rotate = !is_v && (rope_mode != 0 || a_dim < rot_dim);
    const elem* w_rows[2] = {w + (size_t)(base + a_dim) * k, w + (size_t)(base + b_dim) * k};
    prefetch_l2(w_rows[0], (size_t)k * sizeof(elem));
    prefetch_l2(w_rows[1], (size_t)k * sizeof(elem));
    float acc[2][GEMV_MAX_ROWS];
#pragma unroll
    for (int q = 0; q < 2; q++)
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; r++) acc[q][r] = 0.0f;
    kernel_entry();  // x comes from the previous kernel; the rows of W do not
    accumulate_rows<2, 2>(x, w_rows, acc, m, k, k);
    __shared__ float partial[2 * GEMV_MAX_ROWS][GEMV_THREADS / 32];
    const float sum = block_rows_sum<2>(acc, m, partial);
    // Thread q·GEMV_MAX_ROWS + r holds column q's total for token r: the a threads take
    // the b totals through shared memory. `+ 0.0f` as gemv_elem adds its absent bias (a sum
    // of -0 becomes +0 there too).
    __shared__ float rounded[2 * GEMV_MAX_ROWS];
    const int t = threadIdx.x;
    if (t < 2 * GEMV_MAX_ROWS) rounded[t] = to_f32(from_f32<elem>(sum + 0.0f));
    __syncthreads();
    if (t >= m) return;
    const int r = t;
    float a = rounded[r], b = rounded[GEMV_MAX_ROWS + r];
    if (bias) {
        a += to_f32(bias[base + a_dim]);
        b += to_f32(bias[base + b_dim]);
    }
    if (rotate) {
        const float* cos_t = cos_sin + (size_t)r * 2 * freq_len;
        const float c = cos_t[i], s = cos_t[freq_len + i];
        const float ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        const float rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        a = ra;
        b = rb;
    }
    const int q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
    elem* dst;
    if (head < num_heads) {
        dst = q_out + (size_t)r * q_width + base;
    } else {
        // A negative slot is a padding token: q only.
        if (slots[r] < 0) return;
        const size_t at = (size_t)slots[r] * kv_width;
        dst = is_v ? v_cache + at + (base - q_width - kv_width) : k_cache + at + (base - q_width);
    }
    dst[a_dim] = from_f32<elem>(a);
    dst[b_dim] = from_f32<elem>(b);
}
