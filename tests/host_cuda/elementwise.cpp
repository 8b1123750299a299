// The elementwise kernels (kernels/elementwise.cu, kernels/swiglu.cu) run on the host by
// host_cuda.h, with f32 activations or, built with -DCP_ACT_BF16, bf16 ones.
//
//   elementwise OP N OFFSET BLOCKS INPUT OUTPUT
//
// OP is add (inputs a, b; output a + b into a third buffer), add_in_place (the same into a),
// cast_to_act (x; out), swiglu_forward (gate, up; act)
// or swiglu_backward (gate, up, d_act; d_gate, d_up). INPUT holds each input's N elements in
// that order, as activations (f32, or bf16 bits as u16; cast_to_act's x is f32),
// little-endian; OUTPUT receives the outputs the same way. Every buffer starts OFFSET elements
// past a 16-byte boundary (1 takes the kernels' unaligned path), and the kernel runs on BLOCKS
// blocks of 256 threads.
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/elementwise.cu"
#include "../../kernels/swiglu.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: %s OP N OFFSET BLOCKS INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    std::string op = argv[1];
    long long n = std::atoll(argv[2]);
    int offset = std::atoi(argv[3]);
    unsigned blocks = (unsigned)std::atoi(argv[4]);
    std::ifstream in(argv[5], std::ios::binary);
    std::ofstream out(argv[6], std::ios::binary);
    auto read = [&](auto& b) { cp_read(in, b.data, n); };
    auto write = [&](const auto& b) { cp_write(out, b.data, n); };
    cp_buffer<act_t> a(n, offset), b(n, offset), c(n, offset), d(n, offset);
    cp_buffer<float> x(n, offset);
    auto launch = [&](auto kernel) { cp_launch({blocks, 1, 1}, 256, kernel); };
    if (op == "add") {
        read(a), read(b);
        launch([&] { add(c.data, a.data, b.data, n); });
        write(c);
    } else if (op == "add_in_place") {
        read(a), read(b);
        launch([&] { add(a.data, a.data, b.data, n); });
        write(a);
    } else if (op == "cast_to_act") {
        read(x);
        launch([&] { cast_to_act(a.data, x.data, n); });
        write(a);
    } else if (op == "swiglu_forward") {
        read(a), read(b);
        launch([&] { swiglu_forward(c.data, a.data, b.data, n); });
        write(c);
    } else if (op == "swiglu_backward") {
        read(a), read(b), read(c);
        launch([&] { swiglu_backward(d.data, c.data, a.data, b.data, n); });
        write(d), write(c);
    } else {
        std::fprintf(stderr, "unknown operation %s\n", op.c_str());
        return 2;
    }
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the operation needs\n", argv[5]);
        return 1;
    }
    return out ? 0 : 1;
}
