// The optimizer kernels (kernels/optim.cu) run on the host by host_cuda.h, with f32 activations
// or, built with -DCP_ACT_BF16, bf16 ones (the type of the weights' copy they also write).
//
//   optim N FACTOR BETA1 BETA2 EPS DECAY STEP_SIZE BC2_SQRT LR INPUT OUTPUT
//
// INPUT holds w, g, m, v ([N] f32 each, little-endian). OUTPUT receives AdamW's w, m, v (f32)
// and its copy of w (activations: f32, or bf16 bits as u16), then SGD's w (f32, from the same
// inputs with learning rate LR) and its copy, then the two kernels' gradients after the
// updates (f32; cleared). Each kernel runs on 2 blocks of 256 threads, so the grid-stride loop
// takes several strides.
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/optim.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>

int main(int argc, char** argv) {
    if (argc != 12) {
        std::fprintf(stderr,
                     "usage: %s N FACTOR BETA1 BETA2 EPS DECAY STEP_SIZE BC2_SQRT LR INPUT "
                     "OUTPUT\n",
                     argv[0]);
        return 2;
    }
    long long n = std::atoll(argv[1]);
    float f[8];
    for (int i = 0; i < 8; ++i) f[i] = std::strtof(argv[2 + i], nullptr);
    float factor = f[0], beta1 = f[1], beta2 = f[2], eps = f[3], decay = f[4], step = f[5],
          bc2 = f[6], lr = f[7];
    cp_buffer<float> w(n, 0), g(n, 0), m(n, 0), v(n, 0), w_sgd(n, 0), g_sgd(n, 0);
    cp_buffer<act_t> copy(n, 0), copy_sgd(n, 0);
    std::ifstream in(argv[10], std::ios::binary);
    cp_read(in, w.data, n), cp_read(in, g.data, n), cp_read(in, m.data, n), cp_read(in, v.data, n);
    if (!in) {
        std::fprintf(stderr, "%s: shorter than 4 x N floats\n", argv[10]);
        return 1;
    }
    for (long long i = 0; i < n; ++i) w_sgd.data[i] = w.data[i], g_sgd.data[i] = g.data[i];
    cp_launch({2, 1, 1}, 256, [&] {
        adamw_update(w.data, copy.data, g.data, m.data, v.data, n, factor, beta1, beta2, eps,
                     decay, step, bc2);
    });
    cp_launch({2, 1, 1}, 256,
              [&] { sgd_update(w_sgd.data, copy_sgd.data, g_sgd.data, n, factor, lr); });
    std::ofstream o(argv[11], std::ios::binary);
    cp_write(o, w.data, n), cp_write(o, m.data, n), cp_write(o, v.data, n);
    cp_write(o, copy.data, n), cp_write(o, w_sgd.data, n), cp_write(o, copy_sgd.data, n);
    cp_write(o, g.data, n), cp_write(o, g_sgd.data, n);
    return o ? 0 : 1;
}
