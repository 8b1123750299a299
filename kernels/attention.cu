// The elementwise and row-wise pieces of causal attention; the products Q·K^T, P·V and their
// backward run through cuBLAS. Scores of one sequence, all heads: [heads * seq, seq], row
// r = head * seq + t. Only the output and each row's log-sum-exp are kept for the backward.
// Scores, probabilities, q/k/v and the output are activations (act_t); lse and delta float.

// Scaled scores -> probabilities in place, writing each row's log-sum-exp. One block per row.
extern "C" __global__ void attn_softmax(act_t* scores, float* lse, int seq) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    int t = (int)(row % seq);
    act_t* s = scores + row * seq;
    float m = -CP_INF;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) m = fmaxf(m, cp_ld(s[j]));
    m = cp_block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) sum += expf(cp_ld(s[j]) - m);
    sum = cp_block_sum(sum, scratch);
    float l = m + logf(sum);
    if (threadIdx.x == 0) lse[row] = l;
    for (int j = threadIdx.x; j < seq; j += blockDim.x)
        s[j] = cp_st(j <= t ? expf(cp_ld(s[j]) - l) : 0.0f);
}

// Scaled scores -> probabilities from the kept log-sum-exp (the backward's recomputation).
extern "C" __global__ void attn_probs(act_t* scores, const float* lse, long long rows, int seq) {
    CP_FOR_EACH(i, rows * seq) {
        long long row = i / seq;
        int j = (int)(i % seq), t = (int)(row % seq);
        scores[i] = cp_st(j <= t ? expf(cp_ld(scores[i]) - lse[row]) : 0.0f);
    }
}

// delta[b, head, t] = sum_d dO * O over the head's dimensions. out/d_out rows are tokens.
// Consecutive threads take consecutive heads of a token, so a warp reads one stretch of
// memory; each thread reads its head's row in 16-byte vectors when head_dim and the buffers
// allow.
template <int W>
__device__ __forceinline__ float cp_head_dot(const act_t* a, const act_t* b, int head_dim) {
    float acc = 0.0f;
    for (int d = 0; d < head_dim; d += W) {
        cp_act_run<W> x = cp_ld_run<W>(a, d), y = cp_ld_run<W>(b, d);
        for (int j = 0; j < W; ++j) acc += cp_ld(x.e[j]) * cp_ld(y.e[j]);
    }
    return acc;
}

extern "C" __global__ void attn_delta(float* delta, const act_t* d_out, const act_t* out,
                                      long long batch, int heads, int seq, int head_dim) {
    bool vec = head_dim % CP_VEC == 0 && cp_aligned16(d_out) && cp_aligned16(out);
    CP_FOR_EACH(i, batch * seq * heads) {
        long long token = i / heads;
        int head = (int)(i % heads), t = (int)(token % seq);
        long long base = i * head_dim;  // token * heads * head_dim + head * head_dim
        float acc = vec ? cp_head_dot<CP_VEC>(d_out + base, out + base, head_dim)
                        : cp_head_dot<1>(d_out + base, out + base, head_dim);
        delta[(token / seq * heads + head) * seq + t] = acc;
    }
}

// dP -> dS in place: dS = P * (dP - delta_row) * scale (zero where P is masked).
extern "C" __global__ void attn_dscores(act_t* dp_to_ds, const act_t* probs, const float* delta,
                                        long long rows, int seq, float scale) {
    CP_FOR_EACH(i, rows * seq) {
        dp_to_ds[i] = cp_st(cp_ld(probs[i]) * (cp_ld(dp_to_ds[i]) - delta[i / seq]) * scale);
    }
}
