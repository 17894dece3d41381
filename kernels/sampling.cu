// Batched sampling: one block per row chooses that row's next token on the device, so a
// step copies back one id per sequence instead of its logits. It follows `choose` in
// src/sampling.rs step for step: guard, repetition penalty, greedy argmax, then
// temperature, top-k (radix select of the k-th key), fixed-point masses, top-p (radix
// select by mass) and a draw walking the kept tokens in id order. Masses are integers and
// their sums exact, so the atomics' order cannot change a result.
//
// Passes whose result does not depend on order (the guard, the argmax with its lowest-id
// tie break, the radix selects' histograms) stride over the row, so that a warp reads
// consecutive ids. The steps that need id order (the tied-mass scan and the draw) give each
// thread a contiguous run, so "in id order" is thread order then run order. With top-k on,
// the candidates (usually k of them) are first gathered into shared memory and sorted by id:
// masses, top-p and the draw then run over that short list instead of the whole row, which
// would take a dozen more passes over it. Only __syncthreads, shared memory and integer
// atomics are used (no warp shuffles): the host test runs this file on CPU threads as
// written (tests/kernel_host/).

#define SAMPLE_THREADS 512
// Words of one row's parameters (src/model/gpu/tables.rs writes them).
#define SAMPLE_WORDS 10
#define SAMPLE_ROW 0          // row of `logits`
#define SAMPLE_WIDTH 1        // ids below it may be produced
#define SAMPLE_FLAGS 2        // SAMPLE_ACTIVE | SAMPLE_GUARD
#define SAMPLE_TOP_K 3        // 0: off
#define SAMPLE_INV_TEMPERATURE 4  // f32 bits of 1 / temperature; 0: greedy
#define SAMPLE_TOP_P 5        // f32 bits; 1: off
#define SAMPLE_PENALTY 6      // f32 bits; 1: off
#define SAMPLE_UNIFORM 7      // f32 bits, the draw in [0, 1)
#define SAMPLE_PENALIZED 8    // first of the row's distinct ids in `penalized`
#define SAMPLE_PENALIZED_COUNT 9
#define SAMPLE_ACTIVE 1u
#define SAMPLE_GUARD 2u
#define SAMPLE_MASS_SCALE 1099511627776.0f  // 2^40 (MASS_SCALE in src/sampling.rs)
// Most top-k candidates kept in shared memory; a row with more (ties at the k-th key, or a
// large k) weighs its whole row instead.
#define SAMPLE_CANDIDATES 1024

