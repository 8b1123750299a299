// RMSNorm over rows of h features: out = w * x / rms(x). x, out and dy are activations
// (act_t); w, dw and 1/rms are float.
//
// The row kernels give each row one warp (CP_RMS_ROWS rows to a block) whose lanes stride the
// row W elements at a time: W = CP_VEC (16-byte vectors) when h is a multiple of it and the
// buffers are 16-byte aligned, else 1. Reductions stay within the warp.

#define CP_RMS_ROWS 8

// This thread's row (one warp a row), or -1 past the last.
__device__ __forceinline__ long long cp_rms_row(int rows) {
    long long row = (long long)blockIdx.x * CP_RMS_ROWS + threadIdx.x / CP_WARP;
    return row < rows ? row : -1;
}

// out = w * x * r over one row. With `forward`, r = 1 / rms(x) (with eps) is computed here and
// stored in *rstd; otherwise it is read from there.
template <int W>
__device__ void cp_rms_row_forward(act_t* out, float* rstd, const act_t* x, const float* w,
                                   int h, float eps, bool forward) {
    int lane = threadIdx.x % CP_WARP;
    float r;
    if (forward) {
        float ss = 0.0f;
        for (int c = lane * W; c < h; c += CP_WARP * W) {
            cp_act_run<W> v = cp_ld_run<W>(x, c);
            for (int j = 0; j < W; ++j) ss += cp_ld(v.e[j]) * cp_ld(v.e[j]);
        }
        r = 1.0f / sqrtf(cp_warp_sum(ss) / (float)h + eps);
        if (lane == 0) *rstd = r;
    } else {
        r = *rstd;
    }
    for (int c = lane * W; c < h; c += CP_WARP * W) {
        cp_act_run<W> v = cp_ld_run<W>(x, c), o;
        cp_float_run<W> wv = cp_ld_floats<W>(w, c);
        for (int j = 0; j < W; ++j) o.e[j] = cp_st(wv.e[j] * (cp_ld(v.e[j]) * r));
        cp_st_run<W>(out, c, o);
    }
}

__device__ __forceinline__ void cp_rms_forward(act_t* out, float* rstd, const act_t* x,
                                               const float* w, int rows, int h, float eps,
                                               bool forward) {
    long long row = cp_rms_row(rows);
    if (row < 0) return;
    act_t* o = out + row * h;
    const act_t* xr = x + row * h;
    if (cp_rows_vec(h, out, x, w))
        cp_rms_row_forward<CP_VEC>(o, rstd + row, xr, w, h, eps, forward);
    else
        cp_rms_row_forward<1>(o, rstd + row, xr, w, h, eps, forward);
}

extern "C" __global__ void rmsnorm_forward(act_t* out, float* rstd, const act_t* x,
                                           const float* w, int rows, int h, float eps) {
    cp_rms_forward(out, rstd, x, w, rows, h, eps, true);
}

// The forward's output again from the kept 1/rms.
extern "C" __global__ void rmsnorm_apply(act_t* out, const float* rstd, const act_t* x,
                                         const float* w, int rows, int h) {
    cp_rms_forward(out, (float*)rstd, x, w, rows, h, 0.0f, false);
}

// dw[c] += sum over rows of dy * x * rstd. Block (x: 256 threads of W columns each, y: a
// group of rows_per_block rows, then every gridDim.y-th group after it, so the grid's y stays
// within its limit whatever the rows), one atomic add per column and block. Must run before
// rmsnorm_backward_input overwrites dy.
template <int W>
__device__ void cp_rms_backward_weight(float* dw, const act_t* dy, const act_t* x,
                                       const float* rstd, int rows, int h, int rows_per_block) {
    int c = (blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (c >= h) return;
    float acc[W];
    for (int j = 0; j < W; ++j) acc[j] = 0.0f;
    long long stride = (long long)gridDim.y * rows_per_block;
    for (long long r0 = (long long)blockIdx.y * rows_per_block; r0 < rows; r0 += stride) {
        long long r1 = min((long long)rows, r0 + rows_per_block);
        for (long long r = r0; r < r1; ++r) {
            long long i = r * h + c;
            cp_act_run<W> d = cp_ld_run<W>(dy, i), xv = cp_ld_run<W>(x, i);
            float s = rstd[r];
            for (int j = 0; j < W; ++j) acc[j] += cp_ld(d.e[j]) * cp_ld(xv.e[j]) * s;
        }
    }
    for (int j = 0; j < W; ++j) atomicAdd(&dw[c + j], acc[j]);
}

extern "C" __global__ void rmsnorm_backward_weight(float* dw, const act_t* dy, const act_t* x,
                                                   const float* rstd, int rows, int h,
                                                   int rows_per_block) {
    if (cp_rows_vec(h, dy, x))
        cp_rms_backward_weight<CP_VEC>(dw, dy, x, rstd, rows, h, rows_per_block);
    else
        cp_rms_backward_weight<1>(dw, dy, x, rstd, rows, h, rows_per_block);
}

// dy -> dx in place over one row: dx = rstd * (dy * w) - x * rstd^3 * sum(dy * w * x) / h.
template <int W>
__device__ void cp_rms_row_backward(act_t* d, const act_t* x, const float* w, float r, int h) {
    int lane = threadIdx.x % CP_WARP;
    float dot = 0.0f;
    for (int c = lane * W; c < h; c += CP_WARP * W) {
        cp_act_run<W> dv = cp_ld_run<W>(d, c), xv = cp_ld_run<W>(x, c);
        cp_float_run<W> wv = cp_ld_floats<W>(w, c);
        for (int j = 0; j < W; ++j) dot += cp_ld(dv.e[j]) * wv.e[j] * cp_ld(xv.e[j]);
    }
    float k = cp_warp_sum(dot) * r * r * r / (float)h;
    for (int c = lane * W; c < h; c += CP_WARP * W) {
        cp_act_run<W> dv = cp_ld_run<W>(d, c), xv = cp_ld_run<W>(x, c);
        cp_float_run<W> wv = cp_ld_floats<W>(w, c);
        for (int j = 0; j < W; ++j)
            dv.e[j] = cp_st(r * (cp_ld(dv.e[j]) * wv.e[j]) - k * cp_ld(xv.e[j]));
        cp_st_run<W>(d, c, dv);
    }
}

extern "C" __global__ void rmsnorm_backward_input(act_t* dy_dx, const act_t* x, const float* w,
                                                  const float* rstd, int rows, int h) {
    long long row = cp_rms_row(rows);
    if (row < 0) return;
    act_t* d = dy_dx + row * h;
    const act_t* xr = x + row * h;
    if (cp_rows_vec(h, dy_dx, x, w))
        cp_rms_row_backward<CP_VEC>(d, xr, w, rstd[row], h);
    else
        cp_rms_row_backward<1>(d, xr, w, rstd[row], h);
}
