// Cross-entropy over rows of logits (activations). One block per row; losses are float.

__device__ float cp_row_lse(const act_t* x, int vocab, float* scratch) {
    float m = -CP_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, cp_ld(x[j]));
    m = cp_block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(cp_ld(x[j]) - m);
    sum = cp_block_sum(sum, scratch);
    return m + logf(sum);
}

// loss_rows[row] = lse(logits[row]) - logits[row][target].
extern "C" __global__ void ce_forward(float* loss_rows, const act_t* logits, const int* targets,
                                      int vocab) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    const act_t* x = logits + row * vocab;
    float l = cp_row_lse(x, vocab, scratch);
    if (threadIdx.x == 0) loss_rows[row] = l - cp_ld(x[targets[row]]);
}

// Logits -> scale * (softmax - one_hot(target)) in place.
extern "C" __global__ void ce_backward(act_t* logits_to_grad, const int* targets, int vocab,
                                       float scale) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    act_t* x = logits_to_grad + row * vocab;
    float l = cp_row_lse(x, vocab, scratch);
    __syncthreads();
    int target = targets[row];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x)
        x[j] = cp_st((expf(cp_ld(x[j]) - l) - (j == target ? 1.0f : 0.0f)) * scale);
}
