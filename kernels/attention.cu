// Causal attention over the paged KV cache, never storing a score row (online softmax).
// Two kernels by the shape of the work:
//
// attention_decode_h{1,2,4,8} — query tokens that come one per sequence (decode steps). A
//   block takes one (token, group of 1, 2, 4 or 8 query heads that share a K/V head, split of at
//   least 128 keys): each warp scores 32 keys at once, a lane per key (the whole K and V
//   rows with 16-byte loads, V staged in shared memory) against every head of the group,
//   then adds the V rows with lanes across the head dim. The group reads the K/V once
//   between its heads: with many sequences a decode step's attention is bound by those
//   reads, and ChatGLM2 has 16 query heads per K/V head. With few sequences, one head a
//   block and splitting the keys over blocks (flash-decoding) keep the chip busy; each
//   split leaves (max, sum, unnormalised output) per head and the last split to finish
//   merges them. A sequence uses only the splits its keys reach (the others return at
//   once); with one, the block writes the output itself.
// attention_prefill — a tile of up to PREFILL_TILE consecutive tokens of one sequence per
//   (tile, head): the block stages 32 keys of K and V in shared memory (f32) and every query
//   of the tile uses them, so K/V is read once per tile rather than once per token.
//
// Lookup: key j of sequence s sits in cache row block_tables[s][j / block_size] ·
// block_size + j % block_size; a row holds num_kv_heads · head_dim elements, or in the
// quantised caches (the _int8 / _int4 / _fp8 kernels) num_kv_heads heads of kv_head_bytes bytes
// (common.cuh), dequantised exactly as the CPU path does. Query head h reads K/V head
// h / (num_heads / num_kv_heads).
#define ATTN_WARPS 4
#define ATTN_THREADS (ATTN_WARPS * 32)
#define MAX_DIMS_PER_LANE 4  // head_dim ≤ 128
#define PREFILL_TILE 16
#define DECODE_MIN_PARTITION 128  // decode_splits in src/model/gpu/tables.rs
#define PREFILL_QUERIES_PER_WARP (PREFILL_TILE / ATTN_WARPS)
#define PREFILL_MAX_DIMS_PER_LANE 4  // head_dim ≤ 128

union AttnChunk {
    int4 raw;
    elem e[16 / sizeof(elem)];
};

__device__ __forceinline__ size_t cache_row(const int* table, int key, int block_size) {
    return (size_t)table[key / block_size] * block_size + key % block_size;
}

