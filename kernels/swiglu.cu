// SwiGLU: act = silu(gate) * up.

__device__ __forceinline__ float cp_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_forward(act_t* act, const act_t* gate, const act_t* up,
                                          long long n) {
    CP_FOR_EACH(i, n) {
        float g = cp_ld(gate[i]);
        act[i] = cp_st(g * cp_sigmoid(g) * cp_ld(up[i]));
    }
}

// d_act arrives in d_act_to_d_up and leaves as d_up.
extern "C" __global__ void swiglu_backward(act_t* d_gate, act_t* d_act_to_d_up, const act_t* gate,
                                           const act_t* up, long long n) {
    CP_FOR_EACH(i, n) {
        float g = cp_ld(gate[i]), s = cp_sigmoid(g), da = cp_ld(d_act_to_d_up[i]);
        d_gate[i] = cp_st(da * cp_ld(up[i]) * s * (1.0f + g * (1.0f - s)));
        d_act_to_d_up[i] = cp_st(da * g * s);
    }
}
