// Prefill attention on the tensor cores (bf16 and f16 modules; head_dim a multiple of 16, at
// most 128), flash-attention style: a block takes a tile of up to MMA_TILE consecutive
// query tokens of one sequence and one head, each of its four warps 16 of those queries.
// Keys come in chunks of 32, staged in shared memory (K as rows, V transposed); per chunk a
// warp computes S = Q·Kᵀ (16 × 32) with mma.m16n8k16, updates its rows' running max and
// sum, and adds P·V into its 16 × head_dim output, where the S accumulators are reused
// as P's operand registers without a trip through memory. The score matrix never exists.
//
//
// attention_decode_mma — decode tokens of grouped heads on the tensor cores: a block takes
// one (token, up to 16 query heads of one K/V head, split of the keys), its heads the rows
// of the MMA's A operand (rows past them zero). The block stages MMA_DECODE_KEYS keys of K
// (rows) and V (transposed) in shared memory with 16-byte loads, each warp 16 of them:
// S = Q·Kᵀ (16 heads × 16 keys), an online softmax per head, O += P·V. K/V is read once
// for all the heads, and the heads' dot products run on the tensor cores instead of the
// CUDA cores. Warps, then splits, merge as attention_decode's (attention.cu). Over a
// quantised cache (the _int8, _int4 and _fp8 kernels) each key's K and V heads are
// dequantised as the CUDA-core kernels dequantise them and rounded to elem as they are
// staged.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = lane % 4):
//   A (16×16, row): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
//   B (16×8, col):  b0 = (k 2c..2c+1, n g), b1 = (k 2c+8..2c+9, n g)
//   C (16×8, f32):  c0, c1 = (g, 2c..2c+1), c2, c3 = (g+8, 2c..2c+1)
#if defined(ELEM_BF16) || defined(ELEM_F16)
#define MMA_TILE 64
#define MMA_KEYS 32
#define MMA_MAX_DIM 128
#define K_STRIDE (MMA_MAX_DIM + 8)  // bf16 units; padded so fragment loads miss no bank
#define VT_STRIDE (MMA_KEYS + 8)

__device__ __forceinline__ void mma_16816(float c[4], const unsigned a[4], unsigned b0,
                                          unsigned b1) {
#if defined(EMU_HOST)
    // On CPU threads (tests/kernel_host/shim.h, bf16 only).
    emu_mma_m16n8k16_bf16(c, a, b0, b1);
#elif defined(ELEM_BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two values as one register of two elems, the first in the low half.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)from_f32<elem>(lo).bits | ((unsigned)from_f32<elem>(hi).bits << 16);
}

// The online softmax of a warp's rows g and g + 8 (the C fragments' rows) over one step of
// NT tiles of 8 keys, their scores in `s` already scaled and masked (NEG_INFINITY where a
// key does not count): the rows' maxima and sums, and their outputs `o`, brought to the new
// maxima, and P as the A operands of NT / 2 steps of 16 keys. A row's maximum must be
// finite after its first step (a key it sees); a later step without one adds zeros.
template <int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float& max0, float& max1,
                                               float& sum0, float& sum1,
                                               float (&o)[MMA_MAX_DIM / 8][4],
                                               unsigned (&pa)[NT / 2][4]) {
    float chunk_max0 = NEG_INFINITY, chunk_max1 = NEG_INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            chunk_max0 = fmaxf(chunk_max0, s[nt][e]);
            chunk_max1 = fmaxf(chunk_max1, s[nt][2 + e]);
        }
    }
    // A quad of lanes holds a row.
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        chunk_max0 = fmaxf(chunk_max0, __shfl_xor_sync(0xffffffffu, chunk_max0, offset));
        chunk_max1 = fmaxf(chunk_max1, __shfl_xor_sync(0xffffffffu, chunk_max1, offset));
    }
    const float new0 = fmaxf(max0, chunk_max0), new1 = fmaxf(max1, chunk_max1);
    const float corr0 = expf(max0 - new0), corr1 = expf(max1 - new1);
    max0 = new0;
    max1 = new1;
    sum0 *= corr0;
    sum1 *= corr1;
