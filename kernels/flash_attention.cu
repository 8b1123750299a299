// Causal grouped-query attention on tensor cores for bf16 activations, without scores in
// global memory: bf16 products with f32 accumulation (mma.sync m16n8k16), an online softmax
// in registers, the output and each row's log-sum-exp kept for the backward, which recomputes
// the probabilities tile by tile. Built only with bf16 activations on sm_80 and newer.
//
// Layouts as in attention.cu: q, the output and dO are [tokens, heads * D], k, v [tokens,
// kv_heads * D], lse and delta [batch, heads, seq]; query head h reads key/value head
// h / (heads / kv_heads). Blocks are four warps; each warp owns 16 rows of a 64-row tile.
#if defined(CP_ACT_BF16) && __CUDA_ARCH__ >= 800

#define FA_ROWS 64     // rows of a block's tile: queries (forward) or keys (backward)
#define FA_STEP 64     // keys (forward) or queries (backward) per step of the inner loop
#define FA_HALF 32     // queries the backward computes P^T and dS^T for at a time
#define FA_PAD 8       // row padding in shared memory: a warp's fragment loads hit 32 banks
#define FA_THREADS 128

// Sixteen bytes, for whole-row copies between global and shared memory.
struct alignas(16) fa_chunk {
    unsigned x, y, z, w;
};

// Shared memory of a block, in bytes, for head dimension D (`ops::flash_shared_bytes` computes
// the same for the launch): the forward's query tile and two key/value tile pairs; the
// backward's key, value, query and dO tiles, dS^T, and a step's lse and delta. Dynamic, as the
// larger head dimensions need more than the 48 KiB a static array may hold; the tiles are
// carved from it in the order listed, each a multiple of 16 bytes.
template <int D>
__device__ constexpr int fa_forward_shared_bytes() {
    return (FA_ROWS + 4 * FA_STEP) * (D + FA_PAD) * 2;
}
template <int D>
__device__ constexpr int fa_backward_shared_bytes() {
    return (2 * FA_ROWS + 2 * FA_STEP) * (D + FA_PAD) * 2 + FA_ROWS * (FA_STEP + FA_PAD) * 2 +
           2 * FA_STEP * 4;
}

// The block's dynamic shared memory, checked (host builds) to hold `bytes`.
__device__ __forceinline__ unsigned char* fa_shared(int bytes) {
#ifdef CP_HOST_EMULATION
    return cp_dynamic_shared(bytes);
#else
    extern __shared__ fa_chunk fa_dynamic[];
    return (unsigned char*)fa_dynamic;
#endif
}

// `p` as a pointer to T, for loads and stores wider than an element; p must be aligned to T
// (a misaligned access faults on the GPU), which host builds check.
template <typename T>
__device__ __forceinline__ T* fa_as(const void* p) {
#ifdef CP_HOST_EMULATION
    cp_check_alignment(p, alignof(T));
#endif
    return (T*)p;
}