// One lane's key of a quantised cache: its K dotted with the block's queries (q_s), its V
// head (levels, scale, zero: kv_head_bytes) copied as it is to the warp's staging, row
// `lane` of [32][kv_head_bytes] at `shared` + warp · 32 · kv_head_bytes. Rows of whole
// 4-byte words (kv_head_bytes a multiple of 4, so every head starts word-aligned) move a
// word at a time, others a byte.
template <int HEADS, int KV>
__device__ __forceinline__ void decode_quantised_key(
    const void* __restrict__ k_store, const void* __restrict__ v_store, const int* table, int key,
    int block_size, int num_kv_heads, int kv_head, int head_dim,
    const float (*q_s)[32 * MAX_DIMS_PER_LANE], float* dot, unsigned char* shared, int warp,
    int lane) {
    constexpr int BITS = KV_BITS(KV);
    const int head_bytes = kv_head_bytes(head_dim, BITS);
    const size_t at = (cache_row(table, key, block_size) * num_kv_heads + kv_head) * head_bytes;
    const unsigned char* k_head = static_cast<const unsigned char*>(k_store) + at;
    const unsigned char* v_head = static_cast<const unsigned char*>(v_store) + at;
    unsigned char* v_dst = shared + ((size_t)warp * 32 + lane) * head_bytes;
    float s, z;
    kv_read_scale_zero(k_head, head_dim, BITS, &s, &z);
    if (head_bytes % 4 == 0) {
        const unsigned int* k_words = reinterpret_cast<const unsigned int*>(k_head);
        const unsigned int* v_words = reinterpret_cast<const unsigned int*>(v_head);
        unsigned int* v_dst_words = reinterpret_cast<unsigned int*>(v_dst);
        constexpr int PER_WORD = 32 / BITS;
        // Words of K and V in flight per lane, as the elem path keeps its chunks.
        constexpr int IN_FLIGHT = 8;
        const int words = head_dim / PER_WORD;
        for (int w0 = 0; w0 < words; w0 += IN_FLIGHT) {
            unsigned int kw[IN_FLIGHT], vw[IN_FLIGHT];
#pragma unroll
            for (int c = 0; c < IN_FLIGHT; c++) {
                if (w0 + c < words) {
                    kw[c] = __ldg(k_words + w0 + c);
                    vw[c] = __ldg(v_words + w0 + c);
                }
            }
#pragma unroll
            for (int c = 0; c < IN_FLIGHT; c++) {
                if (w0 + c < words) {
                    v_dst_words[w0 + c] = vw[c];
#pragma unroll
                    for (int j = 0; j < PER_WORD; j++) {
                        const unsigned int level = (kw[c] >> (BITS * j)) & ((1u << BITS) - 1u);
                        const float k = kv_value<KV>(level, s, z);
#pragma unroll
                        for (int h = 0; h < HEADS; h++)
                            dot[h] += q_s[h][(w0 + c) * PER_WORD + j] * k;
                    }
                }
            }
        }
        v_dst_words[words] = __ldg(v_words + words);  // scale and zero
    } else {
        for (int d = 0; d < head_dim; d++) {
            const float k = kv_value<KV>(kv_level_at<BITS>(k_head, d), s, z);
#pragma unroll
            for (int h = 0; h < HEADS; h++) dot[h] += q_s[h][d] * k;
        }
        for (int b = 0; b < head_bytes; b++) v_dst[b] = v_head[b];
    }
}

// The heads of keys [base, base + keys) of a quantised cache (`bits` a level) for a block
// that stages them: each key's head byte offset into head_at_s and the (scale, zero) of its
// K and V into scale_zero_s, by the block's first `keys` threads (the caller syncs after).
__device__ __forceinline__ void stage_key_heads(const unsigned char* k_bytes,
                                                const unsigned char* v_bytes, const int* table,
                                                int base, int keys, int block_size,
                                                int num_kv_heads, int kv_head, int head_dim,
                                                int bits, size_t* head_at_s,
                                                float (*scale_zero_s)[4]) {
    if (threadIdx.x < keys) {
        const int kk = threadIdx.x;
        const size_t at = (cache_row(table, base + kk, block_size) * num_kv_heads + kv_head) *
                          kv_head_bytes(head_dim, bits);
        head_at_s[kk] = at;
        float* sz = scale_zero_s[kk];
        kv_read_scale_zero(k_bytes + at, head_dim, bits, &sz[0], &sz[1]);
        kv_read_scale_zero(v_bytes + at, head_dim, bits, &sz[2], &sz[3]);
    }
}

// Keys [begin, end) of decode split `split` and the splits the sequence uses (`used`);
// false when this split has none. partition 0: each sequence divides its own keys over the
// splits (a CUDA graph replays one launch for any lengths) as decode_splits divides a
// launched step's: into at most one split per `min_partition` keys (DECODE_MIN_PARTITION for
// the CUDA-core kernels, MMA_DECODE_KEYS for the tensor-core one), of whole warps of 32 (129
// keys stay one split of the CUDA-core kernels rather than 128 and a one-key split with its
// merge). With one split used, its block writes the output itself (no partial, no merge).
__device__ __forceinline__ bool decode_split_keys(int visible, int split, int splits, int partition,
                                                  int min_partition, int* begin, int* end,
                                                  int* used) {
    if (partition <= 0) {
        const int wanted = max(1, min(splits, visible / min_partition));
        partition = ((visible + wanted - 1) / wanted + 31) / 32 * 32;
    }
    *used = min(splits, (visible + partition - 1) / partition);
    if (split >= *used) return false;
    *begin = split * partition;
    *end = min(visible, *begin + partition);
    return true;
}

