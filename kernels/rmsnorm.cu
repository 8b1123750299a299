// RMSNorm over rows of h features: out = w * x / rms(x). One block per row. x, out and dy are
// activations (act_t); w, dw and 1/rms are float.

extern "C" __global__ void rmsnorm_forward(act_t* out, float* rstd, const act_t* x,
                                           const float* w, int h, float eps) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    const act_t* xr = x + row * h;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float v = cp_ld(xr[c]);
        ss += v * v;
    }
    ss = cp_block_sum(ss, scratch);
    float r = 1.0f / sqrtf(ss / (float)h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int c = threadIdx.x; c < h; c += blockDim.x)
        out[row * h + c] = cp_st(w[c] * (cp_ld(xr[c]) * r));
}

// The forward's output again from the kept 1/rms.
extern "C" __global__ void rmsnorm_apply(act_t* out, const float* rstd, const act_t* x,
                                         const float* w, int h) {
    long long row = blockIdx.x;
    float r = rstd[row];
    for (int c = threadIdx.x; c < h; c += blockDim.x)
        out[row * h + c] = cp_st(w[c] * (cp_ld(x[row * h + c]) * r));
}

// dw[c] += sum over rows of dy * x * rstd. Block (x: 256 columns, rows_per_block rows), one
// atomic add per column and block. Must run before rmsnorm_backward_input overwrites dy.
extern "C" __global__ void rmsnorm_backward_weight(float* dw, const act_t* dy, const act_t* x,
                                                   const float* rstd, int rows, int h,
                                                   int rows_per_block) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    int r0 = blockIdx.y * rows_per_block;
    int r1 = min(rows, r0 + rows_per_block);
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r) {
        long long i = (long long)r * h + c;
        acc += cp_ld(dy[i]) * cp_ld(x[i]) * rstd[r];
    }
    atomicAdd(&dw[c], acc);
}

// dy -> dx in place: dx = rstd * (dy * w) - x * rstd^3 * sum(dy * w * x) / h. One block per row.
extern "C" __global__ void rmsnorm_backward_input(act_t* dy_dx, const act_t* x, const float* w,
                                                  const float* rstd, int h) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    act_t* d = dy_dx + row * h;
    const act_t* xr = x + row * h;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) dot += cp_ld(d[c]) * w[c] * cp_ld(xr[c]);
    dot = cp_block_sum(dot, scratch);
    float r = rstd[row];
    float k = dot * r * r * r / (float)h;
    for (int c = threadIdx.x; c < h; c += blockDim.x)
        d[c] = cp_st(r * (cp_ld(d[c]) * w[c]) - k * cp_ld(xr[c]));
}