#pragma unroll
    for (int n = 0; n < MMA_MAX_DIM / 8; n++) {
        o[n][0] *= corr0;
        o[n][1] *= corr0;
        o[n][2] *= corr1;
        o[n][3] *= corr1;
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const float p00 = expf(s[nt][0] - new0), p01 = expf(s[nt][1] - new0);
        const float p10 = expf(s[nt][2] - new1), p11 = expf(s[nt][3] - new1);
        sum0 += p00 + p01;
        sum1 += p10 + p11;
        pa[nt / 2][(nt % 2) * 2 + 0] = pack2(p00, p01);
        pa[nt / 2][(nt % 2) * 2 + 1] = pack2(p10, p11);
    }
}

// The row sums of a warp's quads: each lane's share of rows g and g + 8 added up.
__device__ __forceinline__ void quad_sums(float& sum0, float& sum1) {
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        sum0 += __shfl_xor_sync(0xffffffffu, sum0, offset);
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, offset);
    }
}

// A fragments of two rows of queries (rows g and g + 8 of the MMA: `at0` and `at1` the elem
// offsets of their heads in q; zeros for a row past the valid ones), k_steps of 16 dims.
__device__ __forceinline__ void load_query_rows(unsigned (&qa)[MMA_MAX_DIM / 16][4],
                                                const elem* __restrict__ q, size_t at0,
                                                size_t at1, bool valid0, bool valid1,
                                                int k_steps, int c) {
    const unsigned* q32 = reinterpret_cast<const unsigned*>(q);
#pragma unroll
    for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
        if (kk < k_steps) {
            const size_t base0 = at0 + 16 * kk + 2 * c, base1 = at1 + 16 * kk + 2 * c;
            qa[kk][0] = valid0 ? q32[base0 / 2] : 0u;
            qa[kk][1] = valid1 ? q32[base1 / 2] : 0u;
            qa[kk][2] = valid0 ? q32[(base0 + 8) / 2] : 0u;
            qa[kk][3] = valid1 ? q32[(base1 + 8) / 2] : 0u;
        }
    }
}

// S = Q·Kᵀ over NT tiles of 8 keys, the keys' rows staged K_STRIDE apart from `k_rows`.
template <int NT>
__device__ __forceinline__ void score_tiles(float (&s)[NT][4],
                                            const unsigned (&qa)[MMA_MAX_DIM / 16][4],
                                            const unsigned short* k_rows, int k_steps, int g,
                                            int c) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        const unsigned short* k_row = &k_rows[(nt * 8 + g) * K_STRIDE];
#pragma unroll
        for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
            if (kk < k_steps) {
                const unsigned b0 = *reinterpret_cast<const unsigned*>(k_row + 16 * kk + 2 * c);
                const unsigned b1 = *reinterpret_cast<const unsigned*>(k_row + 16 * kk + 8 + 2 * c);
                mma_16816(s[nt], qa[kk], b0, b1);
            }
        }
    }
}

// O += P·V over KS steps of 16 keys: B fragments from Vᵀ staged `stride` apart (dims as n,
// keys as k), `vt` at the first key's column.
template <int KS>
__device__ __forceinline__ void add_pv(float (&o)[MMA_MAX_DIM / 8][4], const unsigned (&pa)[KS][4],
                                       const unsigned short* vt, int stride, int d_tiles, int g,
                                       int c) {
#pragma unroll
    for (int n = 0; n < MMA_MAX_DIM / 8; n++) {
        if (n < d_tiles) {
            const unsigned short* vt_row = &vt[(n * 8 + g) * stride];
#pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                const unsigned b0 = *reinterpret_cast<const unsigned*>(vt_row + 16 * ks + 2 * c);
                const unsigned b1 = *reinterpret_cast<const unsigned*>(vt_row + 16 * ks + 8 + 2 * c);
                mma_16816(o[n], pa[ks], b0, b1);
            }
        }
    }
}

