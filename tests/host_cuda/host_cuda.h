// Runs chronospipe's CUDA kernels on the host, for checking them without a GPU: blocks run one
// after another, each block's threads as std::threads; __syncthreads is a barrier of the block,
// and warp shuffles, the tensor-core product and ldmatrix (cp_host_mma and cp_host_ldmatrix,
// which kernels/flash_attention.cu calls in place of its mma.sync and ldmatrix when
// CP_HOST_EMULATION is defined) exchange values between a warp's 32 threads through shared
// slots and a barrier of the warp; cp.async copies land when their thread waits for them
// (cp_host_cp_async). With one block at a time, __shared__ arrays can be function
// statics. Slow (a thread per CUDA thread): for small shapes.
// Activations are f32 unless the including file defines CP_ACT_BF16 first.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <istream>
#include <memory>
#include <ostream>
#include <thread>
#include <vector>

struct cp_dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local cp_dim3 threadIdx, blockIdx;
inline cp_dim3 gridDim, blockDim;

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define CP_HOST_EMULATION 1
#define __CUDA_ARCH__ 900

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;
#include <math.h>

inline std::unique_ptr<std::barrier<>> cp_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> cp_warp_barriers;
struct cp_warp_slots { float v[32]; unsigned a[32][4]; unsigned b[32][2]; const void* row[32]; };
// Two sets of slots per warp, used by turns: a lane writes its values into its warp's next
// set, meets the others at the warp's barrier and reads theirs. One barrier per exchange is
// enough because a lane can write a set again only after every lane has passed the barrier
// that follows its reads of it.
inline std::vector<cp_warp_slots> cp_slots;
inline thread_local unsigned cp_exchanges = 0;

inline void __syncthreads() { cp_block_barrier->arrive_and_wait(); }
inline int cp_lane() { return threadIdx.x & 31; }
inline int cp_warp_index() { return threadIdx.x >> 5; }
inline cp_warp_slots& cp_next_slots() {
    return cp_slots[2 * cp_warp_index() + (cp_exchanges++ & 1)];
}
inline void cp_warp_barrier() { cp_warp_barriers[cp_warp_index()]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    auto& s = cp_next_slots();
    s.v[cp_lane()] = v;
    cp_warp_barrier();
    return s.v[cp_lane() ^ mask];
}

// Kernels call this (under CP_HOST_EMULATION) before an access wider than an element: the GPU
// faults on a misaligned one, the host would not.
inline void cp_check_alignment(const void* p, std::size_t align) {
    if (reinterpret_cast<std::uintptr_t>(p) % align != 0) {
        std::fprintf(stderr, "misaligned access: %p is not %zu-byte aligned\n", p, align);
        std::abort();
    }
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

inline float cp_bf16_bits(unsigned short h) { return __uint_as_float(((unsigned)h) << 16); }

// mma.m16n8k16 .row.col f32 += bf16 x bf16 by the PTX ISA's fragment layouts:
// a: reg r, half h -> row g + 8 (r & 1), col 2t + h + 8 (r >> 1); b: reg r, half h -> k 2t + h +
// 8 r, n g; c/d: element i -> row g + 8 (i >> 1), col 2t + (i & 1); g = lane / 4, t = lane % 4.
inline void cp_host_mma(float* d, const unsigned* a, const unsigned* b) {
    auto& s = cp_next_slots();
    int lane = cp_lane();
    for (int r = 0; r < 4; ++r) s.a[lane][r] = a[r];
    for (int r = 0; r < 2; ++r) s.b[lane][r] = b[r];
    cp_warp_barrier();
    // Element k of a row or column: lane 4 x + (k % 8) / 2 holds it, in half k % 2 of a
    // register chosen by k / 8 (and for a, the row's half).
    auto half = [](unsigned reg, int k) {
        return cp_bf16_bits((unsigned short)(reg >> (16 * (k & 1))));
    };
    int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; ++k) {
            float x = half(s.a[4 * (row & 7) + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)], k);
            float y = half(s.b[4 * col + ((k & 7) >> 1)][k >> 3], k);
            acc += x * y;
        }
        d[i] = acc;
    }
}

// ldmatrix .x4 (.trans) by the PTX ISA: lanes 8i .. 8i + 7 give the row addresses of 8x8
// matrix i of 16-bit elements; lane l's register i gets matrix i's elements (l / 4, 2 (l % 4))
// and the next column, or with `trans` (2 (l % 4), l / 4) and the next row (low half first).
inline void cp_host_ldmatrix(unsigned* r, const unsigned short* row, bool trans) {
    auto& s = cp_next_slots();
    int lane = cp_lane();
    s.row[lane] = row;
    cp_warp_barrier();
    int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        auto at = [&](int rr, int cc) {
            return (unsigned)static_cast<const unsigned short*>(s.row[8 * i + rr])[cc];
        };
        unsigned lo = trans ? at(2 * t, g) : at(g, 2 * t);
        unsigned hi = trans ? at(2 * t + 1, g) : at(g, 2 * t + 1);
        r[i] = lo | (hi << 16);
    }
}

