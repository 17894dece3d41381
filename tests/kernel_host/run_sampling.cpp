// Runs kernels/sampling.cu's sample_rows on CPU threads (see shim.h) for tests/sampling_kernel.rs.
// Input file, little-endian: u32 rows, stride, threads, penalized count; rows * SAMPLE_WORDS
// u32 parameters; the penalized ids; rows * stride f32 logits. Prints one chosen id per row
// (4294967295 where the kernel chose none).
#include <cstdio>
#include <vector>

#include "shim.h"
// The kernel's source as the engine compiles it (after common.cuh, as every module has it).
#include "../../kernels/common.cuh"
#include "../../kernels/sampling.cu"

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s INPUT\n", argv[0]);
        return 2;
    }
    FILE* file = std::fopen(argv[1], "rb");
    if (!file) return 2;
    unsigned int header[4];
    if (std::fread(header, 4, 4, file) != 4) return 2;
    const unsigned int rows = header[0], stride = header[1], threads = header[2];
    std::vector<unsigned int> params(rows * SAMPLE_WORDS), penalized(header[3] + 1);
    std::vector<float> logits((size_t)rows * stride);
    if (std::fread(params.data(), 4, params.size(), file) != params.size() ||
        std::fread(penalized.data(), 4, header[3], file) != header[3] ||
        std::fread(logits.data(), 4, logits.size(), file) != logits.size())
        return 2;
    std::fclose(file);
    std::vector<unsigned int> chosen(rows, 0xffffffffu);
    emu_launch(dim3{rows, 1, 1}, dim3{threads, 1, 1}, [&] {
        sample_rows(logits.data(), stride, params.data(), penalized.data(), chosen.data());
    });
    for (unsigned int id : chosen) std::printf("%u\n", id);
    return 0;
}