// tiles[2i], tiles[2i+1]: first flat row and count (≤ MMA_TILE) of tile i; its tokens are
// consecutive positions of one sequence. grid: (tiles, heads); block: 128 threads.
extern "C" __global__ void __launch_bounds__(128) attention_prefill_mma(
    const elem* __restrict__ q, const elem* __restrict__ k_cache,
    const elem* __restrict__ v_cache, elem* __restrict__ out, const int* __restrict__ tiles,
    const int* __restrict__ token_seq, const int* __restrict__ token_pos,
    const int* __restrict__ block_tables, int max_blocks_per_seq, int block_size, int num_heads,
    int num_kv_heads, int head_dim, float scale) {
    kernel_entry();
    __shared__ __align__(16) unsigned short k_s[MMA_KEYS * K_STRIDE];
    __shared__ __align__(16) unsigned short vt_s[MMA_MAX_DIM * VT_STRIDE];

    const int first = tiles[2 * blockIdx.x], count = tiles[2 * blockIdx.x + 1];
    const int head = blockIdx.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, c = lane % 4;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int kv_width = num_kv_heads * head_dim;
    const int* table = block_tables + (size_t)token_seq[first] * max_blocks_per_seq;
    const int first_pos = token_pos[first];
    const int visible = first_pos + count;  // keys the tile's last query sees
    const int k_steps = head_dim / 16, d_tiles = head_dim / 8;

    // This warp's queries: rows warp·16 + g and + 8 of the tile.
    const int row0 = warp * 16 + g, row1 = row0 + 8;
    const int pos0 = first_pos + row0, pos1 = first_pos + row1;
    unsigned qa[MMA_MAX_DIM / 16][4];
    load_query_rows(qa, q, ((size_t)(first + row0) * num_heads + head) * head_dim,
                    ((size_t)(first + row1) * num_heads + head) * head_dim, row0 < count,
                    row1 < count, k_steps, c);
    float o[MMA_MAX_DIM / 8][4];
#pragma unroll
    for (int n = 0; n < MMA_MAX_DIM / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float max0 = NEG_INFINITY, max1 = NEG_INFINITY, sum0 = 0.0f, sum1 = 0.0f;
    const bool warp_active = warp * 16 < count;

    for (int base = 0; base < visible; base += MMA_KEYS) {
        const int keys = min(MMA_KEYS, visible - base);
        __syncthreads();  // the previous chunk is consumed
        // Stage K rows and V transposed; keys past `keys` are zero.
        const int vecs = head_dim / 8;  // 16-byte pieces of a row
        for (int i = threadIdx.x; i < MMA_KEYS * vecs; i += blockDim.x) {
            const int kk = i / vecs, piece = i % vecs;
            int4 kv = make_int4(0, 0, 0, 0), vv = make_int4(0, 0, 0, 0);
            if (kk < keys) {
                const int key = base + kk;
                const size_t row = (size_t)table[key / block_size] * block_size + key % block_size;
                const size_t at = row * kv_width + (size_t)kv_head * head_dim + piece * 8;
                kv = *reinterpret_cast<const int4*>(k_cache + at);
                vv = *reinterpret_cast<const int4*>(v_cache + at);
            }
            *reinterpret_cast<int4*>(&k_s[kk * K_STRIDE + piece * 8]) = kv;
            const unsigned short* v8 = reinterpret_cast<const unsigned short*>(&vv);
#pragma unroll
            for (int j = 0; j < 8; j++) vt_s[(piece * 8 + j) * VT_STRIDE + kk] = v8[j];
        }
        __syncthreads();
        if (!warp_active) continue;

        // S = Q·Kᵀ: 16 queries × 32 keys as 4 tiles of 8 keys.
        float s[4][4];
        score_tiles<4>(s, qa, k_s, k_steps, g, c);
        // Scale, mask the future (and keys past the chunk), online softmax per row. Key 0 is
        // in the first chunk and every query sees it.
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = base + nt * 8 + 2 * c + e;
                s[nt][e] = key <= pos0 && key < visible ? s[nt][e] * scale : NEG_INFINITY;
                s[nt][2 + e] = key <= pos1 && key < visible ? s[nt][2 + e] * scale : NEG_INFINITY;
            }
        }
        unsigned pa[2][4];  // P as the A operand of two 16-key steps
        online_softmax<4>(s, max0, max1, sum0, sum1, o, pa);
        add_pv<2>(o, pa, vt_s, VT_STRIDE, d_tiles, g, c);
    }
    if (!warp_active) return;
    quad_sums(sum0, sum1);
    unsigned* out32 = reinterpret_cast<unsigned*>(out);
#pragma unroll
    for (int n = 0; n < MMA_MAX_DIM / 8; n++) {
        if (n < d_tiles) {
            if (row0 < count) {
                const size_t at = ((size_t)(first + row0) * num_heads + head) * head_dim + n * 8 + 2 * c;
                out32[at / 2] = pack2(o[n][0] / sum0, o[n][1] / sum0);
            }
            if (row1 < count) {
                const size_t at = ((size_t)(first + row1) * num_heads + head) * head_dim + n * 8 + 2 * c;
                out32[at / 2] = pack2(o[n][2] / sum1, o[n][3] / sum1);
            }
        }
    }
}

