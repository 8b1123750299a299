// The pointer arrays of a batched matrix product (`Gpu::gemm_group`): cuBLAS reads them from
// device memory, so they are written on the stream, in order, before the product that reads
// them. One block of CP_GROUP_MAX threads.
#define CP_GROUP_MAX 4

struct cp_group_pointers {
    unsigned long long a[CP_GROUP_MAX], b[CP_GROUP_MAX], c[CP_GROUP_MAX];
};

// dst: the A pointers, then the B pointers, then the C pointers, CP_GROUP_MAX apart.
extern "C" __global__ void set_group_pointers(unsigned long long* dst, cp_group_pointers p,
                                              int count) {
    int i = threadIdx.x;
    if (i >= count) return;
    dst[i] = p.a[i];
    dst[CP_GROUP_MAX + i] = p.b[i];
    dst[2 * CP_GROUP_MAX + i] = p.c[i];
}
