// attn_delta (kernels/attention.cu) run on the host by host_cuda.h, with f32 activations or,
// built with -DCP_ACT_BF16, bf16 ones.
//
//   attn_delta BATCH HEADS SEQ HEAD_DIM OFFSET BLOCKS INPUT OUTPUT
//
// INPUT holds dO and O [BATCH * SEQ, HEADS * HEAD_DIM] as activations (f32, or bf16 bits as
// u16), little-endian, each starting OFFSET elements past a 16-byte boundary (1 takes the
// kernel's unaligned path); the kernel runs on BLOCKS blocks of 256 threads and OUTPUT
// receives delta [BATCH, HEADS, SEQ] as f32.
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/attention.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>

int main(int argc, char** argv) {
    if (argc != 9) {
        std::fprintf(stderr, "usage: %s BATCH HEADS SEQ HEAD_DIM OFFSET BLOCKS INPUT OUTPUT\n",
                     argv[0]);
        return 2;
    }
    long long batch = std::atoll(argv[1]);
    int heads = std::atoi(argv[2]), seq = std::atoi(argv[3]), head_dim = std::atoi(argv[4]);
    int offset = std::atoi(argv[5]);
    unsigned blocks = (unsigned)std::atoi(argv[6]);
    long long n = batch * seq * heads * head_dim, rows = batch * heads * seq;
    cp_buffer<act_t> d_out(n, offset), out(n, offset);
    cp_buffer<float> delta(rows, 0);
    std::ifstream in(argv[7], std::ios::binary);
    cp_read(in, d_out.data, n), cp_read(in, out.data, n);
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the shape needs\n", argv[7]);
        return 1;
    }
    cp_launch({blocks, 1, 1}, 256,
              [&] { attn_delta(delta.data, d_out.data, out.data, batch, heads, seq, head_dim); });
    std::ofstream o(argv[8], std::ios::binary);
    cp_write(o, delta.data, rows);
    return o ? 0 : 1;
}
