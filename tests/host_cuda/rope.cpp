// The rope kernel (kernels/rope.cu) run on the host by host_cuda.h, with f32 activations or,
// built with -DCP_ACT_BF16, bf16 ones.
//
//   rope ROWS WIDTH SEQ HEAD_DIM INVERSE BLOCKS INPUT OUTPUT
//
// INPUT holds the frequencies (HEAD_DIM / 2 f32), then x [ROWS, WIDTH] as activations (f32,
// or bf16 bits as u16), little-endian. The kernel runs on BLOCKS blocks of as many threads as
// `Gpu::rope` launches (fewer blocks than rows need exercise the stride over rows); OUTPUT
// receives the rotated x.
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/rope.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>

int main(int argc, char** argv) {
    if (argc != 9) {
        std::fprintf(stderr, "usage: %s ROWS WIDTH SEQ HEAD_DIM INVERSE BLOCKS INPUT OUTPUT\n",
                     argv[0]);
        return 2;
    }
    int rows = std::atoi(argv[1]), width = std::atoi(argv[2]), seq = std::atoi(argv[3]);
    int head_dim = std::atoi(argv[4]), inverse = std::atoi(argv[5]);
    unsigned blocks = (unsigned)std::atoi(argv[6]);
    int half = head_dim / 2;
    if (half < 1 || half > CP_ROPE_MAX_HALF) {
        std::fprintf(stderr, "head dimension %d out of range\n", head_dim);
        return 2;
    }
    cp_rope_freqs freqs = {};
    std::vector<act_t> x((size_t)rows * width);
    std::ifstream in(argv[7], std::ios::binary);
    cp_read(in, freqs.f, half), cp_read(in, x.data(), (long long)x.size());
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the shape needs\n", argv[7]);
        return 1;
    }
    unsigned threads = (unsigned)(256 / half * half);
    cp_launch({blocks, 1, 1}, threads,
              [&] { rope(x.data(), rows, width, seq, head_dim, freqs, inverse); });
    std::ofstream out(argv[8], std::ios::binary);
    cp_write(out, x.data(), (long long)x.size());
    return out ? 0 : 1;
}
