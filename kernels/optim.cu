// Optimizer updates with PyTorch's semantics; `factor` is the gradient-clipping factor.

extern "C" __global__ void adamw_update(float* w, const float* grad, float* m, float* v,
                                        long long n, float factor, float beta1, float beta2,
                                        float eps, float decay, float step_size, float bc2_sqrt) {
    CP_FOR_EACH(i, n) {
        float g = grad[i] * factor;
        float wi = w[i] * decay;
        float mi = m[i] + (g - m[i]) * (1.0f - beta1);
        float vi = v[i] * beta2 + (1.0f - beta2) * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        w[i] = wi - step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void sgd_update(float* w, const float* grad, long long n, float factor,
                                      float lr) {
    CP_FOR_EACH(i, n) { w[i] -= lr * (grad[i] * factor); }
}

// acc += sum of x^2, in double (the global gradient norm).
extern "C" __global__ void sum_squares(double* acc, const float* x, long long n) {
    __shared__ double partial[1024];
    double s = 0.0;
    CP_FOR_EACH(i, n) { s += (double)x[i] * (double)x[i]; }
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(acc, partial[0]);
}
