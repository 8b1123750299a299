// Token embedding lookup and its backward (rows of the table gather gradients atomically).
// The table and its gradient are float; the looked-up rows are activations.

extern "C" __global__ void embedding_forward(act_t* out, const float* table, const int* ids,
                                             long long tokens, int hidden) {
    CP_FOR_EACH(i, tokens * hidden) {
        long long t = i / hidden;
        out[i] = cp_st(table[(long long)ids[t] * hidden + i % hidden]);
    }
}

extern "C" __global__ void embedding_backward(float* d_table, const act_t* d_out, const int* ids,
                                              long long tokens, int hidden) {
    CP_FOR_EACH(i, tokens * hidden) {
        long long t = i / hidden;
        atomicAdd(&d_table[(long long)ids[t] * hidden + i % hidden], cp_ld(d_out[i]));
    }
}
