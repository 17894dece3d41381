// Runs one kernel of kernels/*.cu on CPU threads (see shim.h) for tests/kernels_on_cpu.rs.
// Built from a source the test writes: shim.h, the kernel files (dynamic shared memory
// rewritten), then this file. Input, little-endian: the kernel's name (u32 length, bytes);
// grid x, y, z and block x (u32 each); the buffers (u32 count; each a u64 length and its
// bytes); the arguments (u32 count; each a u8 kind — 0 buffer index as i64, -1 for null;
// 1 i32; 2 i64; 3 u64; 4 f32 — and 8 bytes). Writes every buffer, in order, to OUTPUT.
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

struct Args {
    std::vector<std::vector<unsigned char>>* buffers;
    std::vector<std::pair<uint8_t, uint64_t>> values;

    template <typename T>
    T ptr(size_t i) const {
        const int64_t index = (int64_t)values.at(i).second;
        return index < 0 ? nullptr : reinterpret_cast<T>(buffers->at(index).data());
    }
    int i32(size_t i) const { return (int)(int64_t)values.at(i).second; }
    long long i64(size_t i) const { return (long long)values.at(i).second; }
    unsigned long long u64(size_t i) const { return values.at(i).second; }
    float f32(size_t i) const {
        const uint32_t bits = (uint32_t)values.at(i).second;
        float x;
        std::memcpy(&x, &bits, 4);
        return x;
    }
};

