// Runs kernels/*.cu on CPU threads, as written: one std::thread per CUDA thread, one block
// at a time; `__shared__` variables are function statics (shared by the block's threads),
// __syncthreads a barrier over the block's threads still running, warp shuffles an exchange
// through memory between two barriers of the warp. Blocks run one after another, so what
// one block writes is visible to the next (the order a GPU may also choose). Dynamic shared
// memory (`extern __shared__`) is `emu_dynamic_shared`: the tests rewrite the declaration.
// The tensor cores' mma.m16n8k16 (bf16 in, f32 accumulated) is `emu_mma_m16n8k16_bf16`, and
// mma.m16n8k32 over E4M3 `emu_mma_m16n8k32_e4m3`: the warp's fragments exchanged through
// memory, each lane's four sums formed in k order.
// Not emulated: other inline PTX, texture and warp-vote intrinsics.
#pragma once
#define EMU_HOST 1  // kernels/*.cu take their CPU-thread variants
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
alignas(16) inline unsigned char emu_dynamic_shared[256 * 1024];

// A barrier whose threads may leave (a thread that returns from the kernel no longer
// counts, as on the GPU). State: arrived threads in the low half, expected in the high.
class EmuBarrier {
    std::atomic<unsigned long long> state_{0};
    std::atomic<unsigned> generation_{0};

    // Applies `next` to the state atomically; true when it completed a round.
    template <typename Next>
    bool update(Next next) {
        unsigned long long old = state_.load();
        for (;;) {
            unsigned arrived = (unsigned)old, expected = (unsigned)(old >> 32);
            next(arrived, expected);
            const bool complete = expected > 0 && arrived == expected;
            const unsigned long long updated =
                ((unsigned long long)expected << 32) | (complete ? 0u : arrived);
            if (state_.compare_exchange_weak(old, updated)) return complete;
        }
    }
    void release() {
        generation_.fetch_add(1);
        generation_.notify_all();
    }

   public:
    void reset(unsigned expected) { state_.store((unsigned long long)expected << 32); }
    void arrive_and_wait() {
        const unsigned generation = generation_.load();
        if (update([](unsigned& arrived, unsigned&) { ++arrived; })) {
            release();
            return;
        }
        while (generation_.load() == generation) generation_.wait(generation);
    }
    void leave() {
        if (update([](unsigned&, unsigned& expected) { --expected; })) release();
    }
};

