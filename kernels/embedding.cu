// Token embedding lookup and its backward (rows of the table gather gradients atomically).

extern "C" __global__ void embedding_forward(float* out, const float* table, const int* ids,
                                             long long tokens, int hidden) {
    CP_FOR_EACH(i, tokens * hidden) {
        long long t = i / hidden;
        out[i] = table[(long long)ids[t] * hidden + i % hidden];
    }
}

extern "C" __global__ void embedding_backward(float* d_table, const float* d_out, const int* ids,
                                              long long tokens, int hidden) {
    CP_FOR_EACH(i, tokens * hidden) {
        long long t = i / hidden;
        atomicAdd(&d_table[(long long)ids[t] * hidden + i % hidden], d_out[i]);
    }
}
