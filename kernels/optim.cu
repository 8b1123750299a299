// Optimizer updates with PyTorch's semantics; `factor` is the gradient-clipping factor. Each
// gradient is cleared once read (the next step accumulates from zero), and unless `w_act` is
// null the updated weights are also written there as activations (the bf16 copy the products
// read): neither needs a pass of its own.

extern "C" __global__ void adamw_update(float* w, act_t* w_act, float* grad, float* m,
                                        float* v, long long n, float factor, float beta1,
                                        float beta2, float eps, float decay, float step_size,
                                        float bc2_sqrt) {
    CP_FOR_EACH(i, n) {
        float g = grad[i] * factor;
        grad[i] = 0.0f;
        float wi = w[i] * decay;
        float mi = m[i] + (g - m[i]) * (1.0f - beta1);
        float vi = v[i] * beta2 + (1.0f - beta2) * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        float updated = wi - step_size * (mi / denom);
        w[i] = updated;
        m[i] = mi;
        v[i] = vi;
        if (w_act != nullptr) w_act[i] = cp_st(updated);
    }
}

extern "C" __global__ void sgd_update(float* w, act_t* w_act, float* grad, long long n,
                                      float factor, float lr) {
    CP_FOR_EACH(i, n) {
        float updated = w[i] - lr * (grad[i] * factor);
        grad[i] = 0.0f;
        w[i] = updated;
        if (w_act != nullptr) w_act[i] = cp_st(updated);
    }
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