// A decode block's result from its warps' (max, sum, unnormalised output) for each of its
// `heads` heads — shared arrays [ATTN_WARPS][heads] and [ATTN_WARPS][heads][head_dim] — as
// the output (one split) or as this split's partial result, (max, sum, output) per head
// and split; the last split of (token, heads) to finish merges them all. Every thread of
// the block calls it.
__device__ __forceinline__ void decode_finish(const float* warp_max_s, const float* warp_sum_s,
                                              const float* warp_acc, int heads,
                                              elem* __restrict__ out, float* __restrict__ partial,
                                              int* __restrict__ split_counters, int t,
                                              int first_head, int num_heads, int head_dim,
                                              int used_splits, int splits) {
    const int split = blockIdx.z;
    for (int h = 0; h < heads; h++) {
        const int head = first_head + h;
        float block_max = NEG_INFINITY;
        for (int w = 0; w < ATTN_WARPS; w++) block_max = fmaxf(block_max, warp_max_s[w * heads + h]);
        float total = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++)
            if (warp_sum_s[w * heads + h] > 0.0f)
                total += warp_sum_s[w * heads + h] * expf(warp_max_s[w * heads + h] - block_max);
        float* part = partial + (((size_t)blockIdx.x * num_heads + head) * splits + split) * (head_dim + 2);
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float value = 0.0f;
            for (int w = 0; w < ATTN_WARPS; w++)
                if (warp_sum_s[w * heads + h] > 0.0f)
                    value += warp_acc[((size_t)w * heads + h) * head_dim + d] *
                             expf(warp_max_s[w * heads + h] - block_max);
            if (used_splits == 1)
                out[((size_t)t * num_heads + head) * head_dim + d] = from_f32<elem>(value / total);
            else
                part[2 + d] = value;
        }
        if (used_splits > 1 && threadIdx.x == 0) {
            part[0] = block_max;
            part[1] = total;
        }
    }
    if (used_splits == 1) return;
    // The last split of this (token, head group) to finish merges all of them (the fence
    // makes this block's partials visible before it is counted).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    int* counter = split_counters + (size_t)blockIdx.x * num_heads + first_head;
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == used_splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int h = 0; h < heads; h++) {
        const int head = first_head + h;
        const float* parts = partial + ((size_t)blockIdx.x * num_heads + head) * splits * (head_dim + 2);
        float global_max = NEG_INFINITY;
        for (int s = 0; s < used_splits; s++) global_max = fmaxf(global_max, __ldcg(parts + s * (head_dim + 2)));
        float merged_total = 0.0f;
        for (int s = 0; s < used_splits; s++) {
            const float m_s = __ldcg(parts + s * (head_dim + 2)), l_s = __ldcg(parts + s * (head_dim + 2) + 1);
            if (l_s > 0.0f) merged_total += l_s * expf(m_s - global_max);
        }
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float value = 0.0f;
            for (int s = 0; s < used_splits; s++) {
                const float* p = parts + s * (head_dim + 2);
                const float l_s = __ldcg(p + 1);
                if (l_s > 0.0f) value += __ldcg(p + 2 + d) * expf(__ldcg(p) - global_max);
            }
            out[((size_t)t * num_heads + head) * head_dim + d] = from_f32<elem>(value / merged_total);
        }
    }
    if (threadIdx.x == 0) *counter = 0;  // ready for the next call
}

