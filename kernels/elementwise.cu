// Elementwise arithmetic the model needs besides its named operations.

// a += b (residual branches, gradient sums).
extern "C" __global__ void add_into(float* a, const float* b, long long n) {
    CP_FOR_EACH(i, n) { a[i] += b[i]; }
}
