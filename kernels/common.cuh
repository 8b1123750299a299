// Shared helpers for chronospipe's kernels. NVRTC compiles every kernels/*.cu file as one
// program with this header first, so nothing here may be defined twice.

#define CP_WARP 32
// NVRTC has no <math.h>; this is the float infinity the kernels need.
#define CP_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float cp_warp_sum(float v) {
    for (int o = CP_WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float cp_warp_max(float v) {
    for (int o = CP_WARP / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ float cp_block_sum(float v, float* scratch) {
    int lane = threadIdx.x % CP_WARP, warp = threadIdx.x / CP_WARP;
    v = cp_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x / CP_WARP;
    v = lane < warps ? scratch[lane] : 0.0f;
    return cp_warp_sum(v);
}

__device__ float cp_block_max(float v, float* scratch) {
    int lane = threadIdx.x % CP_WARP, warp = threadIdx.x / CP_WARP;
    v = cp_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x / CP_WARP;
    v = lane < warps ? scratch[lane] : -CP_INF;
    return cp_warp_max(v);
}

// Grid-stride loop over n elements.
#define CP_FOR_EACH(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)