static const std::map<std::string, std::function<void(const Args&)>> KERNELS = {
    {"embedding",
     [](const Args& a) { embedding(a.ptr<const int*>(0), a.ptr<const elem*>(1), a.ptr<float*>(2), a.i32(3)); }},
    {"add_rms_norm",
     [](const Args& a) {
         add_rms_norm(a.ptr<float*>(0), a.ptr<const elem*>(1), a.ptr<const int*>(2),
                      a.ptr<const elem*>(3), a.ptr<elem*>(4), a.i32(5), a.f32(6));
     }},
    {"silu_mul",
     [](const Args& a) { silu_mul(a.ptr<const elem*>(0), a.ptr<elem*>(1), a.i32(2), a.i32(3)); }},
    {"gemv_elem",
     [](const Args& a) {
         gemv_elem(a.ptr<const elem*>(0), a.ptr<const elem*>(1), a.ptr<const elem*>(2),
                   a.ptr<elem*>(3), a.i32(4), a.i32(5), a.i32(6));
     }},
    {"gemv_f32",
     [](const Args& a) {
         gemv_f32(a.ptr<const elem*>(0), a.ptr<const elem*>(1), a.ptr<const elem*>(2),
                  a.ptr<float*>(3), a.i32(4), a.i32(5), a.i32(6));
     }},
    {"gemv_split_k",
     [](const Args& a) {
         gemv_split_k(a.ptr<const elem*>(0), a.ptr<const elem*>(1), a.ptr<const elem*>(2),
                      a.ptr<elem*>(3), a.ptr<float*>(4), a.ptr<int*>(5), a.i32(6), a.i32(7),
                      a.i32(8));
     }},
    {"gemv_swiglu",
     [](const Args& a) {
         gemv_swiglu(a.ptr<const elem*>(0), a.ptr<const elem*>(1), a.ptr<elem*>(2), a.i32(3),
                     a.i32(4), a.i32(5));
     }},
    {"gemv_w4",
     [](const Args& a) {
         gemv_w4(a.ptr<const int4*>(0), a.ptr<const unsigned int*>(1), a.ptr<const elem*>(2),
                 a.ptr<const elem*>(3), a.ptr<elem*>(4), a.i32(5), a.i32(6), a.i32(7), a.i32(8));
     }},
    {"gemv_w8",
     [](const Args& a) {
         gemv_w8(a.ptr<const int4*>(0), a.ptr<const float*>(1), a.ptr<const elem*>(2),
                 a.ptr<const elem*>(3), a.ptr<elem*>(4), a.i32(5), a.i32(6), a.i32(7));
     }},
    {"gemv_w4_swiglu",
     [](const Args& a) {
         gemv_w4_swiglu(a.ptr<const int4*>(0), a.ptr<const unsigned int*>(1), a.ptr<const elem*>(2),
                        a.ptr<elem*>(3), a.i32(4), a.i32(5), a.i32(6), a.i32(7));
     }},
    {"gemv_w8_swiglu",
     [](const Args& a) {
         gemv_w8_swiglu(a.ptr<const int4*>(0), a.ptr<const float*>(1), a.ptr<const elem*>(2),
                        a.ptr<elem*>(3), a.i32(4), a.i32(5), a.i32(6));
     }},
    {"dequant_w4",
     [](const Args& a) {
         dequant_w4(a.ptr<const int4*>(0), a.ptr<const unsigned int*>(1), a.ptr<elem*>(2), a.i32(3),
                    a.i32(4));
     }},
    {"dequant_w8",
     [](const Args& a) {
         dequant_w8(a.ptr<const int4*>(0), a.ptr<const float*>(1), a.ptr<elem*>(2), a.i32(3));
     }},
    {"gemv_fp8_mma",
     [](const Args& a) {
         gemv_fp8_mma(a.ptr<const unsigned char*>(0), a.ptr<const float*>(1),
                      a.ptr<const unsigned char*>(2), a.ptr<const float*>(3), a.ptr<const elem*>(4),
                      a.ptr<elem*>(5), a.i32(6), a.i32(7), a.i32(8));
     }},
    {"quantize_rows_e4m3_bytes",
     [](const Args& a) {
         quantize_rows_e4m3_bytes(a.ptr<const elem*>(0), a.ptr<unsigned char*>(1), a.ptr<float*>(2),
                                  a.i32(3));
     }},
    {"quantize_rows_e4m3",
     [](const Args& a) {
         quantize_rows_e4m3(a.ptr<const elem*>(0), a.ptr<elem*>(1), a.ptr<float*>(2), a.i32(3));
     }},
    {"gemv_fp8",
     [](const Args& a) {
         gemv_fp8(a.ptr<const int4*>(0), a.ptr<const float*>(1), a.ptr<const elem*>(2),
                  a.ptr<const float*>(3), a.ptr<const elem*>(4), a.ptr<elem*>(5), a.i32(6), a.i32(7),
                  a.i32(8));
     }},
    {"dequant_fp8",
     [](const Args& a) { dequant_fp8(a.ptr<const int4*>(0), a.ptr<elem*>(1), a.i32(2)); }},
    {"fp8_scale",
     [](const Args& a) {
         fp8_scale(a.ptr<elem*>(0), a.ptr<const float*>(1), a.ptr<const float*>(2),
                   a.ptr<const elem*>(3), a.i32(4));
     }},
    {"rope_write_kv",
     [](const Args& a) {
         rope_write_kv(a.ptr<const elem*>(0), a.ptr<const elem*>(1), a.ptr<elem*>(2),
                       a.ptr<void*>(3), a.ptr<void*>(4), a.ptr<const int*>(5),
                       a.ptr<const float*>(6), a.i32(7), a.i32(8), a.i32(9), a.i32(10),
                       a.i32(11), a.i32(12), a.i32(13));
     }},
    {"gemv_qkv_rope",
     [](const Args& a) {
         gemv_qkv_rope(a.ptr<const elem*>(0), a.ptr<const elem*>(1), a.ptr<const elem*>(2),
                       a.ptr<elem*>(3), a.ptr<elem*>(4), a.ptr<elem*>(5), a.ptr<const int*>(6),
                       a.ptr<const float*>(7), a.i32(8), a.i32(9), a.i32(10), a.i32(11),
                       a.i32(12), a.i32(13), a.i32(14), a.i32(15));
     }},
#define DECODE_ENTRY(NAME, CACHE)                                                                \
    {#NAME, [](const Args& a) {                                                                    \
         NAME(a.ptr<const elem*>(0), a.ptr<const CACHE*>(1), a.ptr<const CACHE*>(2),               \
              a.ptr<elem*>(3), a.ptr<float*>(4), a.ptr<int*>(5), a.ptr<const int*>(6),             \
              a.ptr<const int*>(7), a.ptr<const int*>(8), a.ptr<const int*>(9), a.i32(10),         \
              a.i32(11), a.i32(12), a.i32(13), a.i32(14), a.f32(15), a.i32(16), a.i32(17));        \
     }}
    DECODE_ENTRY(attention_decode_h1, elem),
    DECODE_ENTRY(attention_decode_h2, elem),
    DECODE_ENTRY(attention_decode_h4, elem),
    DECODE_ENTRY(attention_decode_h8, elem),
    DECODE_ENTRY(attention_decode_int8_h1, unsigned char),
    DECODE_ENTRY(attention_decode_int8_h2, unsigned char),
    DECODE_ENTRY(attention_decode_int8_h4, unsigned char),
    DECODE_ENTRY(attention_decode_int8_h8, unsigned char),
    DECODE_ENTRY(attention_decode_int4_h1, unsigned char),
    DECODE_ENTRY(attention_decode_int4_h2, unsigned char),
    DECODE_ENTRY(attention_decode_int4_h4, unsigned char),
    DECODE_ENTRY(attention_decode_int4_h8, unsigned char),
    DECODE_ENTRY(attention_decode_fp8_h1, unsigned char),
    DECODE_ENTRY(attention_decode_fp8_h2, unsigned char),
    DECODE_ENTRY(attention_decode_fp8_h4, unsigned char),
    DECODE_ENTRY(attention_decode_fp8_h8, unsigned char),
