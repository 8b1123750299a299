// RMSNorm over rows of h features: out = w * x / rms(x). One block per row.

extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* x,
                                           const float* w, int h, float eps) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    const float* xr = x + row * h;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) ss += xr[c] * xr[c];
    ss = cp_block_sum(ss, scratch);
    float r = 1.0f / sqrtf(ss / (float)h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int c = threadIdx.x; c < h; c += blockDim.x) out[row * h + c] = w[c] * (xr[c] * r);
}

// The forward's output again from the kept 1/rms.
extern "C" __global__ void rmsnorm_apply(float* out, const float* rstd, const float* x,
                                         const float* w, int h) {
    long long row = blockIdx.x;
    float r = rstd[row];
    for (int c = threadIdx.x; c < h; c += blockDim.x)
        out[row * h + c] = w[c] * (x[row * h + c] * r);
}

// dw[c] += sum over rows of dy * x * rstd. Block (x: 256 columns, rows_per_block rows), one
// atomic add per column and block. Must run before rmsnorm_backward_input overwrites dy.
extern "C" __global__ void rmsnorm_backward_weight(float* dw, const float* dy, const float* x,
                                                   const float* rstd, int rows, int h,
                                                   int rows_per_block) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    int r0 = blockIdx.y * rows_per_block;
    int r1 = min(rows, r0 + rows_per_block);
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r) {
        long long i = (long long)r * h + c;
        acc += dy[i] * x[i] * rstd[r];
    }
    atomicAdd(&dw[c], acc);
}

// dy -> dx in place: dx = rstd * (dy * w) - x * rstd^3 * sum(dy * w * x) / h. One block per row.
extern "C" __global__ void rmsnorm_backward_input(float* dy_dx, const float* x, const float* w,
                                                  const float* rstd, int h) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    float* d = dy_dx + row * h;
    const float* xr = x + row * h;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) dot += d[c] * w[c] * xr[c];
    dot = cp_block_sum(dot, scratch);
    float r = rstd[row];
    float k = dot * r * r * r / (float)h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) d[c] = r * (d[c] * w[c]) - k * xr[c];
}
