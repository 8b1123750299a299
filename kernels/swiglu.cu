// SwiGLU: act = silu(gate) * up. Vectorised like kernels/elementwise.cu.

__device__ __forceinline__ float cp_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ act_t cp_swiglu(act_t gate, act_t up) {
    float g = cp_ld(gate);
    return cp_st(g * cp_sigmoid(g) * cp_ld(up));
}

extern "C" __global__ void swiglu_forward(act_t* act, const act_t* gate, const act_t* up,
                                          long long n) {
    bool aligned = cp_aligned16(act) && cp_aligned16(gate) && cp_aligned16(up);
    long long vecs = aligned ? n / CP_VEC : 0;
    CP_FOR_EACH(v, vecs) {
        cp_acts g = ((const cp_acts*)gate)[v], u = ((const cp_acts*)up)[v], o;
        for (int j = 0; j < CP_VEC; ++j) o.e[j] = cp_swiglu(g.e[j], u.e[j]);
        ((cp_acts*)act)[v] = o;
    }
    CP_FOR_EACH(i, n - vecs * CP_VEC) {
        long long k = vecs * CP_VEC + i;
        act[k] = cp_swiglu(gate[k], up[k]);
    }
}

// The gradients of gate and up from d_act (which d_up overwrites).
__device__ __forceinline__ void cp_swiglu_backward(act_t& d_gate, act_t& d_act_to_d_up,
                                                   act_t gate, act_t up) {
    float g = cp_ld(gate), s = cp_sigmoid(g), da = cp_ld(d_act_to_d_up);
    d_gate = cp_st(da * cp_ld(up) * s * (1.0f + g * (1.0f - s)));
    d_act_to_d_up = cp_st(da * g * s);
}

// d_act arrives in d_act_to_d_up and leaves as d_up.
extern "C" __global__ void swiglu_backward(act_t* d_gate, act_t* d_act_to_d_up, const act_t* gate,
                                           const act_t* up, long long n) {
    bool aligned = cp_aligned16(d_gate) && cp_aligned16(d_act_to_d_up) && cp_aligned16(gate) &&
                   cp_aligned16(up);
    long long vecs = aligned ? n / CP_VEC : 0;
    CP_FOR_EACH(v, vecs) {
        cp_acts g = ((const cp_acts*)gate)[v], u = ((const cp_acts*)up)[v];
        cp_acts d = ((const cp_acts*)d_act_to_d_up)[v], dg;
        for (int j = 0; j < CP_VEC; ++j) cp_swiglu_backward(dg.e[j], d.e[j], g.e[j], u.e[j]);
        ((cp_acts*)d_gate)[v] = dg;
        ((cp_acts*)d_act_to_d_up)[v] = d;
    }
    CP_FOR_EACH(i, n - vecs * CP_VEC) {
        long long k = vecs * CP_VEC + i;
        cp_swiglu_backward(d_gate[k], d_act_to_d_up[k], gate[k], up[k]);
    }
}