#define MMA_DECODE_KEYS 64
#define VTD_STRIDE (MMA_DECODE_KEYS + 8)
// 16-byte pieces of K and V a thread keeps in flight while staging a chunk.
#define MMA_DECODE_IN_FLIGHT 4

// Stages keys [base, base + keys) of a quantised cache (KV as attention.cu's) for
// attention_decode_mma: each K and V head dequantised as the CUDA-core kernels dequantise it
// (common.cuh), rounded to elem, K as rows of k_s and V transposed in vt_s; keys past `keys`
// up to MMA_DECODE_KEYS zero. Heads start on 4-byte boundaries (head_dim a multiple of 16:
// kv_head_bytes a multiple of 4), so levels move a word at a time. Every thread calls it.
template <int KV>
__device__ __forceinline__ void stage_quantised_chunk(
    const unsigned char* __restrict__ k_bytes, const unsigned char* __restrict__ v_bytes,
    const int* table, int base, int keys, int block_size, int num_kv_heads, int kv_head,
    int head_dim, unsigned short* k_s, unsigned short* vt_s) {
    constexpr int BITS = KV_BITS(KV), PER_WORD = 32 / BITS;
    const int words = head_dim / PER_WORD;
    // Each key's head offset and the (scale, zero) of its K and V, then its levels.
    __shared__ size_t head_at_s[MMA_DECODE_KEYS];
    __shared__ float scale_zero_s[MMA_DECODE_KEYS][4];
    stage_key_heads(k_bytes, v_bytes, table, base, keys, block_size, num_kv_heads, kv_head,
                    head_dim, BITS, head_at_s, scale_zero_s);
    __syncthreads();
    // Consecutive threads take consecutive keys of one word, so the transposed stores of V
    // fall in distinct banks (as the elem staging).
    for (int i0 = threadIdx.x; i0 < MMA_DECODE_KEYS * words; i0 += 128 * MMA_DECODE_IN_FLIGHT) {
        unsigned kw[MMA_DECODE_IN_FLIGHT], vw[MMA_DECODE_IN_FLIGHT];
#pragma unroll
        for (int j = 0; j < MMA_DECODE_IN_FLIGHT; j++) {
            const int i = i0 + 128 * j;
            const int kk = i % MMA_DECODE_KEYS, word = i / MMA_DECODE_KEYS;
            kw[j] = vw[j] = 0u;
            if (i < MMA_DECODE_KEYS * words && kk < keys) {
                const size_t at = head_at_s[kk];
                kw[j] = __ldg(reinterpret_cast<const unsigned*>(k_bytes + at) + word);
                vw[j] = __ldg(reinterpret_cast<const unsigned*>(v_bytes + at) + word);
            }
        }
#pragma unroll
        for (int j = 0; j < MMA_DECODE_IN_FLIGHT; j++) {
            const int i = i0 + 128 * j;
            if (i < MMA_DECODE_KEYS * words) {
                const int kk = i % MMA_DECODE_KEYS, word = i / MMA_DECODE_KEYS;
                const bool valid = kk < keys;
                const float* sz = scale_zero_s[kk];
#pragma unroll
                for (int e = 0; e < PER_WORD; e++) {
                    const int d = word * PER_WORD + e;
                    const unsigned mask = (1u << BITS) - 1u;
                    const float k = valid ? kv_value<KV>((kw[j] >> (BITS * e)) & mask, sz[0], sz[1]) : 0.0f;
                    const float v = valid ? kv_value<KV>((vw[j] >> (BITS * e)) & mask, sz[2], sz[3]) : 0.0f;
                    k_s[kk * K_STRIDE + d] = from_f32<elem>(k).bits;
                    vt_s[d * VTD_STRIDE + kk] = from_f32<elem>(v).bits;
                }
            }
        }
    }
}

