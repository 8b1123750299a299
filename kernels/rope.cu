// Rotary position embedding, rotate-half convention: within each head dimension i pairs with
// i + head_dim/2 and turns by the angle position * freqs.f[i]. The frequencies come from the
// host (the values the CPU backend uses), so both backends turn by the same angles. `inverse`
// applies the transposed rotation (the backward).

#define CP_ROPE_MAX_HALF 128
struct cp_rope_freqs { float f[CP_ROPE_MAX_HALF]; };

// Thread (r, i) of a block handles dimension pair i of row r of the block's rows, in every
// head: one sine and cosine per (row, pair), shared by the heads. head_dim / 2 is at most
// CP_ROPE_MAX_HALF and blockDim.x; threads past the block's last whole row idle; blocks stride
// over the rows.
extern "C" __global__ void rope(act_t* x, int rows, int width, int seq, int head_dim,
                                cp_rope_freqs freqs, int inverse) {
    int half = head_dim / 2;
    int rows_per_block = blockDim.x / half;
    int i = threadIdx.x % half, r = threadIdx.x / half;
    if (r >= rows_per_block) return;
    float f = freqs.f[i];
    for (int row = blockIdx.x * rows_per_block + r; row < rows;
         row += gridDim.x * rows_per_block) {
        float s, c;
        sincosf((float)(row % seq) * f, &s, &c);
        if (inverse) s = -s;
        act_t* xr = x + (long long)row * width + i;
        for (int h = 0; h < width; h += head_dim) {
            float x0 = cp_ld(xr[h]), x1 = cp_ld(xr[h + half]);
            xr[h] = cp_st(x0 * c - x1 * s);
            xr[h + half] = cp_st(x1 * c + x0 * s);
        }
    }
}
