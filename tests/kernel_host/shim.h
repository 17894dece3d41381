// Runs kernels/*.cu on CPU threads, as written: one std::thread per CUDA thread, one block
// at a time; `__shared__` variables are function statics (shared by the block's threads),
// __syncthreads a barrier over the block's threads still running, warp shuffles an exchange
// through memory between two barriers of the warp. Blocks run one after another, so what
// one block writes is visible to the next (the order a GPU may also choose). Dynamic shared
// memory (`extern __shared__`) is `emu_dynamic_shared`: the tests rewrite the declaration.
// Not emulated: tensor-core `asm` (attention_mma.cu), texture and warp-vote intrinsics.
#pragma once
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
#define __align__(n) alignas(n)

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
