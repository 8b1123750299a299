//! Matrix products through the `gemm` crate. Every product the model needs is
//! `dst (+)= a · b` with `a` and `b` possibly transposed, expressed by strides. A product on
//! several threads is cut into row (or column) ranges of `dst`, one single-threaded gemm call
//! each (a test holds one and two threads to the same bits on its shapes).

use rayon::prelude::*;

use super::disjoint::Disjoint;

/// A read-only matrix: `rows x cols`, element (r, c) at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix buffer too small");
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst (+)= a · b` on raw pointers with element strides, single-threaded: for kernels whose
/// parallel tasks each own strided pieces of shared buffers (attention's heads).
///
/// # Safety
/// Every element addressed through the shapes and strides must be inside its allocation,
/// and no other thread may access the addressed elements of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row_stride: usize,
    a: *const f32,
    a_row_stride: usize,
    a_col_stride: usize,
    b: *const f32,
    b_row_stride: usize,
    b_col_stride: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            a,
            a_col_stride as isize,
            a_row_stride as isize,
            b,
            b_col_stride as isize,
            b_row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// How many threads a product may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads(pub usize);

/// `dst = a · b` (or `dst += a · b` when `accumulate`), `dst` row-major `a.rows x b.cols`.
pub fn matmul(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, threads: Threads) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ");
    assert!(dst.len() >= m * n, "destination too small");
    assert!(a.fits() && b.fits(), "matrix strides exceed the buffer");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // Threads take whole row ranges of `dst` (column ranges when it is wider than tall), each
    // one single-threaded product: one fork per product, where gemm's own threading forks per
    // block.
    let by_rows = m >= n;
    let side = if by_rows { m } else { n };
    let pieces = threads.0.clamp(1, side.div_ceil(MIN_PIECE));
    let dst = Disjoint(dst.as_mut_ptr());
    let piece = |i: usize| {
        // Balanced and never empty: pieces <= side.
        let (s0, s1) = (i * side / pieces, (i + 1) * side / pieces);
        let (rows, cols, dst_at, a_at, b_at) = if by_rows {
            (s1 - s0, n, s0 * n, s0 * a.row_stride, 0)
        } else {
            (m, s1 - s0, s0, 0, s0 * b.col_stride)
        };
        // SAFETY: the asserts above keep every index from the shapes and strides inside the
        // three buffers; `dst` is borrowed mutably (aliases neither input) and each piece
        // writes its own rows or columns.
        unsafe {
            matmul_raw(
                rows,
                cols,
                k,
                dst.at(dst_at),
                n,
                a.data.as_ptr().add(a_at),
                a.row_stride,
                a.col_stride,
                b.data.as_ptr().add(b_at),
                b.row_stride,
                b.col_stride,
                accumulate,
            )
        }
    };
    // One piece runs on the calling thread: no hand-over to the pool for small products or a
    // single thread.
    if pieces == 1 {
        piece(0);
    } else {
        (0..pieces).into_par_iter().for_each(piece);
    }
}

/// The fewest rows (or columns) worth a thread of their own.
const MIN_PIECE: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0;
                for p in 0..a.cols {
                    s += a.data[i * a.row_stride + p * a.col_stride]
                        * b.data[p * b.row_stride + j * b.col_stride];
                }
                out[i * b.cols + j] = s;
            }
        }
        out
    }

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let a: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..35).map(|i| (i as f32 * 0.11).cos()).collect();
        let am = MatRef::rows(&a, 5, 7);
        let bt = MatRef::rows(&b, 5, 7).t(); // 7 x 5
        let want = naive(am, bt);
        // A recycled buffer may hold anything, NaN included: a plain product must not read it.
        let mut got = vec![f32::NAN; 25];
        matmul(&mut got, am, bt, false, Threads(2));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
        matmul(&mut got, am, bt, true, Threads(1));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - 2.0 * w).abs() < 1e-5);
        }
    }

    #[test]
    fn pieces_split_rows_or_columns_and_agree_with_one_thread() {
        // Tall (split by rows) and wide (split by columns), with b transposed in one of them.
        for (m, k, n) in [(150, 70, 40), (40, 70, 150)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.013).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.029).cos()).collect();
            let am = MatRef::rows(&a, m, k);
            for bm in [MatRef::rows(&b, k, n), MatRef::rows(&b, n, k).t()] {
                let want = naive(am, bm);
                let mut one = vec![1.0; m * n];
                let mut two = vec![1.0; m * n];
                matmul(&mut one, am, bm, true, Threads(1));
                matmul(&mut two, am, bm, true, Threads(2));
                assert_eq!(one, two, "{m}x{k}x{n}: thread count changed the bits");
                for (g, w) in two.iter().zip(&want) {
                    assert!(
                        (g - (w + 1.0)).abs() < 1e-4,
                        "{m}x{k}x{n}: {g} vs {}",
                        w + 1.0
                    );
                }
            }
        }
    }
}