// HEADS query heads a block (attention_decode_h1 … _h8 below; HEADS divides
// num_heads / num_kv_heads); KV the cache's format (KV_ELEM, KV_INT8, KV_INT4, KV_FP8).
// grid: (decode tokens, num_heads / HEADS, splits); block: ATTN_THREADS; dynamic shared
// memory: ATTN_WARPS · 32 · head_dim elems (quantised, the V staging takes 32 heads of
// kv_head_bytes a warp, within that from head_dim 4 up).
template <int HEADS, int KV>
__device__ __forceinline__ void decode_attention(
    const elem* __restrict__ q, const void* __restrict__ k_store,
    const void* __restrict__ v_store, elem* __restrict__ out, float* __restrict__ partial,
    int* __restrict__ split_counters, const int* __restrict__ decode_rows,
    const int* __restrict__ token_seq,
    const int* __restrict__ token_pos, const int* __restrict__ block_tables,
    int max_blocks_per_seq, int block_size, int num_heads, int num_kv_heads, int head_dim,
    float scale, int partition, int splits) {
    kernel_entry();
    constexpr int heads = HEADS;
    const elem* __restrict__ k_cache = static_cast<const elem*>(k_store);
    const elem* __restrict__ v_cache = static_cast<const elem*>(v_store);
    const int t = decode_rows[blockIdx.x];
    const int first_head = blockIdx.y * heads;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int kv_head = first_head / (num_heads / num_kv_heads);
    const int kv_width = num_kv_heads * head_dim;
    const int* table = block_tables + (size_t)token_seq[t] * max_blocks_per_seq;
    const int visible = token_pos[t] + 1;
    int begin, end, used_splits;
    if (!decode_split_keys(visible, blockIdx.z, splits, partition, DECODE_MIN_PARTITION, &begin,
                           &end, &used_splits))
        return;

    __shared__ float q_s[heads][32 * MAX_DIMS_PER_LANE];
    const elem* q_first = q + ((size_t)t * num_heads + first_head) * head_dim;
    for (int i = threadIdx.x; i < heads * head_dim; i += blockDim.x)
        q_s[i / head_dim][i % head_dim] = to_f32(q_first[i]) * scale;
    __syncthreads();

    constexpr int V = 16 / sizeof(elem);
    const bool vector_rows = head_dim % V == 0;
    float acc[heads][MAX_DIMS_PER_LANE];
    float running_max[heads], running_sum[heads];
#pragma unroll
    for (int h = 0; h < heads; h++) {
        running_max[h] = NEG_INFINITY;
        running_sum[h] = 0.0f;
#pragma unroll
        for (int j = 0; j < MAX_DIMS_PER_LANE; j++) acc[h][j] = 0.0f;
    }

    // Each lane fetches its key's whole K and V rows at once (one round trip per chunk of
    // 32 keys); V goes through shared memory so the P·V sum can run with lanes across dims.
    extern __shared__ __align__(16) unsigned char decode_shared[];
    elem* v_warp = reinterpret_cast<elem*>(decode_shared) + (size_t)warp * 32 * head_dim;
    for (int base = begin + warp * 32; base < end; base += ATTN_THREADS) {
        const int key = base + lane;
        const bool valid = key < end;
        float dot[heads];
#pragma unroll
        for (int h = 0; h < heads; h++) dot[h] = 0.0f;
        if constexpr (KV != KV_ELEM) {
            if (valid) decode_quantised_key<heads, KV>(k_store, v_store, table, key, block_size,
                                                       num_kv_heads, kv_head, head_dim, q_s, dot,
                                                       decode_shared, warp, lane);
        } else if (valid) {
            const size_t row = cache_row(table, key, block_size);
            const size_t at = row * kv_width + (size_t)kv_head * head_dim;
            const elem* k_row = k_cache + at;
            const elem* v_row = v_cache + at;
            if (vector_rows) {
                const int4* k4 = reinterpret_cast<const int4*>(k_row);
                const int4* v4 = reinterpret_cast<const int4*>(v_row);
                int4* v_dst = reinterpret_cast<int4*>(v_warp + lane * head_dim);
                const int chunks = head_dim / V;
                // Chunks of K and V in flight per lane: fewer where more heads' sums take
                // registers (no spills).
                constexpr int IN_FLIGHT = heads >= 4 ? 8 : 16;
                for (int c0 = 0; c0 < chunks; c0 += IN_FLIGHT) {
                    AttnChunk kc[IN_FLIGHT];
                    int4 vc[IN_FLIGHT];
#pragma unroll
                    for (int c = 0; c < IN_FLIGHT; c++) {
                        if (c0 + c < chunks) {
                            kc[c].raw = __ldg(k4 + c0 + c);
                            vc[c] = __ldg(v4 + c0 + c);
                        }
                    }
#pragma unroll
                    for (int c = 0; c < IN_FLIGHT; c++) {
                        if (c0 + c < chunks) {
                            v_dst[c0 + c] = vc[c];
#pragma unroll
                            for (int j = 0; j < V; j++) {
                                const float k = to_f32(kc[c].e[j]);
#pragma unroll
                                for (int h = 0; h < heads; h++)
                                    dot[h] += q_s[h][(c0 + c) * V + j] * k;
                            }
                        }
                    }
                }
            } else {
                for (int d = 0; d < head_dim; d++) {
                    const float k = to_f32(k_row[d]);
#pragma unroll
                    for (int h = 0; h < heads; h++)
                        dot[h] += q_s[h][d] * k;
                    v_warp[lane * head_dim + d] = v_row[d];
                }
            }
        }
        __syncwarp();
        float p[heads];
#pragma unroll
        for (int h = 0; h < heads; h++) {
            const float score = valid ? dot[h] : NEG_INFINITY;
            const float new_max = fmaxf(running_max[h], warp_max(score));
            const float correction = expf(running_max[h] - new_max);
            p[h] = valid ? expf(score - new_max) : 0.0f;
            running_sum[h] = running_sum[h] * correction + warp_sum(p[h]);
            running_max[h] = new_max;
#pragma unroll
            for (int j = 0; j < MAX_DIMS_PER_LANE; j++) acc[h][j] *= correction;
        }
        const int count = min(32, end - base);
        for (int kk = 0; kk < count; kk++) {
            float v[MAX_DIMS_PER_LANE];
            if constexpr (KV != KV_ELEM) {
                // The key's V levels as staged, its scale and zero beside them.
                constexpr int BITS = KV_BITS(KV);
                const int head_bytes = kv_head_bytes(head_dim, BITS);
                const unsigned char* v_key =
                    decode_shared + ((size_t)warp * 32 + kk) * head_bytes;
                float s, z;
                kv_read_scale_zero(v_key, head_dim, BITS, &s, &z);
#pragma unroll
                for (int j = 0; j < MAX_DIMS_PER_LANE; j++) {
                    const int d = lane + 32 * j;
                    v[j] = d < head_dim ? kv_value<KV>(kv_level_at<BITS>(v_key, d), s, z) : 0.0f;
                }
            } else {
                const elem* v_key = v_warp + kk * head_dim;
#pragma unroll
                for (int j = 0; j < MAX_DIMS_PER_LANE; j++) {
                    const int d = lane + 32 * j;
                    v[j] = d < head_dim ? to_f32(v_key[d]) : 0.0f;
                }
            }
#pragma unroll
            for (int h = 0; h < heads; h++) {
                const float pk = __shfl_sync(0xffffffffu, p[h], kk);
#pragma unroll
                for (int j = 0; j < MAX_DIMS_PER_LANE; j++) acc[h][j] += pk * v[j];
            }
        }
        __syncwarp();  // v_warp is refilled by the next chunk
    }

    // Merge the warps, then write each head's output (one split) or this split's partial
    // result. The V staging memory, no longer read, holds the warps' sums:
    // [ATTN_WARPS][heads][head_dim] floats (at most 4 · 8 · 128 · 4 bytes, within the
    // 4 · 32 · head_dim elems it has).
    __shared__ float warp_max_s[ATTN_WARPS][heads], warp_sum_s[ATTN_WARPS][heads];
    float* warp_acc = reinterpret_cast<float*>(decode_shared);
    __syncthreads();
#pragma unroll
    for (int h = 0; h < heads; h++) {
        if (lane == 0) {
            warp_max_s[warp][h] = running_max[h];
            warp_sum_s[warp][h] = running_sum[h];
        }
#pragma unroll
        for (int j = 0; j < MAX_DIMS_PER_LANE; j++) {
            const int d = lane + 32 * j;
            if (d < head_dim) warp_acc[((size_t)warp * heads + h) * head_dim + d] = acc[h][j];
        }
    }
    __syncthreads();
    decode_finish(&warp_max_s[0][0], &warp_sum_s[0][0], warp_acc, heads, out, partial,
                  split_counters, t, first_head, num_heads, head_dim, used_splits, splits);
}