// Arguments and grid as attention_decode_h* (grid: decode tokens, num_heads / heads,
// splits), heads = num_heads / gridDim.y ≤ 16 dividing the group; block: 128 threads. KV the
// cache's format (attention.cu): quantised K/V are dequantised as they are staged.
template <int KV>
__device__ __forceinline__ void decode_mma(
    const elem* __restrict__ q, const void* __restrict__ k_store,
    const void* __restrict__ v_store, elem* __restrict__ out, float* __restrict__ partial,
    int* __restrict__ split_counters, const int* __restrict__ decode_rows,
    const int* __restrict__ token_seq, const int* __restrict__ token_pos,
    const int* __restrict__ block_tables, int max_blocks_per_seq, int block_size, int num_heads,
    int num_kv_heads, int head_dim, float scale, int partition, int splits) {
    kernel_entry();
    // K rows then V transposed; after the keys, the warps' sums (ATTN_WARPS · heads ·
    // head_dim floats ≤ 32 KiB) in the same bytes.
    constexpr int K_BYTES = MMA_DECODE_KEYS * K_STRIDE * 2;
    constexpr int VT_BYTES = MMA_MAX_DIM * VTD_STRIDE * 2;
    __shared__ __align__(16) unsigned char staging[K_BYTES + VT_BYTES];
    unsigned short* k_s = reinterpret_cast<unsigned short*>(staging);
    unsigned short* vt_s = reinterpret_cast<unsigned short*>(staging + K_BYTES);

    const int heads = num_heads / gridDim.y;
    const int t = decode_rows[blockIdx.x];
    const int first_head = blockIdx.y * heads;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, c = lane % 4;
    const int kv_head = first_head / (num_heads / num_kv_heads);
    const int* table = block_tables + (size_t)token_seq[t] * max_blocks_per_seq;
    int begin, end, used_splits;
    // Splits of as few as one chunk: a block's four warps take 16 keys each, so a short
    // context still spreads over enough blocks.
    if (!decode_split_keys(token_pos[t] + 1, blockIdx.z, splits, partition, MMA_DECODE_KEYS, &begin,
                           &end, &used_splits))
        return;
    const int k_steps = head_dim / 16, d_tiles = head_dim / 8;

    // A fragments of the heads as rows g and g + 8.
    const int row0 = g, row1 = g + 8;
    unsigned qa[MMA_MAX_DIM / 16][4];
    load_query_rows(qa, q, ((size_t)t * num_heads + first_head + row0) * head_dim,
                    ((size_t)t * num_heads + first_head + row1) * head_dim, row0 < heads,
                    row1 < heads, k_steps, c);
    float o[MMA_MAX_DIM / 8][4];
#pragma unroll
    for (int n = 0; n < MMA_MAX_DIM / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float max0 = NEG_INFINITY, max1 = NEG_INFINITY, sum0 = 0.0f, sum1 = 0.0f;

    for (int base = begin; base < end; base += MMA_DECODE_KEYS) {
        const int keys = min(MMA_DECODE_KEYS, end - base);
        __syncthreads();  // the previous chunk is consumed
        if constexpr (KV != KV_ELEM) {
            stage_quantised_chunk<KV>(static_cast<const unsigned char*>(k_store),
                                      static_cast<const unsigned char*>(v_store), table, base, keys,
                                      block_size, num_kv_heads, kv_head, head_dim, k_s, vt_s);
        } else {
            // Stage K rows and V transposed, keys past `keys` zero. Consecutive threads take
            // consecutive keys of one piece, so the transposed stores fall in distinct banks.
            const elem* __restrict__ k_cache = static_cast<const elem*>(k_store);
            const elem* __restrict__ v_cache = static_cast<const elem*>(v_store);
            const int kv_width = num_kv_heads * head_dim;
            const int vecs = head_dim / 8;  // 16-byte pieces of a row
            for (int i0 = threadIdx.x; i0 < MMA_DECODE_KEYS * vecs; i0 += 128 * MMA_DECODE_IN_FLIGHT) {
                int4 kv[MMA_DECODE_IN_FLIGHT], vv[MMA_DECODE_IN_FLIGHT];
#pragma unroll
                for (int j = 0; j < MMA_DECODE_IN_FLIGHT; j++) {
                    const int i = i0 + 128 * j;
                    const int kk = i % MMA_DECODE_KEYS, piece = i / MMA_DECODE_KEYS;
                    kv[j] = vv[j] = make_int4(0, 0, 0, 0);
                    if (i < MMA_DECODE_KEYS * vecs && kk < keys) {
                        const size_t at = cache_row(table, base + kk, block_size) * kv_width +
                                          (size_t)kv_head * head_dim + piece * 8;
                        kv[j] = __ldg(reinterpret_cast<const int4*>(k_cache + at));
                        vv[j] = __ldg(reinterpret_cast<const int4*>(v_cache + at));
                    }
                }
#pragma unroll
                for (int j = 0; j < MMA_DECODE_IN_FLIGHT; j++) {
                    const int i = i0 + 128 * j;
                    if (i < MMA_DECODE_KEYS * vecs) {
                        const int kk = i % MMA_DECODE_KEYS, piece = i / MMA_DECODE_KEYS;
                        *reinterpret_cast<int4*>(&k_s[kk * K_STRIDE + piece * 8]) = kv[j];
                        const unsigned short* v8 = reinterpret_cast<const unsigned short*>(&vv[j]);
#pragma unroll
                        for (int e = 0; e < 8; e++) vt_s[(piece * 8 + e) * VTD_STRIDE + kk] = v8[e];
                    }
                }
            }
        }
        __syncthreads();
        const int first_key = warp * 16;  // this warp's keys within the chunk
        if (first_key >= keys) continue;

        // S = Q·Kᵀ: 16 heads × 16 keys as 2 tiles of 8 keys.
        float s[2][4];
        score_tiles<2>(s, qa, &k_s[first_key * K_STRIDE], k_steps, g, c);
        // Scale, mask keys past the chunk, online softmax per head. The warp's first key is
        // valid.
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const bool valid = first_key + nt * 8 + 2 * c + e < keys;
                s[nt][e] = valid ? s[nt][e] * scale : NEG_INFINITY;
                s[nt][2 + e] = valid ? s[nt][2 + e] * scale : NEG_INFINITY;
            }
        }
        unsigned pa[1][4];  // P as the A operand of one 16-key step
        online_softmax<2>(s, max0, max1, sum0, sum1, o, pa);
        add_pv<1>(o, pa, &vt_s[first_key], VTD_STRIDE, d_tiles, g, c);
    }
    quad_sums(sum0, sum1);

    // The warps' (max, sum, output) per head into shared memory for decode_finish; a warp
    // that had no keys leaves a zero sum, which it skips.
    __shared__ float warp_max_s[ATTN_WARPS * 16], warp_sum_s[ATTN_WARPS * 16];
    float* warp_acc = reinterpret_cast<float*>(staging);
    __syncthreads();  // the staging is no longer read
    if (c == 0) {
        if (row0 < heads) {
            warp_max_s[warp * heads + row0] = max0;
            warp_sum_s[warp * heads + row0] = sum0;
        }
        if (row1 < heads) {
            warp_max_s[warp * heads + row1] = max1;
            warp_sum_s[warp * heads + row1] = sum1;
        }
    }
