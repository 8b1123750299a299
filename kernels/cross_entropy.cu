// Cross-entropy over rows of logits (activations). One block per row; losses are float.
// A row's log-sum-exp takes one pass (cp_lse_add, cp_block_lse); rows are read in 16-byte
// vectors when the vocabulary and the buffer allow. A negative target (the host's
// IGNORE_TARGET, -100) does not count: its row has no loss and a zero gradient.

template <int W>
__device__ float cp_row_lse_by(const act_t* x, int vocab, float* scratch) {
    float m = -CP_INF, s = 0.0f;
    for (int j = threadIdx.x * W; j < vocab; j += blockDim.x * W) {
        cp_act_run<W> v = cp_ld_run<W>(x, j);
        for (int e = 0; e < W; ++e) cp_lse_add(m, s, cp_ld(v.e[e]));
    }
    return cp_block_lse(m, s, scratch);
}

__device__ float cp_row_lse(const act_t* x, int vocab, float* scratch) {
    if (cp_rows_vec(vocab, x)) return cp_row_lse_by<CP_VEC>(x, vocab, scratch);
    return cp_row_lse_by<1>(x, vocab, scratch);
}

// loss_rows[row] = lse(logits[row]) - logits[row][target].
extern "C" __global__ void ce_forward(float* loss_rows, const act_t* logits, const int* targets,
                                      int vocab) {
    __shared__ float scratch[64];
    long long row = blockIdx.x;
    const act_t* x = logits + row * vocab;
    // A row's target is the same for every thread of its block, so all leave together.
    if (targets[row] < 0) {
        if (threadIdx.x == 0) loss_rows[row] = 0.0f;
        return;
    }
    float l = cp_row_lse(x, vocab, scratch);
    if (threadIdx.x == 0) loss_rows[row] = l - cp_ld(x[targets[row]]);
}

template <int W>
__device__ void cp_ce_grad_by(act_t* x, int vocab, int target, float l, float scale) {
    for (int j = threadIdx.x * W; j < vocab; j += blockDim.x * W) {
        cp_act_run<W> v = cp_ld_run<W>(x, j);
        for (int e = 0; e < W; ++e)
            v.e[e] = cp_st((expf(cp_ld(v.e[e]) - l) - (j + e == target ? 1.0f : 0.0f)) * scale);
        cp_st_run<W>(x, j, v);
    }
}

// Logits -> scale * (softmax - one_hot(target)) in place; unless loss_rows is null, each
// row's loss too, as ce_forward writes it (the target's logit is read before the log-sum-exp,
// whose block barriers every thread passes before any overwrites the row).
extern "C" __global__ void ce_backward(act_t* logits_to_grad, float* loss_rows,
                                       const int* targets, int vocab, float scale) {
    __shared__ float scratch[64];
    long long row = blockIdx.x;
    act_t* x = logits_to_grad + row * vocab;
    int target = targets[row];
    if (target < 0) {
        if (loss_rows != nullptr && threadIdx.x == 0) loss_rows[row] = 0.0f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) x[j] = cp_st(0.0f);
        return;
    }
    float picked = cp_ld(x[target]);
    float l = cp_row_lse(x, vocab, scratch);
    if (loss_rows != nullptr && threadIdx.x == 0) loss_rows[row] = l - picked;
    if (cp_rows_vec(vocab, x))
        cp_ce_grad_by<CP_VEC>(x, vocab, target, l, scale);
    else
        cp_ce_grad_by<1>(x, vocab, target, l, scale);
}