#define ATTENTION_DECODE(NAME, H, FORMAT, CACHE)                                                 \
    extern "C" __global__ void NAME(                                                             \
        const elem* __restrict__ q, const CACHE* __restrict__ k_cache,                           \
        const CACHE* __restrict__ v_cache, elem* __restrict__ out, float* __restrict__ partial,  \
        int* __restrict__ split_counters, const int* __restrict__ decode_rows,                   \
        const int* __restrict__ token_seq, const int* __restrict__ token_pos,                    \
        const int* __restrict__ block_tables, int max_blocks_per_seq, int block_size,            \
        int num_heads, int num_kv_heads, int head_dim, float scale, int partition, int splits) {  \
        decode_attention<H, FORMAT>(q, k_cache, v_cache, out, partial, split_counters, decode_rows, \
                                  token_seq, token_pos, block_tables, max_blocks_per_seq,        \
                                  block_size, num_heads, num_kv_heads, head_dim, scale,          \
                                  partition, splits);                                            \
    }
ATTENTION_DECODE(attention_decode_h1, 1, KV_ELEM, elem)
ATTENTION_DECODE(attention_decode_h2, 2, KV_ELEM, elem)
ATTENTION_DECODE(attention_decode_h4, 4, KV_ELEM, elem)
ATTENTION_DECODE(attention_decode_h8, 8, KV_ELEM, elem)
ATTENTION_DECODE(attention_decode_int8_h1, 1, KV_INT8, unsigned char)
ATTENTION_DECODE(attention_decode_int8_h2, 2, KV_INT8, unsigned char)
ATTENTION_DECODE(attention_decode_int8_h4, 4, KV_INT8, unsigned char)
ATTENTION_DECODE(attention_decode_int8_h8, 8, KV_INT8, unsigned char)
ATTENTION_DECODE(attention_decode_int4_h1, 1, KV_INT4, unsigned char)
ATTENTION_DECODE(attention_decode_int4_h2, 2, KV_INT4, unsigned char)
ATTENTION_DECODE(attention_decode_int4_h4, 4, KV_INT4, unsigned char)
ATTENTION_DECODE(attention_decode_int4_h8, 8, KV_INT4, unsigned char)
ATTENTION_DECODE(attention_decode_fp8_h1, 1, KV_FP8, unsigned char)
ATTENTION_DECODE(attention_decode_fp8_h2, 2, KV_FP8, unsigned char)
ATTENTION_DECODE(attention_decode_fp8_h4, 4, KV_FP8, unsigned char)
ATTENTION_DECODE(attention_decode_fp8_h8, 8, KV_FP8, unsigned char)

