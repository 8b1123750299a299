// The bf16 flash-attention path of the CUDA backend, run on the host by host_cuda.h: the same
// kernels from kernels/*.cu in the same order as `Gpu::flash_attention_forward` and
// `flash_attention_backward` launch them (flash forward; attn_delta; flash backward into a
// zeroed f32 dQ; cast_to_act).
//
//   flash_attention HEAD_DIM BATCH SEQ HEADS KV_HEADS LDMATRIX SHARED_FWD SHARED_BWD INPUT OUTPUT
//
// LDMATRIX 1 runs the kernels that load fragments with ldmatrix (flash_*_ldsm_D), 0 the others.
// SHARED_FWD and SHARED_BWD are the bytes of dynamic shared memory the backend launches the
// forward and the backward with (`ops::flash_shared_bytes`); the kernels abort if they need
// more.
// INPUT holds q, dO [batch * seq, heads * head_dim] and k, v [batch * seq, kv_heads *
// head_dim] as bf16 bits (u16, little-endian) in the order q, k, v, dO. OUTPUT receives out,
// dq [batch * seq, heads * head_dim], dk, dv as bf16 bits, then lse and delta [batch, heads,
// seq] as f32.
#define CP_ACT_BF16 1
#include "host_cuda.h"
#include "../../kernels/common.cuh"
#include "../../kernels/attention.cu"
#include "../../kernels/elementwise.cu"
#include "../../kernels/flash_attention.cu"

#include <cstdio>
#include <cstdlib>
#include <fstream>

// The bytes of dynamic shared memory each launch gets: the forward's, then the backward's.
struct shared_sizes {
    std::size_t forward, backward;
};

template <int D, bool LDSM>
static int run(int batch, int seq, int heads, int kv_heads, shared_sizes shared,
               const char* input, const char* output) {
    long long n = (long long)batch * seq, w = (long long)heads * D, kvw = (long long)kv_heads * D;
    long long rows = (long long)batch * heads * seq;
    std::vector<act_t> q(n * w), k(n * kvw), v(n * kvw), d_out(n * w);
    std::ifstream in(input, std::ios::binary);
    for (auto* t : {&q, &k, &v, &d_out}) cp_read(in, t->data(), (long long)t->size());
    if (!in) {
        std::fprintf(stderr, "%s: shorter than the shape needs\n", input);
        return 1;
    }
    std::vector<act_t> out(n * w), dq(n * w), dk(n * kvw), dv(n * kvw);
    std::vector<float> lse(rows), delta(rows), dq_acc(n * w, 0.0f);
    float scale = 1.0f / std::sqrt((float)D);
    unsigned tiles = (unsigned)((seq + FA_ROWS - 1) / FA_ROWS);
    cp_launch({tiles, (unsigned)heads, (unsigned)batch}, FA_THREADS, [&] {
        fa_forward<D, LDSM>(out.data(), lse.data(), q.data(), k.data(), v.data(), seq, heads,
                       kv_heads, scale);
    }, shared.forward);
    cp_launch({4, 1, 1}, 128, [&] {
        attn_delta(delta.data(), d_out.data(), out.data(), batch, heads, seq, D);
    });
    cp_launch({tiles, (unsigned)kv_heads, (unsigned)batch}, FA_THREADS, [&] {
        fa_backward<D, LDSM>(dq_acc.data(), dk.data(), dv.data(), q.data(), k.data(), v.data(),
                               d_out.data(), lse.data(), delta.data(), seq, heads, kv_heads, scale);
    }, shared.backward);
    cp_launch({4, 1, 1}, 128, [&] { cast_to_act(dq.data(), dq_acc.data(), n * w); });
    std::ofstream o(output, std::ios::binary);
    for (auto* t : {&out, &dq, &dk, &dv}) cp_write(o, t->data(), (long long)t->size());
    cp_write(o, lse.data(), rows), cp_write(o, delta.data(), rows);
    return o ? 0 : 1;
}

template <bool LDSM>
static int run_dim(int hd, int b, int t, int h, int kv, shared_sizes shared, const char* input,
                   const char* output) {
    switch (hd) {
        case 16: return run<16, LDSM>(b, t, h, kv, shared, input, output);
        case 32: return run<32, LDSM>(b, t, h, kv, shared, input, output);
        case 64: return run<64, LDSM>(b, t, h, kv, shared, input, output);
        case 128: return run<128, LDSM>(b, t, h, kv, shared, input, output);
        default: std::fprintf(stderr, "no flash kernels for head dimension %d\n", hd); return 2;
    }
}

int main(int argc, char** argv) {
    if (argc != 11) {
        std::fprintf(stderr,
                     "usage: %s HEAD_DIM BATCH SEQ HEADS KV_HEADS LDMATRIX SHARED_FWD SHARED_BWD "
                     "INPUT OUTPUT\n",
                     argv[0]);
        return 2;
    }
    int hd = std::atoi(argv[1]), b = std::atoi(argv[2]), t = std::atoi(argv[3]);
    int h = std::atoi(argv[4]), kv = std::atoi(argv[5]);
    shared_sizes shared = {(std::size_t)std::atoll(argv[7]), (std::size_t)std::atoll(argv[8])};
    if (std::atoi(argv[6])) return run_dim<true>(hd, b, t, h, kv, shared, argv[9], argv[10]);
    return run_dim<false>(hd, b, t, h, kv, shared, argv[9], argv[10]);
}
