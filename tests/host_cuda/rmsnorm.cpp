// The RMSNorm kernels (kernels/rmsnorm.cu) run on the host by host_cuda.h, with f32
// activations or, built with -DCP_ACT_BF16, bf16 ones, launched as `Gpu::rmsnorm_*` launches
// them: forward, apply (the forward again from the kept 1/rms), then the backward (weights,
// then input).
//
//   rmsnorm ROWS H OFFSET INPUT OUTPUT
//
// INPUT holds x [ROWS, H] (activations), w [H] (f32), dy [ROWS, H] (activations), dw [H]
// (f32, the gradient the backward adds to); activations are f32 or bf16 bits as u16,
// little-endian. OUTPUT receives out, rstd (f32), the applied out, dx, dw. Every buffer starts
// OFFSET elements past a 16-byte boundary (1 takes the kernels' unaligned paths).
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/rmsnorm.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s ROWS H OFFSET INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    int rows = std::atoi(argv[1]), h = std::atoi(argv[2]), offset = std::atoi(argv[3]);
    long long n = (long long)rows * h;
    cp_buffer<act_t> x(n, offset), dy(n, offset), out(n, offset), applied(n, offset);
    cp_buffer<float> w(h, offset), dw(h, offset), rstd(rows, offset);
    std::ifstream in(argv[4], std::ios::binary);
    cp_read(in, x.data, n), cp_read(in, w.data, h);
    cp_read(in, dy.data, n), cp_read(in, dw.data, h);
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the shape needs\n", argv[4]);
        return 1;
    }
    unsigned row_blocks = (unsigned)((rows + CP_RMS_ROWS - 1) / CP_RMS_ROWS);
    cp_launch({row_blocks, 1, 1}, 256,
              [&] { rmsnorm_forward(out.data, rstd.data, x.data, w.data, rows, h, 1e-5f); });
    cp_launch({row_blocks, 1, 1}, 256,
              [&] { rmsnorm_apply(applied.data, rstd.data, x.data, w.data, rows, h); });
    // Fewer row groups than rows need (the GPU caps them at the grid's y limit): every block
    // takes every third group, as blocks past that limit do.
    const int rows_per_block = 16;
    unsigned row_groups = (unsigned)((rows + rows_per_block - 1) / rows_per_block);
    row_groups = row_groups < 3 ? row_groups : 3;
    cp_launch({(unsigned)((h + 255) / 256), row_groups, 1}, 256, [&] {
        rmsnorm_backward_weight(dw.data, dy.data, x.data, rstd.data, rows, h, rows_per_block);
    });
    cp_launch({row_blocks, 1, 1}, 256,
              [&] { rmsnorm_backward_input(dy.data, x.data, w.data, rstd.data, rows, h); });
    std::ofstream o(argv[5], std::ios::binary);
    cp_write(o, out.data, n), cp_write(o, rstd.data, rows), cp_write(o, applied.data, n);
    cp_write(o, dy.data, n), cp_write(o, dw.data, h);
    return o ? 0 : 1;
}
