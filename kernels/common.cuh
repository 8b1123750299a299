// Shared helpers for chronospipe's kernels. NVRTC compiles every kernels/*.cu file as one
// program with this header first, so nothing here may be defined twice.

#define CP_WARP 32

// Activations are stored as act_t: float, or bf16 when compiled with -DCP_ACT_BF16 (kept as
// its 16 bits, so no header is needed). Kernels load them with cp_ld, compute in float and
// store with cp_st. Weights, gradients of weights, optimizer state and per-row statistics
// (1/rms, log-sum-exp, losses) are float in both builds.
#ifdef CP_ACT_BF16
typedef unsigned short act_t;
__device__ __forceinline__ float cp_ld(act_t v) { return __uint_as_float(((unsigned int)v) << 16); }
// Round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ act_t cp_st(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (act_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (act_t)(u >> 16);
}
#else
typedef float act_t;
__device__ __forceinline__ float cp_ld(act_t v) { return v; }
__device__ __forceinline__ act_t cp_st(float f) { return f; }
#endif
// NVRTC has no <math.h>; this is the float infinity the kernels need.
#define CP_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float cp_warp_sum(float v) {
    for (int o = CP_WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// W activations, or W floats, moved as one access (aligned to their size, at most 16 bytes).
template <int W>
struct alignas(W * sizeof(act_t) < 16 ? W * sizeof(act_t) : 16) cp_act_run { act_t e[W]; };
template <int W>
struct alignas(W * 4 < 16 ? W * 4 : 16) cp_float_run { float e[W]; };

template <int W>
__device__ __forceinline__ cp_act_run<W> cp_ld_run(const act_t* p, long long c) {
    return *(const cp_act_run<W>*)(p + c);
}
template <int W>
__device__ __forceinline__ cp_float_run<W> cp_ld_floats(const float* p, long long c) {
    return *(const cp_float_run<W>*)(p + c);
}
template <int W>
__device__ __forceinline__ void cp_st_run(act_t* p, long long c, cp_act_run<W> v) {
    *(cp_act_run<W>*)(p + c) = v;
}

// 16 bytes of activations (8 bf16 or 4 f32), and as many floats: the unit in which the row
// and elementwise kernels move aligned buffers. One thread moving 2 bytes at a time cannot
// keep enough bytes in flight to reach the memory's bandwidth; 16 can.
#define CP_VEC (16 / (int)sizeof(act_t))
typedef cp_act_run<CP_VEC> cp_acts;
typedef cp_float_run<CP_VEC> cp_floats;

__device__ __forceinline__ bool cp_aligned16(const void* p) {
    return ((unsigned long long)p & 15u) == 0;
}

// Whether rows of `len` elements starting at these buffers can be moved in 16-byte vectors:
// len a multiple of CP_VEC and every buffer 16-byte aligned (unused arguments stay null).
__device__ __forceinline__ bool cp_rows_vec(long long len, const void* a,
                                            const void* b = nullptr, const void* c = nullptr) {
    return len % CP_VEC == 0 && cp_aligned16(a) && cp_aligned16(b) && cp_aligned16(c);
}

// Log-sum-exp in one pass: each thread keeps a running maximum m and the sum s of exp(x - m)
// over its elements, rescaling the sum when the maximum grows; the block then merges the
// pairs. A pair with no elements is (-inf, 0).

// The pair (m2, s2) merged into (m, s).
__device__ __forceinline__ void cp_lse_merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == -CP_INF) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

__device__ __forceinline__ void cp_lse_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else if (x != -CP_INF) {
        s += expf(x - m);
    }
}

// log(sum of exp) over the block from each thread's pair (blockDim.x a multiple of 32, at
// most 1024); every thread gets the result. `scratch` holds 64 floats of shared memory.
__device__ float cp_block_lse(float m, float s, float* scratch) {
    for (int o = CP_WARP / 2; o > 0; o /= 2) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        cp_lse_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x % CP_WARP, warp = threadIdx.x / CP_WARP, warps = blockDim.x / CP_WARP;
    __syncthreads();
    if (lane == 0) scratch[warp] = m, scratch[32 + warp] = s;
    __syncthreads();
    m = -CP_INF, s = 0.0f;
    for (int w = 0; w < warps; ++w) cp_lse_merge(m, s, scratch[w], scratch[32 + w]);
    return m + logf(s);
}

// Grid-stride loop over n elements.
#define CP_FOR_EACH(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)