__device__ __forceinline__ unsigned fa_pack(act_t lo, act_t hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

__device__ __forceinline__ unsigned fa_pack_f(float lo, float hi) {
    return fa_pack(cp_st(lo), cp_st(hi));
}

// d += a * b for one 16x8x16 tile: a 16x16 bf16 (row-major fragment), b 16x8 bf16
// (column-major fragment), d 16x8 f32. Fragment layouts: PTX ISA, "mma.m16n8k16".
// (Host builds that check this file without a GPU supply cp_host_mma, a warp's product by
// the same layouts.)
__device__ __forceinline__ void fa_mma(float* d, const unsigned* a, const unsigned* b) {
#ifdef CP_HOST_EMULATION
    cp_host_mma(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// p[0] += x, p[1] += y atomically (p 8-byte aligned): one vector reduction on sm_90 and newer,
// two scalar atomics before.
__device__ __forceinline__ void fa_add2(float* p, float x, float y) {
#if defined(CP_HOST_EMULATION) || __CUDA_ARCH__ < 900
#ifdef CP_HOST_EMULATION
    cp_check_alignment(p, 8);
#endif
    atomicAdd(p, x);
    atomicAdd(p + 1, y);
#else
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#endif
}

// Each lane's place in a fragment: its group (row, or column of b) and its pair of columns.
__device__ __forceinline__ int fa_group() { return (threadIdx.x & 31) >> 2; }
__device__ __forceinline__ int fa_pair() { return (threadIdx.x & 3) * 2; }

// Four 8x8 bf16 matrices from shared memory, one register each (ldmatrix .x4): lanes 8i to
// 8i + 7 give the addresses of matrix i's rows (16 bytes each, 16-byte aligned). Lane l gets
// elements (l / 4, 2 (l % 4)) and the next column of each matrix; with `trans`, elements
// (2 (l % 4), l / 4) and the next row, as if the matrix were transposed. (Host builds supply
// cp_host_ldmatrix, the same exchange between a warp's lanes.)
__device__ __forceinline__ void fa_ldmatrix(unsigned* r, const act_t* row, bool trans) {
#ifdef CP_HOST_EMULATION
    cp_check_alignment(row, 16);
    cp_host_ldmatrix(r, row, trans);
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
#endif
}

// This lane's row of the 8x8 matrix it addresses in an ldmatrix, and the matrix (0 to 3).
__device__ __forceinline__ int fa_ldsm_row() { return threadIdx.x & 7; }
__device__ __forceinline__ int fa_ldsm_matrix() { return (threadIdx.x & 31) >> 3; }

// Fragment loaders from a row-major shared tile `t` with row stride S (elements), by 32-bit
// and 16-bit shared loads or, with LDSM, by ldmatrix (one instruction for four registers).
// a[m][k] = t[r0 + m][c0 + k].
template <int S, bool LDSM>
__device__ __forceinline__ void fa_frag_a(unsigned* a, const act_t* t, int r0, int c0) {
    if (LDSM) {
        int i = fa_ldsm_matrix();  // a[i]: rows + 8 (i & 1), columns + 8 (i >> 1)
        fa_ldmatrix(a, t + (r0 + fa_ldsm_row() + 8 * (i & 1)) * S + c0 + 8 * (i >> 1), false);
        return;
    }
    const act_t* p = t + (r0 + fa_group()) * S + c0 + fa_pair();
    a[0] = *fa_as<const unsigned>(p);
    a[1] = *fa_as<const unsigned>(p + 8 * S);
    a[2] = *fa_as<const unsigned>(p + 8);
    a[3] = *fa_as<const unsigned>(p + 8 * S + 8);
}

// a[m][k] = t[c0 + k][r0 + m]: the tile holds a's transpose.
template <int S, bool LDSM>
__device__ __forceinline__ void fa_frag_a_t(unsigned* a, const act_t* t, int r0, int c0) {
    if (LDSM) {
        int i = fa_ldsm_matrix();  // a[i]: m + 8 (i & 1), k + 8 (i >> 1)
        fa_ldmatrix(a, t + (c0 + fa_ldsm_row() + 8 * (i >> 1)) * S + r0 + 8 * (i & 1), true);
        return;
    }
    const act_t* p = t + (c0 + fa_pair()) * S + r0 + fa_group();
    a[0] = fa_pack(p[0], p[S]);
    a[1] = fa_pack(p[8], p[S + 8]);
    a[2] = fa_pack(p[8 * S], p[9 * S]);
    a[3] = fa_pack(p[8 * S + 8], p[9 * S + 8]);
}

// Two adjacent b fragments (columns n0 .. n0 + 7 and n0 + 8 .. n0 + 15) with
// b[k][n] = t[n][k0 + k]: the tile's rows are b's columns (keys in Q K^T).
template <int S, bool LDSM>
__device__ __forceinline__ void fa_frag_b2_rows_n(unsigned (*b)[2], const act_t* t, int n0,
                                                  int k0) {
    if (LDSM) {
        int i = fa_ldsm_matrix();  // b[i >> 1][i & 1]: columns + 8 (i >> 1), k + 8 (i & 1)
        unsigned r[4];
        fa_ldmatrix(r, t + (n0 + fa_ldsm_row() + 8 * (i >> 1)) * S + k0 + 8 * (i & 1), false);
        b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
        return;
    }
    for (int h = 0; h < 2; ++h) {
        const act_t* p = t + (n0 + 8 * h + fa_group()) * S + k0 + fa_pair();
        b[h][0] = *fa_as<const unsigned>(p);
        b[h][1] = *fa_as<const unsigned>(p + 8);
    }
}

// Two adjacent b fragments (columns n0 .. n0 + 15) with b[k][n] = t[k0 + k][n]: the tile's
// rows are b's rows (values in P V).
template <int S, bool LDSM>
__device__ __forceinline__ void fa_frag_b2_rows_k(unsigned (*b)[2], const act_t* t, int k0,
                                                  int n0) {
    if (LDSM) {
        int i = fa_ldsm_matrix();  // b[i >> 1][i & 1]: columns + 8 (i >> 1), k + 8 (i & 1)
        unsigned r[4];
        fa_ldmatrix(r, t + (k0 + fa_ldsm_row() + 8 * (i & 1)) * S + n0 + 8 * (i >> 1), true);
        b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
        return;
    }
    for (int h = 0; h < 2; ++h) {
        const act_t* p = t + (k0 + fa_pair()) * S + n0 + 8 * h + fa_group();
        b[h][0] = fa_pack(p[0], p[S]);
        b[h][1] = fa_pack(p[8 * S], p[9 * S]);
    }
}

// Asynchronous copies from global into shared memory (cp.async, sm_80 and newer): they bypass
// registers, so a block loads its next tile while it computes on the current one. A thread's
// copies since its last fa_commit form a group; fa_wait<N> returns once at most N of its
// groups are still in flight, and a __syncthreads after it makes every thread's copies
// visible to the block. `bytes` (4 or 16) are copied when `valid`, else as many zero bytes are
// written (src is then not read). (Host builds supply cp_host_cp_async and friends, which
// copy at the wait, so a read before it sees the old contents.)
template <int BYTES>
__device__ __forceinline__ void fa_copy_async(void* dst, const void* src, bool valid) {
#ifdef CP_HOST_EMULATION
    cp_host_cp_async(dst, src, valid ? BYTES : 0, BYTES);
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(dst);
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src),
                     "r"(valid ? 16 : 0));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(src),
                     "r"(valid ? 4 : 0));
#endif
}

