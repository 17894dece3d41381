// Batched sampling: one block per row chooses that row's next token on the device, so a
// step copies back one id per sequence instead of its logits. It follows `choose` in
// src/engine/sampler.rs step for step: guard, repetition penalty, greedy argmax, then
// temperature, top-k (radix select of the k-th key), fixed-point masses, top-p (radix
// select by mass) and a draw walking the kept tokens in id order. Masses are integers and
// their sums exact, so the atomics' order cannot change a result.
//
// Each thread owns a contiguous run of ids, so "in id order" is thread order then run order.
// Only __syncthreads, shared memory and integer atomics are used (no warp shuffles): the
// host test runs this file on CPU threads as written (tests/kernel_host/).

#define SAMPLE_THREADS 512
// Words of one row's parameters (src/model/gpu.rs writes them).
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
#define SAMPLE_MASS_SCALE 1099511627776.0f  // 2^40 (MASS_SCALE in sampler.rs)

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
// the top (a radix select over weighted keys); `*above` gets the weight of greater keys.
// With unit weights and limit k it is the k-th largest key. `bucket` holds 256 values;
// `found_*` are shared.
template <typename Key, typename Weight>
__device__ __forceinline__ unsigned int radix_select(Key key_of, Weight weight_of, double limit,
                                                     unsigned int begin, unsigned int end,
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
        for (unsigned int i = begin; i < end; ++i) {
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
    __shared__ unsigned long long scratch[SAMPLE_THREADS];
    __shared__ unsigned int best_key[SAMPLE_THREADS];
    __shared__ unsigned int best_id[SAMPLE_THREADS];
    __shared__ unsigned long long bucket[256];
    __shared__ unsigned int found_prefix;
    __shared__ unsigned long long found_above;
    __shared__ int invalid;

    const unsigned int* p = params + blockIdx.x * SAMPLE_WORDS;
    if (!(p[SAMPLE_FLAGS] & SAMPLE_ACTIVE)) return;
    float* row = logits + (unsigned long long)p[SAMPLE_ROW] * stride;
    const unsigned int n = p[SAMPLE_WIDTH];
    const unsigned int t = threadIdx.x;
    const unsigned int run = (n + blockDim.x - 1) / blockDim.x;
    const unsigned int begin = t * run < n ? t * run : n;
    const unsigned int end = begin + run < n ? begin + run : n;

    // ChatGLM2's guard: a row holding NaN/Inf becomes zeros with 5e4 at id 5.
    if (p[SAMPLE_FLAGS] & SAMPLE_GUARD) {
        if (t == 0) invalid = 0;
        __syncthreads();
        bool bad = false;
        for (unsigned int i = begin; i < end; ++i) bad |= !is_finite_bits(row[i]);
        if (bad) invalid = 1;
        __syncthreads();
        if (invalid) {
            for (unsigned int i = begin; i < end; ++i) row[i] = 0.0f;
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

    // The best (scaled) value, lowest id among equals.
    // Scaled by the temperature's reciprocal, computed once on the host: a division here
    // would call IEEE division's slow path (a stack frame) from every pass.
    const float inv_temperature = __uint_as_float(p[SAMPLE_INV_TEMPERATURE]);
    const bool greedy = inv_temperature == 0.0f;
#define SCALED(i) (greedy ? row[i] : row[i] * inv_temperature)
    {
        unsigned int key = 0, id = begin;
        for (unsigned int i = begin; i < end; ++i) {
            const unsigned int k = order_key(SCALED(i));
            if (k > key || i == begin) {
                key = k;
                id = i;
            }
        }
        best_key[t] = begin < end ? key : 0u;
        best_id[t] = begin < end ? id : 0xffffffffu;
        __syncthreads();
        for (unsigned int half = blockDim.x / 2; half > 0; half >>= 1) {
            if (t < half) {
                const unsigned int ok = best_key[t + half], oi = best_id[t + half];
                if (ok > best_key[t] || (ok == best_key[t] && oi < best_id[t])) {
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
    unsigned long long above;
    unsigned int threshold = 0;
    if (top_k > 0 && top_k < n) {
        const auto one = [](unsigned int) { return 1ull; };
        threshold = radix_select(key_of, one, (double)top_k, begin, end, bucket, &found_prefix,
                                 &found_above, &above);
    }

    // Fixed-point masses of the candidates (key >= threshold) and their total.
    const float max = SCALED(top);
    const auto mass_of = [&](unsigned int i) {
        return key_of(i) >= threshold ? fixed_mass(SCALED(i), max) : 0ull;
    };
    unsigned long long own = 0;
    for (unsigned int i = begin; i < end; ++i) own += mass_of(i);
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
        cut = radix_select(key_of, mass_of, limit, begin, end, bucket, &found_prefix, &found_above,
                           &above_cut);
    }

    // Mass of the tokens at the cut that come before each thread's run.
    unsigned long long own_tied = 0;
    for (unsigned int i = begin; i < end; ++i)
        if (key_of(i) == cut) own_tied += mass_of(i);
    unsigned long long tied_total;
    const unsigned long long tied_before = block_exclusive_scan(own_tied, scratch, &tied_total);
    // The kept mass of this thread's run in id order, added to `*sum`; with `draw`, stops at
    // the first kept token that takes the sum past `target` and returns its id.
    const auto walk_kept = [&](bool draw, unsigned long long target,
                               unsigned long long* sum) -> unsigned int {
        unsigned long long tied = tied_before;
        for (unsigned int i = begin; i < end; ++i) {
            const unsigned long long m = mass_of(i);
            if (m == 0) continue;
            const unsigned int key = key_of(i);
            bool keep = key > cut;
            if (key == cut) {
                keep = !cutting || (double)(above_cut + tied) < limit;
                tied += m;
            }
            if (!keep) continue;
            *sum += m;
            if (draw && *sum > target) return i;
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
