// SwiGLU: act = silu(gate) * up.

__device__ __forceinline__ float cp_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_forward(float* act, const float* gate, const float* up,
                                          long long n) {
    CP_FOR_EACH(i, n) {
        float g = gate[i];
        act[i] = g * cp_sigmoid(g) * up[i];
    }
}

// d_act arrives in d_act_to_d_up and leaves as d_up.
extern "C" __global__ void swiglu_backward(float* d_gate, float* d_act_to_d_up, const float* gate,
                                           const float* up, long long n) {
    CP_FOR_EACH(i, n) {
        float g = gate[i], s = cp_sigmoid(g), da = d_act_to_d_up[i];
        d_gate[i] = da * up[i] * s * (1.0f + g * (1.0f - s));
        d_act_to_d_up[i] = da * g * s;
    }
}
