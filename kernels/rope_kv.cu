// After the fused QKV product: adds the QKV bias, rotates q and k, writes q for attention
// and k, v into the paged cache. The row layout is [q heads | k heads | v heads] (InternLM2's
// per-group packing is reordered into it when the weights load).
// Rotary modes (spec chatglm2.md §3.5, internlm2.md §4):
//   0 — GLM: pairs (2i, 2i+1) for 2i < rot_dim, the rest of the head passes through;
//   1 — rotate half: pairs (i, i + head_dim/2) over the whole head.
// `cos_sin[t]` holds token t's cos then sin of each frequency (freq_len of each), computed
// on the host exactly as the CPU path computes them (angle in f32, cos/sin in f64), so
// both engines rotate alike and no thread spends time on trigonometry.
// `slots[t]` = block · block_size + offset, where token t's K/V go (cache rows of
// num_kv_heads · head_dim); -1: nowhere.
// grid: (tokens, head groups); a block takes its token's heads of group blockIdx.y (all
// heads split evenly over gridDim.y groups), a thread a pair of values at a time. Decode
// steps launch a group per head (64 threads: one pair each); prompts one group a token (a
// block per head and token leaves the chip scheduling tiny blocks, far below the memory's
// rate over a long prompt).
extern "C" __global__ void rope_write_kv(const elem* __restrict__ qkv,
                                         const elem* __restrict__ bias, elem* __restrict__ q_out,
                                         elem* __restrict__ k_cache, elem* __restrict__ v_cache,
                                         const int* __restrict__ slots,
                                         const float* __restrict__ cos_sin, int freq_len,
                                         int num_heads, int num_kv_heads, int head_dim,
                                         int rope_mode, int rot_dim) {
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
    for (int work = threadIdx.x; work < heads_here * half; work += blockDim.x) {
        const int head = first + work / half, i = work % half;
        if (head >= num_heads && !keep_kv) continue;
        const int base = head * head_dim;
        if (head >= num_heads + num_kv_heads) {  // a v head: copied with its bias
            elem* dst = v_cache + slot * kv_width + (base - q_width - kv_width);
#pragma unroll
            for (int d = i; d < head_dim; d += half) {
                float v = to_f32(row[base + d]);
                if (bias) v += to_f32(bias[base + d]);
                dst[d] = from_f32<elem>(v);
            }
            continue;
        }
        elem* dst = head < num_heads ? q_out + t * q_width + base
                                     : k_cache + slot * kv_width + (base - q_width);
        int a_dim, b_dim;
        bool rotate;
        if (rope_mode == 0) {
            a_dim = 2 * i;
            b_dim = 2 * i + 1;
            rotate = a_dim < rot_dim;
        } else {
            a_dim = i;
            b_dim = i + half;
            rotate = true;
        }
        float a = to_f32(row[base + a_dim]), b = to_f32(row[base + b_dim]);
        if (bias) {
            a += to_f32(bias[base + a_dim]);
            b += to_f32(bias[base + b_dim]);
        }
        if (rotate) {
            const float c = cos_t[i], s = sin_t[i];
            const float ra = a * c - b * s, rb = b * c + a * s;
            a = ra;
            b = rb;
        }
        dst[a_dim] = from_f32<elem>(a);
        dst[b_dim] = from_f32<elem>(b);
    }
}
