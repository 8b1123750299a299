// Elementwise arithmetic the model needs besides its named operations.

// a += b on activations (residual branches, gradient sums).
extern "C" __global__ void add_into(act_t* a, const act_t* b, long long n) {
    CP_FOR_EACH(i, n) { a[i] = cp_st(cp_ld(a[i]) + cp_ld(b[i])); }
}

// Float values rounded to the activation type: bf16 copies of weights for the products.
extern "C" __global__ void cast_to_act(act_t* out, const float* x, long long n) {
    CP_FOR_EACH(i, n) { out[i] = cp_st(x[i]); }
}
