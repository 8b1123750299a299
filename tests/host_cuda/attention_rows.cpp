// The row kernels of the cuBLAS attention path (attn_softmax, attn_probs, attn_dscores in
// kernels/attention.cu) run on the host by host_cuda.h, with f32 activations or, built with
// -DCP_ACT_BF16, bf16 ones, a block of THREADS threads per score row (`Gpu` launches 256;
// fewer make long rows take several strides).
//
//   attention_rows HEADS SEQ OFFSET SCALE THREADS INPUT OUTPUT
//
// INPUT holds one sequence's scaled scores and the gradient of its probabilities, each
// [HEADS * SEQ, SEQ] activations (f32, or bf16 bits as u16), then delta [HEADS * SEQ] (f32),
// little-endian; the activations start OFFSET elements past a 16-byte boundary (1 takes the
// kernels' unaligned path). OUTPUT receives attn_softmax's probabilities (activations) and
// log-sum-exps (f32), attn_probs' probabilities from those log-sum-exps, and attn_dscores'
// result from the softmax's probabilities, the gradient, delta and SCALE.
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/attention.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>

int main(int argc, char** argv) {
    if (argc != 8) {
        std::fprintf(stderr, "usage: %s HEADS SEQ OFFSET SCALE THREADS INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    int heads = std::atoi(argv[1]), seq = std::atoi(argv[2]), offset = std::atoi(argv[3]);
    float scale = std::strtof(argv[4], nullptr);
    unsigned threads = (unsigned)std::atoi(argv[5]);
    int rows = heads * seq;
    long long n = (long long)rows * seq;
    cp_buffer<act_t> softmax(n, offset), again(n, offset), grad(n, offset);
    cp_buffer<float> delta(rows, 0), lse(rows, 0);
    std::ifstream in(argv[6], std::ios::binary);
    cp_read(in, softmax.data, n), cp_read(in, grad.data, n), cp_read(in, delta.data, rows);
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the shape needs\n", argv[6]);
        return 1;
    }
    std::copy(softmax.data, softmax.data + n, again.data);
    cp_dim3 grid = {(unsigned)rows, 1, 1};
    cp_launch(grid, threads, [&] { attn_softmax(softmax.data, lse.data, seq); });
    cp_launch(grid, threads, [&] { attn_probs(again.data, lse.data, seq); });
    cp_launch(grid, threads,
              [&] { attn_dscores(grad.data, softmax.data, delta.data, seq, scale); });
    std::ofstream o(argv[7], std::ios::binary);
    cp_write(o, softmax.data, n), cp_write(o, lse.data, rows);
    cp_write(o, again.data, n), cp_write(o, grad.data, n);
    return o ? 0 : 1;
}
