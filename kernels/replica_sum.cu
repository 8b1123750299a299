// Data parallelism over stages sharing one GPU: a gradient's replica copies are summed on the
// device, each added into the first in replica order (acc = c0, acc += c1, acc += c2, ...),
// so the sum rounds as the CPU engine's does. Gradients are f32 whatever the activations.
extern "C" __global__ void replica_add(float* acc, const float* x, long long n) {
    CP_FOR_EACH(i, n) acc[i] += x[i];
}
