// The elementwise and row-wise pieces of causal attention; the products Q·K^T, P·V and their
// backward run through cuBLAS. Scores of one sequence, all heads: [heads * seq, seq], row
// r = head * seq + t. Only the output and each row's log-sum-exp are kept for the backward.
// Scores, probabilities, q/k/v and the output are activations (act_t); lse and delta float.

// The row kernels below give each score row one block, whose threads stride the row W
// elements at a time: W = CP_VEC (16-byte vectors) when seq is a multiple of it and the
// buffers are 16-byte aligned, else 1. Row r of a sequence's scores is query t = r % seq.

// Scores of query t -> probabilities exp(s - l) up to t and zeros after it; l is the row's
// log-sum-exp over keys up to t, computed here in one pass when `lse_out` is set.
template <int W>
__device__ void cp_probs_row(act_t* s, int t, int seq, float l, float* lse_out, float* scratch) {
    if (lse_out) {
        float m = -CP_INF, sum = 0.0f;
        for (int j = threadIdx.x * W; j <= t; j += blockDim.x * W) {
            cp_act_run<W> v = cp_ld_run<W>(s, j);
            for (int e = 0; e < W; ++e)
                if (j + e <= t) cp_lse_add(m, sum, cp_ld(v.e[e]));
        }
        l = cp_block_lse(m, sum, scratch);
        if (threadIdx.x == 0) *lse_out = l;
    }
    for (int j = threadIdx.x * W; j < seq; j += blockDim.x * W) {
        cp_act_run<W> v = cp_ld_run<W>(s, j);
        for (int e = 0; e < W; ++e)
            v.e[e] = cp_st(j + e <= t ? expf(cp_ld(v.e[e]) - l) : 0.0f);
        cp_st_run<W>(s, j, v);
    }
}

// Scaled scores -> probabilities in place, writing each row's log-sum-exp.
extern "C" __global__ void attn_softmax(act_t* scores, float* lse, int seq) {
    __shared__ float scratch[64];
    long long row = blockIdx.x;
    act_t* s = scores + row * seq;
    int t = (int)(row % seq);
    if (cp_rows_vec(seq, scores))
        cp_probs_row<CP_VEC>(s, t, seq, 0.0f, lse + row, scratch);
    else
        cp_probs_row<1>(s, t, seq, 0.0f, lse + row, scratch);
}

// Scaled scores -> probabilities from the kept log-sum-exp (the backward's recomputation).
extern "C" __global__ void attn_probs(act_t* scores, const float* lse, int seq) {
    long long row = blockIdx.x;
    act_t* s = scores + row * seq;
    int t = (int)(row % seq);
    if (cp_rows_vec(seq, scores))
        cp_probs_row<CP_VEC>(s, t, seq, lse[row], nullptr, nullptr);
    else
        cp_probs_row<1>(s, t, seq, lse[row], nullptr, nullptr);
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
    bool vec = cp_rows_vec(head_dim, d_out, out);
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
template <int W>
__device__ void cp_dscores_row(act_t* ds, const act_t* p, float delta, int seq, float scale) {
    for (int j = threadIdx.x * W; j < seq; j += blockDim.x * W) {
        cp_act_run<W> d = cp_ld_run<W>(ds, j), pv = cp_ld_run<W>(p, j);
        for (int e = 0; e < W; ++e)
            d.e[e] = cp_st(cp_ld(pv.e[e]) * (cp_ld(d.e[e]) - delta) * scale);
        cp_st_run<W>(ds, j, d);
    }
}

extern "C" __global__ void attn_dscores(act_t* dp_to_ds, const act_t* probs, const float* delta,
                                        int seq, float scale) {
    long long row = blockIdx.x;
    act_t* ds = dp_to_ds + row * seq;
    const act_t* p = probs + row * seq;
    if (cp_rows_vec(seq, dp_to_ds, probs))
        cp_dscores_row<CP_VEC>(ds, p, delta[row], seq, scale);
    else
        cp_dscores_row<1>(ds, p, delta[row], seq, scale);
}