__device__ __forceinline__ unsigned int order_key(float x) {
    if (x != x) return 0u;  // NaN ranks lowest
    const unsigned int bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ unsigned long long fixed_mass(float x, float max) {
    const float m = expf(x - max) * SAMPLE_MASS_SCALE;
    return m == m ? (unsigned long long)m : 0ull;  // NaN: no weight, as Rust's `as u64`
}

__device__ __forceinline__ bool is_finite_bits(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Exclusive prefix sum of one value per thread in thread order; `*total` gets the sum.
// `scratch` holds blockDim.x values.
__device__ __forceinline__ unsigned long long block_exclusive_scan(unsigned long long value,
                                                   unsigned long long* scratch,
                                                   unsigned long long* total) {
    const unsigned int t = threadIdx.x;
    scratch[t] = value;
    __syncthreads();
    for (unsigned int offset = 1; offset < blockDim.x; offset <<= 1) {
        const unsigned long long add = t >= offset ? scratch[t - offset] : 0ull;
        __syncthreads();
        scratch[t] += add;
        __syncthreads();
    }
    const unsigned long long inclusive = scratch[t];
    *total = scratch[blockDim.x - 1];
    __syncthreads();  // scratch is free again
    return inclusive - value;
}

// The largest key whose weight at or above it reaches `limit`, eight bits at a time from
// the top (a radix select over weighted keys), over indices 0..count (strided: the sums do
// not depend on order); `*above` gets the weight of greater keys. With unit weights and
// limit k it is the k-th largest key. `bucket` holds 256 values; `found_*` are shared.
template <typename Key, typename Weight>
__device__ __forceinline__ unsigned int radix_select(Key key_of, Weight weight_of, double limit,
                                                     unsigned int count,
                                                     unsigned long long* bucket,
                                                     unsigned int* found_prefix,
                                                     unsigned long long* found_above,
                                                     unsigned long long* above) {
    const unsigned int t = threadIdx.x;
    unsigned int prefix = 0;
    *above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const unsigned int mask = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
        for (unsigned int b = t; b < 256; b += blockDim.x) bucket[b] = 0;
        __syncthreads();
        for (unsigned int i = t; i < count; i += blockDim.x) {
            const unsigned int key = key_of(i);
            const unsigned long long weight = weight_of(i);
            if (weight > 0 && (key & mask) == prefix) atomicAdd(&bucket[(key >> shift) & 255u], weight);
        }
        __syncthreads();
        if (t == 0) {
            unsigned long long cumulative = *above;
            for (int b = 255; b >= 0; --b) {
                if ((double)(cumulative + bucket[b]) >= limit) {
                    *found_prefix = prefix | ((unsigned int)b << shift);
                    *found_above = cumulative;
                    break;
                }
                cumulative += bucket[b];
            }
        }
        __syncthreads();
        prefix = *found_prefix;
        *above = *found_above;
        __syncthreads();
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(float* __restrict__ logits, unsigned long long stride,
                const unsigned int* __restrict__ params, const unsigned int* __restrict__ penalized,
                unsigned int* __restrict__ chosen) {
    kernel_entry();
    __shared__ unsigned long long scratch[SAMPLE_THREADS];
    __shared__ unsigned int best_key[SAMPLE_THREADS];
    __shared__ unsigned int best_id[SAMPLE_THREADS];
    __shared__ unsigned long long bucket[256];
    __shared__ unsigned int found_prefix;
    __shared__ unsigned long long found_above;
    __shared__ int invalid;
    __shared__ unsigned int candidates[SAMPLE_CANDIDATES];
    __shared__ unsigned long long candidate_mass[SAMPLE_CANDIDATES];
    __shared__ unsigned int candidate_count;

    const unsigned int* p = params + blockIdx.x * SAMPLE_WORDS;
    if (!(p[SAMPLE_FLAGS] & SAMPLE_ACTIVE)) return;
    float* row = logits + (unsigned long long)p[SAMPLE_ROW] * stride;
    const unsigned int n = p[SAMPLE_WIDTH];
    const unsigned int t = threadIdx.x;

    // ChatGLM2's guard: a row holding NaN/Inf becomes zeros with 5e4 at id 5.
    if (p[SAMPLE_FLAGS] & SAMPLE_GUARD) {
        if (t == 0) invalid = 0;
        __syncthreads();
        bool bad = false;
        for (unsigned int i = t; i < n; i += blockDim.x) bad |= !is_finite_bits(row[i]);
        if (bad) invalid = 1;
        __syncthreads();
        if (invalid) {
            for (unsigned int i = t; i < n; i += blockDim.x) row[i] = 0.0f;
            __syncthreads();
            if (t == 0 && n > 5) row[5] = 5e4f;
        }
        __syncthreads();
    }

    // Repetition penalty over the row's distinct ids (distinct: no two threads share one).
    const float penalty = __uint_as_float(p[SAMPLE_PENALTY]);
    if (penalty != 1.0f) {
        const unsigned int* ids = penalized + p[SAMPLE_PENALIZED];
        for (unsigned int j = t; j < p[SAMPLE_PENALIZED_COUNT]; j += blockDim.x) {
            const unsigned int id = ids[j];
            if (id < n) {
                const float l = row[id];
                row[id] = l < 0.0f ? l * penalty : l / penalty;
            }
        }
        __syncthreads();
    }

    // The best (scaled) value, lowest id among equals: each thread's ids rise, so a strict
    // comparison keeps its lowest, and the reduction breaks ties by id.
    // Scaled by the temperature's reciprocal, computed once on the host: a division here
    // would call IEEE division's slow path (a stack frame) from every pass.
    const float inv_temperature = __uint_as_float(p[SAMPLE_INV_TEMPERATURE]);
    const bool greedy = inv_temperature == 0.0f;
#define SCALED(i) (greedy ? row[i] : row[i] * inv_temperature)
    {
        unsigned int key = 0, id = 0xffffffffu;
        for (unsigned int i = t; i < n; i += blockDim.x) {
            const unsigned int k = order_key(SCALED(i));
            if (k > key || id == 0xffffffffu) {
                key = k;
                id = i;
            }
        }
        best_key[t] = key;
        best_id[t] = id;
        __syncthreads();
        for (unsigned int half = blockDim.x / 2; half > 0; half >>= 1) {
            if (t < half) {
                const unsigned int ok = best_key[t + half], oi = best_id[t + half];
                const bool better = oi != 0xffffffffu &&
                    (best_id[t] == 0xffffffffu || ok > best_key[t] ||
                     (ok == best_key[t] && oi < best_id[t]));
                if (better) {
                    best_key[t] = ok;
                    best_id[t] = oi;
                }
            }
            __syncthreads();
        }
    }
    const unsigned int top = best_id[0];
    if (greedy) {
        if (t == 0) chosen[blockIdx.x] = top;
        return;
    }

    // top-k: the k-th largest key.
    const auto key_of = [&](unsigned int i) { return order_key(SCALED(i)); };
    const unsigned int top_k = p[SAMPLE_TOP_K];
    const bool top_k_on = top_k > 0 && top_k < n;
    unsigned long long above;
    unsigned int threshold = 0;
    if (top_k_on) {
        const auto one = [](unsigned int) { return 1ull; };
        threshold = radix_select(key_of, one, (double)top_k, n, bucket, &found_prefix,
                                 &found_above, &above);
    }
    const float max = SCALED(top);

    // The candidates (key >= threshold) in id order: with top-k, gathered into shared memory
    // and sorted (bitonic, padded to a power of two with ids past every row); else the row.
    bool compact = false;
    if (top_k_on) {
        if (t == 0) candidate_count = 0;
        __syncthreads();
        for (unsigned int i = t; i < n; i += blockDim.x) {
            if (key_of(i) >= threshold) {
                const unsigned int slot = atomicAdd(&candidate_count, 1u);
                if (slot < SAMPLE_CANDIDATES) candidates[slot] = i;
            }
        }
        __syncthreads();
        compact = candidate_count <= SAMPLE_CANDIDATES;
        if (compact) {
            unsigned int size = 1;
            while (size < candidate_count) size <<= 1;
            for (unsigned int j = candidate_count + t; j < size; j += blockDim.x)
                candidates[j] = 0xffffffffu;
            __syncthreads();
            for (unsigned int k = 2; k <= size; k <<= 1) {
                for (unsigned int j = k >> 1; j > 0; j >>= 1) {
                    for (unsigned int i = t; i < size; i += blockDim.x) {
                        const unsigned int partner = i ^ j;
                        if (partner > i) {
                            const unsigned int a = candidates[i], b = candidates[partner];
                            if ((a > b) == ((i & k) == 0)) {
                                candidates[i] = b;
                                candidates[partner] = a;
                            }
                        }
                    }
                    __syncthreads();
                }
            }
            for (unsigned int j = t; j < candidate_count; j += blockDim.x)
                candidate_mass[j] = fixed_mass(SCALED(candidates[j]), max);
            __syncthreads();
        }
    }
    // From here on, index j of the candidates: an id of the row, or of the gathered list.
    const unsigned int count = compact ? candidate_count : n;
    const auto id_at = [&](unsigned int j) { return compact ? candidates[j] : j; };
    const auto key_at = [&](unsigned int j) { return key_of(id_at(j)); };
    // Fixed-point masses of the candidates (key >= threshold) and their total.
    const auto mass_at = [&](unsigned int j) {
        if (compact) return candidate_mass[j];
        return key_of(j) >= threshold ? fixed_mass(SCALED(j), max) : 0ull;
    };
    const unsigned int run = (count + blockDim.x - 1) / blockDim.x;
    const unsigned int begin = t * run < count ? t * run : count;
    const unsigned int end = begin + run < count ? begin + run : count;
    unsigned long long own = 0;
    for (unsigned int j = begin; j < end; ++j) own += mass_at(j);
    unsigned long long total;
    block_exclusive_scan(own, scratch, &total);
    if (total == 0) {  // an infinite or NaN best: nothing to weigh
        if (t == 0) chosen[blockIdx.x] = top;
        return;
    }

    // top-p: the cut is the largest key whose mass at or above it reaches the limit; keys
    // above it stay, and of the tokens at it those whose mass ranked before stays below.
    const float top_p = __uint_as_float(p[SAMPLE_TOP_P]);
    const bool cutting = top_p < 1.0f;  // off: every weighed token stays
    unsigned int cut = 0;
    unsigned long long above_cut = 0;
    double limit = 0.0;
    if (cutting) {
        limit = (double)top_p * (double)total;
        cut = radix_select(key_at, mass_at, limit, count, bucket, &found_prefix, &found_above,
                           &above_cut);
    }

    // Mass of the tokens at the cut that come before each thread's run.
    unsigned long long own_tied = 0;
    for (unsigned int j = begin; j < end; ++j)
        if (key_at(j) == cut) own_tied += mass_at(j);
    unsigned long long tied_total;
    const unsigned long long tied_before = block_exclusive_scan(own_tied, scratch, &tied_total);
    // The kept mass of this thread's run in id order, added to `*sum`; with `draw`, stops at
    // the first kept token that takes the sum past `target` and returns its id.
    const auto walk_kept = [&](bool draw, unsigned long long target,
                               unsigned long long* sum) -> unsigned int {
        unsigned long long tied = tied_before;
        for (unsigned int j = begin; j < end; ++j) {
            const unsigned long long m = mass_at(j);
            if (m == 0) continue;
            const unsigned int key = key_at(j);
            bool keep = key > cut;
            if (key == cut) {
                keep = !cutting || (double)(above_cut + tied) < limit;
                tied += m;
            }
            if (!keep) continue;
            *sum += m;
            if (draw && *sum > target) return id_at(j);
        }
        return 0xffffffffu;
    };

    // Kept mass of each run, in id order, then the draw.
    unsigned long long own_kept = 0;
    walk_kept(false, 0, &own_kept);
    unsigned long long kept_total;
    const unsigned long long kept_before = block_exclusive_scan(own_kept, scratch, &kept_total);
    unsigned long long target =
        (unsigned long long)((double)__uint_as_float(p[SAMPLE_UNIFORM]) * (double)kept_total);
    if (target >= kept_total) target = kept_total - 1;
    if (kept_before <= target && target < kept_before + own_kept) {
        unsigned long long cumulative = kept_before;
        chosen[blockIdx.x] = walk_kept(true, target, &cumulative);
    }
#undef SCALED
}
