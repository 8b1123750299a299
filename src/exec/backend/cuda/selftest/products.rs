//! The timed model's projection products on their own, bf16: each group of products that
//! share an input (q, k, v; gate, up; their weight gradients) one call at a time and as one
//! batched call (`Gpu::gemm_group`, what layers run with `Gpu::batch_products`), the batched
//! results held against the separate ones first.

use std::time::Instant;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Check, Result};
use crate::exec::backend::cuda::gemm::Gemm;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::product_group::Product;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::device::{MemGroup, Pool};
use crate::exec::model::LlamaConfig;
use crate::plan::inventory::DType;

/// One group's timings: milliseconds of its products one call each and as one batched call.
#[derive(Debug, Clone)]
pub struct ProductGroup {
    pub name: String,
    pub flops: f64,
    pub separate_ms: f64,
    pub batched_ms: f64,
}

/// `count` products of the same shape over `tokens` rows sharing one operand.
struct Group {
    name: &'static str,
    count: usize,
    out: usize,
    inp: usize,
    /// Weight gradients (`dW_i += dy_i^T x`, f32) rather than the forward's `y_i = x W_i^T`.
    weight_grad: bool,
}

/// The groups of the layer whose products share an operand and a shape: the forward's
/// q, k, v (when k and v are as wide as q) and gate, up, and their weight gradients.
fn groups(config: &LlamaConfig) -> Vec<Group> {
    let d = config.dims;
    let (h, f) = (d.hidden, d.ffn);
    let qkv = if d.kv_width() == h { 3 } else { 1 };
    let group = |name, count, out, weight_grad| Group {
        name,
        count,
        out,
        inp: h,
        weight_grad,
    };
    vec![
        group("forward q, k, v", qkv, h, false),
        group("forward gate, up", 2, f, false),
        group("weight gradients q, k, v", qkv, h, true),
        group("weight gradients gate, up", 2, f, true),
    ]
}

/// Times each group over `tokens` rows, the mean of `reps` after one warm-up, and checks that
/// the batched call computes what the separate calls do.
pub fn time_products(
    gpu: &Gpu,
    config: &LlamaConfig,
    tokens: usize,
    reps: usize,
) -> Result<(Vec<ProductGroup>, Vec<Check>)> {
    let pool = Pool::new("product-timing", usize::MAX);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut random = |len: usize| -> Result<GpuTensor> {
        let data: Vec<bf16> = (0..len)
            .map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0)))
            .collect();
        GpuTensor::from_host(gpu, &pool, "t", &[len], &data, MemGroup::Activations)
    };
    let (mut timings, mut checks) = (Vec::new(), Vec::new());
    for g in groups(config) {
        let (one_w, one_y) = (g.out * g.inp, tokens * g.out);
        // Forward: shared x [tokens, inp], weights [count][out, inp], outputs [count][tokens,
        // out]. Weight gradients: shared x, dy [count][tokens, out], dW [count][out, inp].
        let x = random(tokens * g.inp)?;
        let (a, a_stride, c_len, c_dtype, c_stride) = if g.weight_grad {
            let dy = random(g.count * one_y)?;
            (dy, one_y, g.count * one_w, DType::F32, one_w)
        } else {
            let w = random(g.count * one_w)?;
            (w, one_w, g.count * one_y, DType::Bf16, one_y)
        };
        let zeros = || GpuTensor::zeros(gpu, &pool, "c", &[c_len], c_dtype, MemGroup::Activations);
        let (separate, batched) = (zeros()?, zeros()?);
        // One product as the layer runs it: forward `y = x W^T` (x is the product's A),
        // weight gradient `dW += dy^T x` (dy is A, transposed).
        let one = if g.weight_grad {
            Gemm::dense(g.out, g.inp, tokens, true, false, true)
        } else {
            Gemm::dense(tokens, g.out, g.inp, false, true, false)
        };
        let product = |c: &GpuTensor, i: usize| {
            let (ai, ci) = (a.ptr().offset(i * a_stride), c.ptr().offset(i * c_stride));
            match g.weight_grad {
                true => Product {
                    c: ci,
                    a: ai,
                    b: x.ptr(),
                },
                false => Product {
                    c: ci,
                    a: x.ptr(),
                    b: ai,
                },
            }
        };
        let run_separate = |c: &GpuTensor| -> Result<()> {
            for i in 0..g.count {
                let p = product(c, i);
                gpu.gemm(p.c, p.a, p.b, one)?;
            }
            Ok(())
        };
        let run_batched = |c: &GpuTensor| -> Result<()> {
            let products: Vec<Product> = (0..g.count).map(|i| product(c, i)).collect();
            gpu.gemm_group(&products, one)
        };
        run_separate(&separate)?;
        run_batched(&batched)?;
        let as_f32 = |t: &GpuTensor| -> Result<Vec<f32>> {
            Ok(match c_dtype {
                DType::F32 => t.to_host::<f32>(gpu)?,
                _ => t.to_host::<bf16>(gpu)?.iter().map(|v| v.to_f32()).collect(),
            })
        };
        checks.push(Check::new(
            format!("{}: batched vs separate", g.name),
            &as_f32(&batched)?,
            &as_f32(&separate)?,
            1e-2,
        ));
        let time = |run: &dyn Fn(&GpuTensor) -> Result<()>, c: &GpuTensor| -> Result<f64> {
            gpu.synchronize()?;
            let start = Instant::now();
            for _ in 0..reps {
                run(c)?;
            }
            gpu.synchronize()?;
            Ok(start.elapsed().as_secs_f64() * 1e3 / reps.max(1) as f64)
        };
        timings.push(ProductGroup {
            name: format!("{} ({} x {}x{}x{})", g.name, g.count, one.m, one.n, one.k),
            flops: 2.0 * (g.count * tokens * g.out * g.inp) as f64,
            separate_ms: time(&run_separate, &separate)?,
            batched_ms: time(&run_batched, &batched)?,
        });
    }
    Ok((timings, checks))
}