// tiles[2i], tiles[2i+1]: first flat row and count (≤ PREFILL_TILE) of tile i; its tokens
// are consecutive positions of one sequence. Dynamic shared memory:
// (32·(head_dim+1) + 32·head_dim + PREFILL_TILE·head_dim) floats.
// grid: (tiles, heads); block: ATTN_THREADS. KV as decode_attention's.
template <int KV>
__device__ __forceinline__ void prefill_attention(
    const elem* __restrict__ q, const void* __restrict__ k_store,
    const void* __restrict__ v_store, elem* __restrict__ out, const int* __restrict__ tiles,
    const int* __restrict__ token_seq, const int* __restrict__ token_pos,
    const int* __restrict__ block_tables, int max_blocks_per_seq, int block_size, int num_heads,
    int num_kv_heads, int head_dim, float scale) {
    kernel_entry();
    const elem* __restrict__ k_cache = static_cast<const elem*>(k_store);
    const elem* __restrict__ v_cache = static_cast<const elem*>(v_store);
    extern __shared__ float shared[];
    const int k_stride = head_dim + 1;  // padded: lanes reading one column of 32 rows
    float* k_s = shared;                // [32][head_dim + 1]
    float* v_s = k_s + 32 * k_stride;   // [32][head_dim]
    float* q_s = v_s + 32 * head_dim;   // [PREFILL_TILE][head_dim]

    const int first = tiles[2 * blockIdx.x], count = tiles[2 * blockIdx.x + 1];
    const int head = blockIdx.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int kv_width = num_kv_heads * head_dim;
    const int* table = block_tables + (size_t)token_seq[first] * max_blocks_per_seq;
    const int first_pos = token_pos[first];
    const int visible = first_pos + count;  // keys the tile's last query sees

    for (int i = threadIdx.x; i < PREFILL_TILE * head_dim; i += blockDim.x) {
        const int qi = i / head_dim, d = i % head_dim;
        q_s[i] = qi < count ? to_f32(q[((size_t)(first + qi) * num_heads + head) * head_dim + d]) * scale
                            : 0.0f;
    }

    float acc[PREFILL_QUERIES_PER_WARP][PREFILL_MAX_DIMS_PER_LANE];
    float running_max[PREFILL_QUERIES_PER_WARP], running_sum[PREFILL_QUERIES_PER_WARP];
#pragma unroll
    for (int qi = 0; qi < PREFILL_QUERIES_PER_WARP; qi++) {
        running_max[qi] = NEG_INFINITY;
        running_sum[qi] = 0.0f;
#pragma unroll
        for (int j = 0; j < PREFILL_MAX_DIMS_PER_LANE; j++) acc[qi][j] = 0.0f;
    }

    for (int base = 0; base < visible; base += 32) {
        const int keys = min(32, visible - base);
        __syncthreads();  // the previous chunk is consumed (and q_s is written)
        if constexpr (KV != KV_ELEM) {
            constexpr int BITS = KV_BITS(KV);
            // Each key's head offset and (scale, zero) of K and V first, then its values.
            __shared__ size_t head_at_s[32];
            __shared__ float scale_zero_s[32][4];
            const unsigned char* k_bytes = static_cast<const unsigned char*>(k_store);
            const unsigned char* v_bytes = static_cast<const unsigned char*>(v_store);
            stage_key_heads(k_bytes, v_bytes, table, base, keys, block_size, num_kv_heads, kv_head,
                            head_dim, BITS, head_at_s, scale_zero_s);
            __syncthreads();
            for (int i = threadIdx.x; i < keys * head_dim; i += blockDim.x) {
                const int kk = i / head_dim, d = i % head_dim;
                const size_t at = head_at_s[kk];
                const float* sz = scale_zero_s[kk];
                k_s[kk * k_stride + d] = kv_value<KV>(kv_level_at<BITS>(k_bytes + at, d), sz[0], sz[1]);
                v_s[kk * head_dim + d] = kv_value<KV>(kv_level_at<BITS>(v_bytes + at, d), sz[2], sz[3]);
            }
        } else {
            for (int i = threadIdx.x; i < keys * head_dim; i += blockDim.x) {
                const int kk = i / head_dim, d = i % head_dim;
                const size_t row = cache_row(table, base + kk, block_size);
                const size_t at = row * kv_width + (size_t)kv_head * head_dim + d;
                k_s[kk * k_stride + d] = to_f32(k_cache[at]);
                v_s[kk * head_dim + d] = to_f32(v_cache[at]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int qi = 0; qi < PREFILL_QUERIES_PER_WARP; qi++) {
            const int query = warp * PREFILL_QUERIES_PER_WARP + qi;
            if (query >= count) break;  // uniform across the warp
            const int pos = first_pos + query;
            const int key = base + lane;
            const bool valid = lane < keys && key <= pos;
            float score = NEG_INFINITY;
            if (valid) {
                float dot = 0.0f;
                const float* qv = q_s + query * head_dim;
                const float* kv = k_s + lane * k_stride;
                for (int d = 0; d < head_dim; d++) dot += qv[d] * kv[d];
                score = dot;
            }
            const float chunk_max = warp_max(score);
            if (chunk_max == NEG_INFINITY) continue;  // every key of the chunk is in its future
            const float new_max = fmaxf(running_max[qi], chunk_max);
            const float correction = expf(running_max[qi] - new_max);
            const float p = valid ? expf(score - new_max) : 0.0f;
            running_sum[qi] = running_sum[qi] * correction + warp_sum(p);
            running_max[qi] = new_max;
#pragma unroll
            for (int j = 0; j < PREFILL_MAX_DIMS_PER_LANE; j++) acc[qi][j] *= correction;
            for (int kk = 0; kk < keys; kk++) {
                const float pk = __shfl_sync(0xffffffffu, p, kk);
#pragma unroll
                for (int j = 0; j < PREFILL_MAX_DIMS_PER_LANE; j++) {
                    const int d = lane + 32 * j;
                    if (d < head_dim) acc[qi][j] += pk * v_s[kk * head_dim + d];
                }
            }
        }
    }
#pragma unroll
    for (int qi = 0; qi < PREFILL_QUERIES_PER_WARP; qi++) {
        const int query = warp * PREFILL_QUERIES_PER_WARP + qi;
        if (query >= count) break;
        elem* o = out + ((size_t)(first + query) * num_heads + head) * head_dim;
#pragma unroll
        for (int j = 0; j < PREFILL_MAX_DIMS_PER_LANE; j++) {
            const int d = lane + 32 * j;
            if (d < head_dim) o[d] = from_f32<elem>(acc[qi][j] / running_sum[qi]);
        }
    }
}

#define ATTENTION_PREFILL(NAME, FORMAT, CACHE)                                                   \
    extern "C" __global__ void NAME(                                                             \
        const elem* __restrict__ q, const CACHE* __restrict__ k_cache,                           \
        const CACHE* __restrict__ v_cache, elem* __restrict__ out, const int* __restrict__ tiles, \
        const int* __restrict__ token_seq, const int* __restrict__ token_pos,                    \
        const int* __restrict__ block_tables, int max_blocks_per_seq, int block_size,            \
        int num_heads, int num_kv_heads, int head_dim, float scale) {                            \
        prefill_attention<FORMAT>(q, k_cache, v_cache, out, tiles, token_seq, token_pos,           \
                                block_tables, max_blocks_per_seq, block_size, num_heads,         \
                                num_kv_heads, head_dim, scale);                                  \
    }
ATTENTION_PREFILL(attention_prefill, KV_ELEM, elem)
ATTENTION_PREFILL(attention_prefill_int8, KV_INT8, unsigned char)
ATTENTION_PREFILL(attention_prefill_int4, KV_INT4, unsigned char)
ATTENTION_PREFILL(attention_prefill_fp8, KV_FP8, unsigned char)
