// Rotary position embedding, rotate-half convention: within each head dimension i pairs with
// i + head_dim/2. `inverse` applies the transposed rotation (the backward).
extern "C" __global__ void rope(act_t* x, long long rows, int width, int seq, int head_dim,
                                float theta, int inverse) {
    int half = head_dim / 2;
    long long pairs_per_row = width / 2;
    CP_FOR_EACH(p, rows * pairs_per_row) {
        long long row = p / pairs_per_row;
        int in_row = (int)(p % pairs_per_row);
        int head = in_row / half, i = in_row % half;
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
        float angle = (float)(row % seq) * inv_freq;
        float c = cosf(angle), s = sinf(angle);
        if (inverse) s = -s;
        act_t* hp = x + row * width + head * head_dim;
        float x0 = cp_ld(hp[i]), x1 = cp_ld(hp[i + half]);
        hp[i] = cp_st(x0 * c - x1 * s);
        hp[i + half] = cp_st(x1 * c + x0 * s);
    }
}
