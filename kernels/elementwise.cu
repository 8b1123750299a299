// Elementwise arithmetic the model needs besides its named operations. Each kernel runs over
// whole 16-byte vectors (cp_acts) when its buffers are 16-byte aligned, then one element at a
// time over the rest (every element, when they are not).

// out = a + b on activations (residual branches, gradient sums); out may be a.
extern "C" __global__ void add(act_t* out, const act_t* a, const act_t* b, long long n) {
    long long vecs = cp_aligned16(out) && cp_aligned16(a) && cp_aligned16(b) ? n / CP_VEC : 0;
    CP_FOR_EACH(v, vecs) {
        cp_acts x = ((const cp_acts*)a)[v], y = ((const cp_acts*)b)[v];
        for (int j = 0; j < CP_VEC; ++j) x.e[j] = cp_st(cp_ld(x.e[j]) + cp_ld(y.e[j]));
        ((cp_acts*)out)[v] = x;
    }
    CP_FOR_EACH(i, n - vecs * CP_VEC) {
        long long k = vecs * CP_VEC + i;
        out[k] = cp_st(cp_ld(a[k]) + cp_ld(b[k]));
    }
}

// Float values rounded to the activation type: bf16 copies of weights for the products.
extern "C" __global__ void cast_to_act(act_t* out, const float* x, long long n) {
    long long vecs = cp_aligned16(out) && cp_aligned16(x) ? n / CP_VEC : 0;
    CP_FOR_EACH(v, vecs) {
        cp_floats f = ((const cp_floats*)x)[v];
        cp_acts o;
        for (int j = 0; j < CP_VEC; ++j) o.e[j] = cp_st(f.e[j]);
        ((cp_acts*)out)[v] = o;
    }
    CP_FOR_EACH(i, n - vecs * CP_VEC) {
        long long k = vecs * CP_VEC + i;
        out[k] = cp_st(x[k]);
    }
}