#pragma unroll
    for (int n = 0; n < MMA_MAX_DIM / 8; n++) {
        if (n < d_tiles) {
            const int d = n * 8 + 2 * c;
            if (row0 < heads) {
                float* at = warp_acc + ((size_t)warp * heads + row0) * head_dim + d;
                at[0] = o[n][0];
                at[1] = o[n][1];
            }
            if (row1 < heads) {
                float* at = warp_acc + ((size_t)warp * heads + row1) * head_dim + d;
                at[0] = o[n][2];
                at[1] = o[n][3];
            }
        }
    }
    __syncthreads();
    decode_finish(warp_max_s, warp_sum_s, warp_acc, heads, out, partial, split_counters, t,
                  first_head, num_heads, head_dim, used_splits, splits);
}

#define ATTENTION_DECODE_MMA(NAME, FORMAT, CACHE)                                                \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                      \
        const elem* __restrict__ q, const CACHE* __restrict__ k_cache,                           \
        const CACHE* __restrict__ v_cache, elem* __restrict__ out, float* __restrict__ partial,  \
        int* __restrict__ split_counters, const int* __restrict__ decode_rows,                   \
        const int* __restrict__ token_seq, const int* __restrict__ token_pos,                    \
        const int* __restrict__ block_tables, int max_blocks_per_seq, int block_size,            \
        int num_heads, int num_kv_heads, int head_dim, float scale, int partition, int splits) {  \
        decode_mma<FORMAT>(q, k_cache, v_cache, out, partial, split_counters, decode_rows,       \
                           token_seq, token_pos, block_tables, max_blocks_per_seq, block_size,   \
                           num_heads, num_kv_heads, head_dim, scale, partition, splits);         \
    }
ATTENTION_DECODE_MMA(attention_decode_mma, KV_ELEM, elem)
ATTENTION_DECODE_MMA(attention_decode_mma_int8, KV_INT8, unsigned char)
ATTENTION_DECODE_MMA(attention_decode_mma_int4, KV_INT4, unsigned char)
ATTENTION_DECODE_MMA(attention_decode_mma_fp8, KV_FP8, unsigned char)
#endif