__device__ __forceinline__ void fa_commit() {
#ifdef CP_HOST_EMULATION
    cp_host_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void fa_wait() {
#ifdef CP_HOST_EMULATION
    cp_host_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Starts copying rows row0 .. row0 + 63 of a [rows, stride] matrix's D columns at `src` into
// a shared tile; rows past `seq` read as zeros.
template <int D>
__device__ __forceinline__ void fa_load(act_t* tile, const act_t* src, long long stride, int row0,
                                        int seq) {
    const int chunks = D / 8;
    for (int i = threadIdx.x; i < FA_ROWS * chunks; i += FA_THREADS) {
        int r = i / chunks, c = (i % chunks) * 8;
        bool valid = row0 + r < seq;
        fa_copy_async<16>(tile + r * (D + FA_PAD) + c, src + (valid ? (row0 + r) * stride + c : 0),
                          valid);
    }
}

// p[n] = a-rows x (the first N rows of `t` as columns), over D: one 16xN tile of products.
template <int D, bool LDSM, int N>
__device__ __forceinline__ void fa_rows_by_tile(float (*p)[4], const act_t* a_tile, int a_row,
                                                const act_t* t) {
    const int S = D + FA_PAD;
    for (int n = 0; n < N / 8; ++n) p[n][0] = p[n][1] = p[n][2] = p[n][3] = 0.0f;
    for (int c = 0; c < D; c += 16) {
        unsigned a[4];
        fa_frag_a<S, LDSM>(a, a_tile, a_row, c);
        for (int n = 0; n < N / 8; n += 2) {
            unsigned b[2][2];
            fa_frag_b2_rows_n<S, LDSM>(b, t, n * 8, c);
            fa_mma(p[n], a, b[0]);
            fa_mma(p[n + 1], a, b[1]);
        }
    }
}

// acc[j] += p (16xK, as accumulators) x t (K x D rows): p's accumulator layout is the a
// fragment layout of the next product, two 8-column tiles per 16-wide step.
template <int D, bool LDSM, int K>
__device__ __forceinline__ void fa_tile_times_rows(float (*acc)[4], float (*p)[4], const act_t* t) {
    const int S = D + FA_PAD;
    for (int c = 0; c < K / 16; ++c) {
        unsigned a[4] = {fa_pack_f(p[2 * c][0], p[2 * c][1]), fa_pack_f(p[2 * c][2], p[2 * c][3]),
                         fa_pack_f(p[2 * c + 1][0], p[2 * c + 1][1]),
                         fa_pack_f(p[2 * c + 1][2], p[2 * c + 1][3])};
        for (int j = 0; j < D / 8; j += 2) {
            unsigned b[2][2];
            fa_frag_b2_rows_k<S, LDSM>(b, t, c * 16, j * 8);
            fa_mma(acc[j], a, b[0]);
            fa_mma(acc[j + 1], a, b[1]);
        }
    }
}

// One block per (64 queries, head, sequence); heavier (later) query tiles start first. Key and
// value tiles are double-buffered: the next pair loads while the block works on this one.
template <int D, bool LDSM>
__device__ void fa_forward(act_t* out, float* lse, const act_t* q, const act_t* k, const act_t* v,
                           int seq, int heads, int kv_heads, float scale) {
    const int S = D + FA_PAD;
    act_t* qs = (act_t*)fa_shared(fa_forward_shared_bytes<D>());
    // kv(buf, 0) and kv(buf, 1): key and value tiles of buffer buf.
    auto kv = [&](int buf, int which) { return qs + (FA_ROWS + (2 * buf + which) * FA_STEP) * S; };
    int head = blockIdx.y, b = blockIdx.z, kvh = head / (heads / kv_heads);
    int q0 = (gridDim.x - 1 - blockIdx.x) * FA_ROWS;
    long long width = (long long)heads * D, kv_width = (long long)kv_heads * D;
    long long tok0 = (long long)b * seq;
    const act_t* kg = k + tok0 * kv_width + kvh * D;
    const act_t* vg = v + tok0 * kv_width + kvh * D;
    auto load_keys = [&](int buf, int k0) {
        fa_load<D>(kv(buf, 0), kg, kv_width, k0, seq);
        fa_load<D>(kv(buf, 1), vg, kv_width, k0, seq);
        fa_commit();
    };
    fa_load<D>(qs, q + tok0 * width + head * D, width, q0, seq);
    load_keys(0, 0);
    int warp = threadIdx.x >> 5, pair = fa_pair();
    int rows[2] = {q0 + warp * 16 + fa_group(), q0 + warp * 16 + fa_group() + 8};
    float o[D / 8][4];
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m[2] = {-CP_INF, -CP_INF}, l[2] = {0.0f, 0.0f};
    int end = seq < q0 + FA_ROWS ? seq : q0 + FA_ROWS;
    // Every row of the block sees key 0 in the first step, so its running max is finite after it.
    for (int k0 = 0, buf = 0; k0 < end; k0 += FA_STEP, buf ^= 1) {
        // This tile's copies are the only ones in flight. The barrier makes every thread's
        // visible, and keeps the next loads out of the other buffer until every warp is done
        // with the previous tile.
        fa_wait<0>();
        __syncthreads();
        bool last = k0 + FA_STEP >= end;
        if (!last) load_keys(buf ^ 1, k0 + FA_STEP);
        const act_t *ks = kv(buf, 0), *vs = kv(buf, 1);
        float s[FA_STEP / 8][4];
        fa_rows_by_tile<D, LDSM, FA_STEP>(s, qs, warp * 16, ks);
        for (int h = 0; h < 2; ++h) {
            float mx = m[h];
            for (int n = 0; n < FA_STEP / 8; ++n)
                for (int e = 0; e < 2; ++e) {
                    // Only the last tile holds keys after a row's query or past the sequence.
                    int key = k0 + n * 8 + pair + e;
                    bool seen = !last || (key <= rows[h] && key < seq);
                    float x = seen ? s[n][2 * h + e] * scale : -CP_INF;
                    s[n][2 * h + e] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float corr = __expf(m[h] - mx);
            m[h] = mx;
            l[h] *= corr;
            for (int j = 0; j < D / 8; ++j) {
                o[j][2 * h] *= corr;
                o[j][2 * h + 1] *= corr;
            }
            for (int n = 0; n < FA_STEP / 8; ++n)
                for (int e = 0; e < 2; ++e) {
                    float p = __expf(s[n][2 * h + e] - mx);
                    s[n][2 * h + e] = p;
                    l[h] += p;
                }
        }
        fa_tile_times_rows<D, LDSM, FA_STEP>(o, s, vs);
    }
    for (int h = 0; h < 2; ++h) {
        float sum = l[h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (rows[h] >= seq) continue;
        act_t* dst = out + (tok0 + rows[h]) * width + head * D + pair;
        for (int j = 0; j < D / 8; ++j)
            *fa_as<unsigned>(dst + j * 8) = fa_pack_f(o[j][2 * h] / sum, o[j][2 * h + 1] / sum);
        if (pair == 0) lse[((long long)b * heads + head) * seq + rows[h]] = m[h] + logf(sum);
    }
}

// One block per (64 keys, key/value head, sequence): it walks every query head of the group
// and every query tile from the diagonal on, keeping dK and dV of its keys in registers and
// adding dQ into the f32 `dq_acc` [tokens, heads * D] (zeroed by the caller) with atomics. A
// step's queries load while the block computes the previous step's dQ.
template <int D, bool LDSM>
__device__ void fa_backward(float* dq_acc, act_t* dk, act_t* dv, const act_t* q, const act_t* k,
                            const act_t* v, const act_t* d_out, const float* lse,
                            const float* delta, int seq, int heads, int kv_heads, float scale) {
    const int S = D + FA_PAD, SP = FA_STEP + FA_PAD;
    act_t* ks = (act_t*)fa_shared(fa_backward_shared_bytes<D>());
    act_t *vs = ks + FA_ROWS * S, *qs = vs + FA_ROWS * S;
    act_t *dos = qs + FA_STEP * S, *dst = dos + FA_STEP * S;
    float* lse_s = (float*)(dst + FA_ROWS * SP);
    float* delta_s = lse_s + FA_STEP;
    int k0 = blockIdx.x * FA_ROWS, kvh = blockIdx.y, b = blockIdx.z, group = heads / kv_heads;
    long long width = (long long)heads * D, kv_width = (long long)kv_heads * D;
    long long tok0 = (long long)b * seq;
    // Starts loading the step of query head `head`'s queries q0 .. q0 + 63; past the sequence,
    // zeros (the step masks those queries).
    auto load_queries = [&](int head, int q0) {
        long long at = tok0 * width + head * D;
        fa_load<D>(qs, q + at, width, q0, seq);
        fa_load<D>(dos, d_out + at, width, q0, seq);
        if (threadIdx.x < FA_STEP) {
            int r = q0 + threadIdx.x;
            long long row = ((long long)b * heads + head) * seq + (r < seq ? r : 0);
            fa_copy_async<4>(lse_s + threadIdx.x, lse + row, r < seq);
            fa_copy_async<4>(delta_s + threadIdx.x, delta + row, r < seq);
        }
        fa_commit();
    };
    fa_load<D>(ks, k + tok0 * kv_width + kvh * D, kv_width, k0, seq);
    fa_load<D>(vs, v + tok0 * kv_width + kvh * D, kv_width, k0, seq);
    load_queries(kvh * group, k0);
    int warp = threadIdx.x >> 5, g = fa_group(), pair = fa_pair();
    int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    for (int j = 0; j < D / 8; ++j)
        for (int i = 0; i < 4; ++i) dk_acc[j][i] = dv_acc[j][i] = 0.0f;
    int heads_end = (kvh + 1) * group;
    for (int head = kvh * group; head < heads_end; ++head) {
        for (int q0 = k0; q0 < seq; q0 += FA_STEP) {
            // The step's copies are the only ones in flight; after the barrier every thread sees
            // them, and every warp is done reading dst for the previous step's dQ.
            fa_wait<0>();
            __syncthreads();
            // The step's 64 queries in two halves, so that a half's P^T and dS^T (16 x 32 per
            // warp) are what the registers hold beside dK and dV; the products add into dK and
            // dV in the same order as over the whole step.
            for (int half = 0; half < FA_STEP; half += FA_HALF) {
                const act_t *qh = qs + half * S, *doh = dos + half * S;
                // P^T for the warp's 16 keys and the half's queries, from the kept lse; masked
                // (query before key) and padded queries give zero.
                float p[FA_HALF / 8][4];
                fa_rows_by_tile<D, LDSM, FA_HALF>(p, ks, warp * 16, qh);
                for (int n = 0; n < FA_HALF / 8; ++n)
                    for (int i = 0; i < 4; ++i) {
                        int col = half + n * 8 + pair + (i & 1), query = q0 + col;
                        bool seen = query >= keys[i >> 1] && query < seq;
                        p[n][i] = seen ? __expf(p[n][i] * scale - lse_s[col]) : 0.0f;
                    }
                fa_tile_times_rows<D, LDSM, FA_HALF>(dv_acc, p, doh);
                // dS^T = P^T (dP^T - delta) scale, with dP^T = V dO^T.
                float ds[FA_HALF / 8][4];
                fa_rows_by_tile<D, LDSM, FA_HALF>(ds, vs, warp * 16, doh);
                for (int n = 0; n < FA_HALF / 8; ++n)
                    for (int i = 0; i < 4; ++i) {
                        int col = half + n * 8 + pair + (i & 1);
                        ds[n][i] = p[n][i] * (ds[n][i] - delta_s[col]) * scale;
                    }
                fa_tile_times_rows<D, LDSM, FA_HALF>(dk_acc, ds, qh);
                for (int n = 0; n < FA_HALF / 8; ++n)
                    for (int h = 0; h < 2; ++h)
                        *fa_as<unsigned>(dst + (warp * 16 + g + 8 * h) * SP + half + n * 8 +
                                         pair) = fa_pack_f(ds[n][2 * h], ds[n][2 * h + 1]);
            }
            // dst is whole, and every read of this step's queries is done: the next step's load
            // goes ahead while this one adds its dQ.
            __syncthreads();
            int next_head = head, next_q0 = q0 + FA_STEP;
            if (next_q0 >= seq) ++next_head, next_q0 = k0;
            if (next_head < heads_end) load_queries(next_head, next_q0);
            // dQ of the step's queries (warp w: queries 16w ..) = dS K over the block's keys.
            float dq[D / 8][4];
            for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
            for (int c = 0; c < FA_ROWS / 16; ++c) {
                unsigned a[4];
                fa_frag_a_t<SP, LDSM>(a, dst, warp * 16, c * 16);
                for (int j = 0; j < D / 8; j += 2) {
                    unsigned bb[2][2];
                    fa_frag_b2_rows_k<S, LDSM>(bb, ks, c * 16, j * 8);
                    fa_mma(dq[j], a, bb[0]);
                    fa_mma(dq[j + 1], a, bb[1]);
                }
            }
            for (int h = 0; h < 2; ++h) {
                int query = q0 + warp * 16 + g + 8 * h;
                if (query >= seq) continue;
                float* to = dq_acc + (tok0 + query) * width + head * D + pair;
                for (int j = 0; j < D / 8; ++j) fa_add2(to + j * 8, dq[j][2 * h], dq[j][2 * h + 1]);
            }
        }
    }
    for (int h = 0; h < 2; ++h) {
        if (keys[h] >= seq) continue;
        long long at = (tok0 + keys[h]) * kv_width + kvh * D + pair;
        for (int j = 0; j < D / 8; ++j) {
            *fa_as<unsigned>(dk + at + j * 8) = fa_pack_f(dk_acc[j][2 * h], dk_acc[j][2 * h + 1]);
            *fa_as<unsigned>(dv + at + j * 8) = fa_pack_f(dv_acc[j][2 * h], dv_acc[j][2 * h + 1]);
        }
    }
}

// The kernels for head dimension D: flash_forward_D and flash_backward_D load fragments with
// 32- and 16-bit shared loads, flash_forward_ldsm_D and flash_backward_ldsm_D with ldmatrix.
// Each states the blocks an SM it is built to fit (registers are what bound them): at head
// dimension 64, 4 forward and 3 backward; at 128, 2 and 2. CUDA 13.0's NVRTC and ptxas
// (scripts/check-kernels, which fails on any spill) give them, for sm_90: forward 127-128
// registers at 64 and 162-174 at 128, backward 166-167 at 64 (187-210 unbounded) and 253-255
// at 128, none spilling.
#define FA_KERNEL_PAIR(NAME, D, LDSM, FORWARD_BLOCKS, BACKWARD_BLOCKS)                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, FORWARD_BLOCKS)                    \
        flash_forward_##NAME(act_t* out, float* lse, const act_t* q, const act_t* k,             \
                             const act_t* v, int seq, int heads, int kv_heads, float scale) {    \
        fa_forward<D, LDSM>(out, lse, q, k, v, seq, heads, kv_heads, scale);                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, BACKWARD_BLOCKS)                   \
        flash_backward_##NAME(float* dq_acc, act_t* dk, act_t* dv, const act_t* q,               \
                              const act_t* k, const act_t* v, const act_t* d_out,                \
                              const float* lse, const float* delta, int seq, int heads,          \
                              int kv_heads, float scale) {                                       \
        fa_backward<D, LDSM>(dq_acc, dk, dv, q, k, v, d_out, lse, delta, seq, heads, kv_heads,   \
                             scale);                                                             \
    }
#define FA_KERNELS(D, FORWARD_BLOCKS, BACKWARD_BLOCKS)                \
    FA_KERNEL_PAIR(D, D, false, FORWARD_BLOCKS, BACKWARD_BLOCKS)      \
    FA_KERNEL_PAIR(ldsm_##D, D, true, FORWARD_BLOCKS, BACKWARD_BLOCKS)

FA_KERNELS(16, 4, 3)
FA_KERNELS(32, 4, 3)
FA_KERNELS(64, 4, 3)
FA_KERNELS(128, 2, 2)

#endif
