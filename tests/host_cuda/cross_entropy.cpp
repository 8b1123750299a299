// The cross-entropy kernels (kernels/cross_entropy.cu) run on the host by host_cuda.h, with
// f32 activations or, built with -DCP_ACT_BF16, bf16 ones, launched as `Gpu::ce_forward` and
// `Gpu::ce_backward` launch them (a block of 256 threads per row).
//
//   cross_entropy ROWS VOCAB OFFSET SCALE INPUT OUTPUT
//
// INPUT holds logits [ROWS, VOCAB] as activations (f32, or bf16 bits as u16), then the
// targets [ROWS] as i32, little-endian; the logits start OFFSET elements past a 16-byte
// boundary (1 takes the kernels' unaligned path). OUTPUT receives each row's loss (f32) from
// ce_forward, the same from ce_backward, then the logits' gradient (activations) scaled by
// SCALE.
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/cross_entropy.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: %s ROWS VOCAB OFFSET SCALE INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    int rows = std::atoi(argv[1]), vocab = std::atoi(argv[2]), offset = std::atoi(argv[3]);
    float scale = std::strtof(argv[4], nullptr);
    long long n = (long long)rows * vocab;
    cp_buffer<act_t> logits(n, offset);
    cp_buffer<int> targets(rows, 0);
    cp_buffer<float> loss(rows, 0), backward_loss(rows, 0);
    std::ifstream in(argv[5], std::ios::binary);
    cp_read(in, logits.data, n), cp_read(in, targets.data, rows);
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the shape needs\n", argv[5]);
        return 1;
    }
    cp_launch({(unsigned)rows, 1, 1}, 256,
              [&] { ce_forward(loss.data, logits.data, targets.data, vocab); });
    cp_launch({(unsigned)rows, 1, 1}, 256,
              [&] { ce_backward(logits.data, backward_loss.data, targets.data, vocab, scale); });
    std::ofstream o(argv[6], std::ios::binary);
    cp_write(o, loss.data, rows), cp_write(o, backward_loss.data, rows);
    cp_write(o, logits.data, n);
    return o ? 0 : 1;
}
