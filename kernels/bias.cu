// Biases of projections (Qwen2's query, key and value): added to each row of the product's
// output, and their gradient the column sums of the output's gradient. Biases and their
// gradients are f32, the rows the activation type.

// y[r, c] += b[c] over `rows` rows of `width`.
extern "C" __global__ void bias_add(act_t* y, const float* b, long long rows, int width) {
    CP_FOR_EACH(i, rows * width) y[i] = cp_st(cp_ld(y[i]) + b[i % width]);
}

// db[c] += sum over rows of dy[r, c]: each thread sums one column over its block's groups of
// `rows_per_block` rows in row order, then adds that into db.
extern "C" __global__ void bias_backward(float* db, const act_t* dy, int rows, int width,
                                         int rows_per_block) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    float acc = 0.0f;
    long long stride = (long long)gridDim.y * rows_per_block;
    for (long long r0 = (long long)blockIdx.y * rows_per_block; r0 < rows; r0 += stride) {
        long long r1 = min((long long)rows, r0 + rows_per_block);
        for (long long r = r0; r < r1; ++r) acc += cp_ld(dy[r * width + c]);
    }
    atomicAdd(&db[c], acc);
}