// cp.async by the PTX ISA's completion rules, at their latest: a copy lands only when its
// thread waits for its group (cp.async.wait_group N: every group but the newest N), so a
// kernel that reads shared memory before waiting, or before the barrier that follows the wait,
// reads the old contents (or races, which ThreadSanitizer reports). Copies never committed are
// never waited for, and a thread that ends with copies in flight aborts the run. Built with
// CP_ASYNC_EAGER, at their earliest: a copy lands when issued, so one issued into a buffer
// other warps still read races with those reads.
struct cp_async_copy { void* dst; const void* src; int src_bytes, bytes; };
inline thread_local std::vector<cp_async_copy> cp_async_open;
inline thread_local std::deque<std::vector<cp_async_copy>> cp_async_groups;

// Byte by byte, so that ThreadSanitizer sees every write (an inlined 16-byte memcpy escapes it).
inline void cp_async_land(const cp_async_copy& c) {
    auto* to = static_cast<volatile unsigned char*>(c.dst);
    auto* from = static_cast<const unsigned char*>(c.src);
    for (int i = 0; i < c.bytes; ++i) to[i] = i < c.src_bytes ? from[i] : 0;
}

inline void cp_host_cp_async(void* dst, const void* src, int src_bytes, int bytes) {
    cp_check_alignment(dst, bytes);
    if (src_bytes) cp_check_alignment(src, bytes);
#ifdef CP_ASYNC_EAGER
    cp_async_land({dst, src, src_bytes, bytes});
#else
    cp_async_open.push_back({dst, src, src_bytes, bytes});
#endif
}
inline void cp_host_cp_async_commit() {
    cp_async_groups.push_back(std::move(cp_async_open));
    cp_async_open.clear();
}
inline void cp_host_cp_async_wait(int newest_pending) {
    while ((int)cp_async_groups.size() > newest_pending) {
        for (const auto& c : cp_async_groups.front()) cp_async_land(c);
        cp_async_groups.pop_front();
    }
}
inline void cp_check_no_copies_in_flight() {
    if (!cp_async_open.empty() || !cp_async_groups.empty()) {
        std::fprintf(stderr,
                     "thread %u of block (%u, %u, %u) ended with cp.async copies in flight\n",
                     threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
        std::abort();
    }
}

// n elements of T from or to a binary stream, as the runners' input and output files hold
// them (little-endian, packed).
template <typename T>
void cp_read(std::istream& in, T* data, long long n) {
    in.read(reinterpret_cast<char*>(data), n * (long long)sizeof(T));
}
template <typename T>
void cp_write(std::ostream& out, const T* data, long long n) {
    out.write(reinterpret_cast<const char*>(data), n * (long long)sizeof(T));
}

// n elements of T starting `offset` elements past a 16-byte boundary (an offset of 1 makes
// the kernels take their unaligned paths).
template <typename T>
struct cp_buffer {
    struct alignas(16) chunk { unsigned char b[16]; };
    std::vector<chunk> storage;
    T* data;
    cp_buffer(long long n, int offset)
        : storage((n + offset) * sizeof(T) / 16 + 1),
          data(reinterpret_cast<T*>(storage.data()) + offset) {}
};

// The launch's dynamic shared memory (`extern __shared__` on the GPU), reused by each block
// in turn as static __shared__ arrays are.
struct alignas(16) cp_shared_chunk { unsigned char b[16]; };
inline std::vector<cp_shared_chunk> cp_dynamic;
inline std::size_t cp_dynamic_bytes = 0;

// A kernel's dynamic shared memory, which must hold `bytes`: a launch that gives less would
// fault (or worse) on the GPU, so here it aborts.
inline unsigned char* cp_dynamic_shared(int bytes) {
    if ((std::size_t)bytes > cp_dynamic_bytes) {
        std::fprintf(stderr,
                     "the kernel needs %d bytes of dynamic shared memory, the launch gave %zu\n",
                     bytes, cp_dynamic_bytes);
        std::abort();
    }
    return cp_dynamic.data()->b;
}

// Runs `kernel` over the grid, one block at a time, `threads` threads a block, with
// `shared_bytes` of dynamic shared memory.
inline void cp_launch(cp_dim3 grid, unsigned threads, const std::function<void()>& kernel,
                      std::size_t shared_bytes = 0) {
    cp_dynamic.assign(shared_bytes / 16 + 1, {});
    cp_dynamic_bytes = shared_bytes;
    gridDim = grid;
    blockDim = {threads, 1, 1};
    unsigned warps = threads / 32;
    cp_slots.assign(2 * warps, {});
    cp_warp_barriers.clear();
    for (unsigned w = 0; w < warps; ++w)
        cp_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                cp_block_barrier = std::make_unique<std::barrier<>>(threads);
                std::vector<std::thread> pool;
                for (unsigned i = 0; i < threads; ++i)
                    pool.emplace_back([&, i, x, y, z] {
                        threadIdx = {i, 0, 0};
                        blockIdx = {x, y, z};
                        kernel();
                        cp_check_no_copies_in_flight();
                    });
                for (auto& th : pool) th.join();
            }
}
