// Prefill attention on the tensor cores (bf16 and f16 modules; head_dim a multiple of 16, at
// most 128), flash-attention style: a block takes a tile of up to MMA_TILE consecutive
// query tokens of one sequence and one head, each of its four warps 16 of those queries.
// Keys come in chunks of 32, staged in shared memory (K as rows, V transposed); per chunk a
// warp computes S = Q·Kᵀ (16 × 32) with mma.m16n8k16, updates its rows' running max and
// sum, and adds P·V into its 16 × head_dim output, where the S accumulators are reused
// as P's operand registers without a trip through memory. The score matrix never exists.
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
#if defined(ELEM_BF16)
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

// tiles[2i], tiles[2i+1]: first flat row and count (≤ MMA_TILE) of tile i; its tokens are
// consecutive positions of one sequence. grid: (tiles, heads); block: 128 threads.
extern "C" __global__ void __launch_bounds__(128) attention_prefill_mma(
    const elem* __restrict__ q, const elem* __restrict__ k_cache,
    const elem* __restrict__ v_cache, elem* __restrict__ out, const int* __restrict__ tiles,
    const int* __restrict__ token_seq, const int* __restrict__ token_pos,
    const int* __restrict__ block_tables, int max_blocks_per_seq, int block_size, int num_heads,
    int num_kv_heads, int head_dim, float scale) {
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
    const unsigned* q32 = reinterpret_cast<const unsigned*>(q);
#pragma unroll
    for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
        if (kk < k_steps) {
            const size_t base0 = ((size_t)(first + row0) * num_heads + head) * head_dim + 16 * kk + 2 * c;
            const size_t base1 = ((size_t)(first + row1) * num_heads + head) * head_dim + 16 * kk + 2 * c;
            qa[kk][0] = row0 < count ? q32[base0 / 2] : 0u;
            qa[kk][1] = row1 < count ? q32[base1 / 2] : 0u;
            qa[kk][2] = row0 < count ? q32[(base0 + 8) / 2] : 0u;
            qa[kk][3] = row1 < count ? q32[(base1 + 8) / 2] : 0u;
        }
    }
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
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const unsigned short* k_row = &k_s[(nt * 8 + g) * K_STRIDE];
#pragma unroll
            for (int kk = 0; kk < MMA_MAX_DIM / 16; kk++) {
                if (kk < k_steps) {
                    const unsigned b0 = *reinterpret_cast<const unsigned*>(k_row + 16 * kk + 2 * c);
                    const unsigned b1 = *reinterpret_cast<const unsigned*>(k_row + 16 * kk + 8 + 2 * c);
                    mma_16816(s[nt], qa[kk], b0, b1);
                }
            }
        }
        // Scale, mask the future (and keys past the chunk), online softmax per row.
        float chunk_max0 = NEG_INFINITY, chunk_max1 = NEG_INFINITY;
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = base + nt * 8 + 2 * c + e;
                s[nt][e] = key <= pos0 && key < visible ? s[nt][e] * scale : NEG_INFINITY;
                s[nt][2 + e] = key <= pos1 && key < visible ? s[nt][2 + e] * scale : NEG_INFINITY;
                chunk_max0 = fmaxf(chunk_max0, s[nt][e]);
                chunk_max1 = fmaxf(chunk_max1, s[nt][2 + e]);
            }
        }
#pragma unroll
        for (int offset = 1; offset < 4; offset <<= 1) {
            chunk_max0 = fmaxf(chunk_max0, __shfl_xor_sync(0xffffffffu, chunk_max0, offset));
            chunk_max1 = fmaxf(chunk_max1, __shfl_xor_sync(0xffffffffu, chunk_max1, offset));
        }
        // Key 0 is in the first chunk and every query sees it, so the maxima are finite
        // from then on; a row with no key in this chunk keeps its max and adds zeros.
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
        unsigned pa[2][4];  // P as the A operand of two 16-key steps
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const float p00 = expf(s[nt][0] - new0), p01 = expf(s[nt][1] - new0);
            const float p10 = expf(s[nt][2] - new1), p11 = expf(s[nt][3] - new1);
            sum0 += p00 + p01;
            sum1 += p10 + p11;
            pa[nt / 2][(nt % 2) * 2 + 0] = pack2(p00, p01);
            pa[nt / 2][(nt % 2) * 2 + 1] = pack2(p10, p11);
        }
        // O += P·V: B fragments from Vᵀ (dims as n, keys as k).
#pragma unroll
        for (int n = 0; n < MMA_MAX_DIM / 8; n++) {
            if (n < d_tiles) {
                const unsigned short* vt_row = &vt_s[(n * 8 + g) * VT_STRIDE];
#pragma unroll
                for (int ks = 0; ks < 2; ks++) {
                    const unsigned b0 = *reinterpret_cast<const unsigned*>(vt_row + 16 * ks + 2 * c);
                    const unsigned b1 = *reinterpret_cast<const unsigned*>(vt_row + 16 * ks + 8 + 2 * c);
                    mma_16816(o[n], pa[ks], b0, b1);
                }
            }
        }
    }
    if (!warp_active) return;
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        sum0 += __shfl_xor_sync(0xffffffffu, sum0, offset);
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, offset);
    }
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
#endif
