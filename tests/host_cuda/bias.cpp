// The projection-bias kernels (kernels/bias.cu) run on the host by host_cuda.h, with f32
// activations or, built with -DCP_ACT_BF16, bf16 ones, launched as `Gpu::bias_*` launches
// them: the bias added to every row, then its gradient as the column sums of dy.
//
//   bias ROWS WIDTH OFFSET INPUT OUTPUT
//
// INPUT holds y [ROWS, WIDTH] (activations), b [WIDTH] (f32), dy [ROWS, WIDTH]
// (activations), db [WIDTH] (f32, the gradient the backward adds to); activations are f32 or
// bf16 bits as u16, little-endian. OUTPUT receives y with the bias added, then db. Every
// buffer starts OFFSET elements past a 16-byte boundary.
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/bias.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s ROWS WIDTH OFFSET INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    int rows = std::atoi(argv[1]), width = std::atoi(argv[2]), offset = std::atoi(argv[3]);
    long long n = (long long)rows * width;
    cp_buffer<act_t> y(n, offset), dy(n, offset);
    cp_buffer<float> b(width, offset), db(width, offset);
    std::ifstream in(argv[4], std::ios::binary);
    cp_read(in, y.data, n), cp_read(in, b.data, width);
    cp_read(in, dy.data, n), cp_read(in, db.data, width);
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the shape needs\n", argv[4]);
        return 1;
    }
    // Fewer blocks than elements: the grid-stride loop takes the rest.
    cp_launch({2, 1, 1}, 256, [&] { bias_add(y.data, b.data, rows, width); });
    // Fewer row groups than rows need (the GPU caps them at the grid's y limit): every block
    // takes every third group, as blocks past that limit do.
    const int rows_per_block = 16;
    unsigned row_groups = (unsigned)((rows + rows_per_block - 1) / rows_per_block);
    row_groups = row_groups < 3 ? row_groups : 3;
    cp_launch({(unsigned)((width + 255) / 256), row_groups, 1}, 256,
              [&] { bias_backward(db.data, dy.data, rows, width, rows_per_block); });
    std::ofstream o(argv[5], std::ios::binary);
    cp_write(o, y.data, n), cp_write(o, db.data, width);
    return o ? 0 : 1;
}