inline EmuBarrier emu_block_barrier;
inline EmuBarrier emu_warp_barriers[32];
inline unsigned long long emu_warp_slots[32][32];

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { emu_block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barriers[threadIdx.x / 32].arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T emu_exchange(T value, unsigned source_lane) {
    static_assert(sizeof(T) <= 8, "one slot per lane");
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    std::memcpy(&emu_warp_slots[warp][lane], &value, sizeof(T));
    emu_warp_barriers[warp].arrive_and_wait();
    T out;
    std::memcpy(&out, &emu_warp_slots[warp][source_lane % 32], sizeof(T));
    emu_warp_barriers[warp].arrive_and_wait();
    return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
    return emu_exchange(value, (threadIdx.x % 32) ^ (unsigned)lane_mask);
}
template <typename T>
inline T __shfl_sync(unsigned, T value, int source_lane, int = 32) {
    return emu_exchange(value, (unsigned)source_lane);
}

// Per warp and lane: the A fragment's four registers, then B's two.
inline unsigned emu_mma_slots[32][32][6];

// c += A·B of one warp for mma.m16n8kK.row.col.f32 over BITS-bit elements (32 / BITS to a
// register, the lower k in the lower bits; K = 8 · 32 / BITS), every lane calling with its
// fragments (PTX ISA); g = lane / 4, t = lane % 4, E = 32 / BITS, H = K / 2.
// A (16×K): a0 = (g, E·t..), a1 = (g+8, E·t..), a2 = (g, H+E·t..), a3 = (g+8, H+E·t..);
// B (K×8): b0 = (k E·t.., n g), b1 = (k H+E·t.., n g); C: c0, c1 = (g, 2t..2t+1),
// c2, c3 = (g+8, 2t..). `decode` gives an element's value from its bits.
template <int BITS, typename Decode>
inline void emu_mma_m16n8(float c[4], const unsigned a[4], unsigned b0, unsigned b1, Decode decode) {
    constexpr unsigned E = 32 / BITS, K = 8 * E, H = K / 2;
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned* mine = emu_mma_slots[warp][lane];
    for (int i = 0; i < 4; i++) mine[i] = a[i];
    mine[4] = b0;
    mine[5] = b1;
    emu_warp_barriers[warp].arrive_and_wait();
    const auto element = [&](unsigned from_lane, int reg, unsigned k) {
        return decode((emu_mma_slots[warp][from_lane][reg] >> (BITS * (k % E))) & ((1u << BITS) - 1u));
    };
    const auto a_at = [&](unsigned row, unsigned k) {
        return element(row % 8 * 4 + k % H / E, (row >= 8 ? 1 : 0) + (k >= H ? 2 : 0), k);
    };
    const auto b_at = [&](unsigned k, unsigned n) { return element(n * 4 + k % H / E, k >= H ? 5 : 4, k); };
    const unsigned g = lane / 4, t = lane % 4;
    float sums[4];
    for (int i = 0; i < 4; i++) {
        const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + i % 2;
        float sum = c[i];
        for (unsigned k = 0; k < K; k++) sum += a_at(row, k) * b_at(k, col);
        sums[i] = sum;
    }
    emu_warp_barriers[warp].arrive_and_wait();
    for (int i = 0; i < 4; i++) c[i] = sums[i];
}

// mma.m16n8k16.row.col.f32.bf16.bf16.f32.
inline void emu_mma_m16n8k16_bf16(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    emu_mma_m16n8<16>(c, a, b0, b1, [](unsigned bits) {
        const unsigned widened = bits << 16;
        float x;
        std::memcpy(&x, &widened, 4);
        return x;
    });
}

// mma.m16n8k32.row.col.f32.e4m3.e4m3.f32, `decode` the kernels' own E4M3 conversion.
template <typename Decode>
inline void emu_mma_m16n8k32_e4m3(float c[4], const unsigned a[4], unsigned b0, unsigned b1,
                                  Decode decode) {
    emu_mma_m16n8<8>(c, a, b0, b1, decode);
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
inline float __int_as_float(int i) {
    float x;
    std::memcpy(&x, &i, 4);
    return x;
}
// IEEE round-to-nearest arithmetic, each operation rounded on its own: what these
// intrinsics are on the device (never fused into a multiply-add). The harness is built
// without FMA instructions, so plain operators are exactly that here.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
    return *p;
}
template <typename T>
inline T atomicAdd(T* address, T value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

// Runs `kernel()` (a call of the kernel with its arguments) over the grid.
template <typename Kernel>
inline void emu_launch(dim3 grid, dim3 block, Kernel kernel) {
    blockDim = block;
    gridDim = grid;
    const unsigned threads = block.x * block.y * block.z;
    const auto reset = [&] {
        emu_block_barrier.reset(threads);
        for (unsigned w = 0; w * 32 < threads; ++w)
            emu_warp_barriers[w].reset(threads - w * 32 < 32 ? threads - w * 32 : 32);
    };
    reset();
    std::barrier<> between_blocks(threads);
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            threadIdx.x = t % block.x;
            threadIdx.y = t / block.x % block.y;
            threadIdx.z = t / (block.x * block.y);
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx.x = x;
                        blockIdx.y = y;
                        blockIdx.z = z;
                        kernel();
                        emu_block_barrier.leave();
                        emu_warp_barriers[t / 32].leave();
                        between_blocks.arrive_and_wait();
                        if (t == 0) reset();
                        between_blocks.arrive_and_wait();
                    }
        });
    }
    for (auto& worker : workers) worker.join();
}