#define PREFILL_ENTRY(NAME, CACHE)                                                                 \
    {#NAME, [](const Args& a) {                                                                    \
         NAME(a.ptr<const elem*>(0), a.ptr<const CACHE*>(1), a.ptr<const CACHE*>(2),               \
              a.ptr<elem*>(3), a.ptr<const int*>(4), a.ptr<const int*>(5), a.ptr<const int*>(6),   \
              a.ptr<const int*>(7), a.i32(8), a.i32(9), a.i32(10), a.i32(11), a.i32(12),           \
              a.f32(13));                                                                          \
     }}
    PREFILL_ENTRY(attention_prefill, elem),
    PREFILL_ENTRY(attention_prefill_int8, unsigned char),
    PREFILL_ENTRY(attention_prefill_int4, unsigned char),
    PREFILL_ENTRY(attention_prefill_fp8, unsigned char),
#if defined(ELEM_BF16)
    PREFILL_ENTRY(attention_prefill_mma, elem),
    DECODE_ENTRY(attention_decode_mma, elem),
    DECODE_ENTRY(attention_decode_mma_int8, unsigned char),
    DECODE_ENTRY(attention_decode_mma_int4, unsigned char),
    DECODE_ENTRY(attention_decode_mma_fp8, unsigned char),
#endif
    // f32 → f16 bits as the KV cache's scales round (common.cuh): buffer 0 f32 values in,
    // buffer 1 u16 bits out; buffer 2 the bits back as f32.
    {"f32_to_half_bits",
     [](const Args& a) {
         const float* in = a.ptr<const float*>(0);
         unsigned short* bits = a.ptr<unsigned short*>(1);
         float* back = a.ptr<float*>(2);
         for (int i = threadIdx.x; i < a.i32(3); i += blockDim.x) {
             bits[i] = f32_to_half_bits(in[i]);
             back[i] = half_bits_to_f32(bits[i]);
         }
     }},
};

template <typename T>
static T read(FILE* file) {
    T value;
    if (std::fread(&value, sizeof(T), 1, file) != 1) {
        std::fprintf(stderr, "truncated input\n");
        std::exit(2);
    }
    return value;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    FILE* file = std::fopen(argv[1], "rb");
    if (!file) return 2;
    std::string name(read<uint32_t>(file), '\0');
    if (std::fread(name.data(), 1, name.size(), file) != name.size()) return 2;
    dim3 grid, block;
    grid.x = read<uint32_t>(file);
    grid.y = read<uint32_t>(file);
    grid.z = read<uint32_t>(file);
    block.x = read<uint32_t>(file);
    // The launch's dynamic shared memory in bytes (UINT32_MAX: not stated).
    const uint32_t dynamic_shared = read<uint32_t>(file);
    std::vector<std::vector<unsigned char>> buffers(read<uint32_t>(file));
    for (auto& buffer : buffers) {
        buffer.resize(read<uint64_t>(file));
        // An empty buffer's data() may be null, which fread and fwrite must not be given.
        if (!buffer.empty() && std::fread(buffer.data(), 1, buffer.size(), file) != buffer.size())
            return 2;
    }
    Args args{&buffers, {}};
    for (uint32_t i = read<uint32_t>(file); i > 0; --i) {
        const uint8_t kind = read<uint8_t>(file);
        args.values.emplace_back(kind, read<uint64_t>(file));
    }
    std::fclose(file);
    const auto kernel = KERNELS.find(name);
    if (kernel == KERNELS.end()) {
        std::fprintf(stderr, "unknown kernel %s\n", name.c_str());
        return 2;
    }
#if defined(__SANITIZE_ADDRESS__)
    // Past the dynamic shared memory the launch gives, the emulator's array is poisoned: a
    // kernel reading beyond what its launch asked for is caught.
    ASAN_UNPOISON_MEMORY_REGION(emu_dynamic_shared, sizeof emu_dynamic_shared);
    if (dynamic_shared < sizeof emu_dynamic_shared)
        ASAN_POISON_MEMORY_REGION(emu_dynamic_shared + dynamic_shared,
                                  sizeof emu_dynamic_shared - dynamic_shared);
#else
    (void)dynamic_shared;
#endif
    emu_launch(grid, block, [&] { kernel->second(args); });
    FILE* out = std::fopen(argv[2], "wb");
    for (const auto& buffer : buffers)
        if (!buffer.empty()) std::fwrite(buffer.data(), 1, buffer.size(), out);
    std::fclose(out);
    return 0;
}
