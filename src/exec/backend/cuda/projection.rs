//! The projections' products: `y = x · W^T` and its backward, one at a time or, for
//! projections that share an input, as one batched product per shape when the GPU batches
//! them ([`Gpu::batch_products`], see `product_group`).

use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gemm::Gemm;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::product_group::Product;
use crate::exec::backend::cuda::tensor::GpuTensor;

type Result<T> = std::result::Result<T, CudaError>;

/// A projection's weight `[out, in]` as the products read it.
#[derive(Clone, Copy)]
pub struct Weight {
    pub ptr: DevPtr,
    pub out: usize,
    pub inp: usize,
}

/// `y[n, out] (+)= x[n, in] · W[out, in]^T`, the projections' forward.
pub(crate) fn project(
    gpu: &Gpu,
    y: DevPtr,
    x: DevPtr,
    w: Weight,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    gpu.gemm(y, x, w.ptr, forward(w, n, accumulate))
}

/// Backward of [`project`]: `dW += dy^T · x` (f32) and `dx (+)= dy · W`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn project_backward(
    gpu: &Gpu,
    dw: &GpuTensor,
    dx: DevPtr,
    dy: DevPtr,
    x: DevPtr,
    w: Weight,
    n: usize,
    accumulate_dx: bool,
) -> Result<()> {
    gpu.gemm(dw.ptr(), dy, x, weight_grad(w, n))?;
    project_input_grad(gpu, dx, dy, w, n, accumulate_dx)
}

/// `dx (+)= dy · W`: the input's part of [`project_backward`].
pub(crate) fn project_input_grad(
    gpu: &Gpu,
    dx: DevPtr,
    dy: DevPtr,
    w: Weight,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    let dense = Gemm::dense(n, w.inp, w.out, false, false, accumulate);
    gpu.gemm(dx, dy, w.ptr, dense)
}

/// [`project`] of one input `x` through each weight into its output `(y, W)`.
pub(crate) fn project_each(
    gpu: &Gpu,
    x: DevPtr,
    outputs: &[(DevPtr, Weight)],
    n: usize,
) -> Result<()> {
    for run in same_shape_runs(gpu.batch_products, outputs, |(_, w)| *w) {
        let products: Vec<Product> = (run.iter())
            .map(|&(y, w)| Product {
                c: y,
                a: x,
                b: w.ptr,
            })
            .collect();
        gpu.gemm_group(&products, forward(run[0].1, n, false))?;
    }
    Ok(())
}

/// `dW += dy^T · x` for each `(dW, dy, W)` of projections of one input `x`: the weights'
/// part of [`project_backward`].
pub(crate) fn weight_grads_each(
    gpu: &Gpu,
    x: DevPtr,
    grads: &[(&GpuTensor, DevPtr, Weight)],
    n: usize,
) -> Result<()> {
    for run in same_shape_runs(gpu.batch_products, grads, |(_, _, w)| *w) {
        let products: Vec<Product> = (run.iter())
            .map(|&(dw, dy, _)| Product {
                c: dw.ptr(),
                a: dy,
                b: x,
            })
            .collect();
        gpu.gemm_group(&products, weight_grad(run[0].2, n))?;
    }
    Ok(())
}

fn forward(w: Weight, n: usize, accumulate: bool) -> Gemm {
    Gemm::dense(n, w.out, w.inp, false, true, accumulate)
}

fn weight_grad(w: Weight, n: usize) -> Gemm {
    Gemm::dense(w.out, w.inp, n, true, false, true)
}

/// `items` split into runs of consecutive items whose weights have one shape, to run as one
/// group each; one item a run unless `batch`.
fn same_shape_runs<T>(batch: bool, items: &[T], weight: impl Fn(&T) -> Weight) -> Vec<&[T]> {
    if !batch {
        return items.chunks(1).collect();
    }
    let shape = |t: &T| (weight(t).out, weight(t).inp);
    items.chunk_by(|a, b| shape(a) == shape(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::inventory::DType;

    #[test]
    fn projections_group_by_consecutive_weight_shape() {
        // q [64, 64], then k and v [32, 64] (grouped-query attention), then one more [64, 64].
        let w = |out: usize| Weight {
            ptr: DevPtr::new(0, DType::Bf16),
            out,
            inp: 64,
        };
        let items = [(0, w(64)), (1, w(32)), (2, w(32)), (3, w(64))];
        let runs = |batch| -> Vec<Vec<usize>> {
            same_shape_runs(batch, &items, |(_, w)| *w)
                .iter()
                .map(|run| run.iter().map(|(i, _)| *i).collect())
                .collect()
        };
        assert_eq!(runs(true), [vec![0], vec![1, 2], vec![3]]);
        assert_eq!(runs(false), [vec![0], vec![1], vec![2], vec![3]]);
    }
}
