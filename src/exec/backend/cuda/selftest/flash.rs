//! The flash-attention kernels (bf16 activations) against the CPU backend's attention in f32
//! on the same bf16-rounded inputs, for each head dimension they are built for, with grouped
//! query heads and sequences that end inside a 64-row tile.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Check, Result};
use crate::exec::backend::cuda::gpu::{FLASH_KERNELS, Gpu};
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::backend::{Backend, CpuBackend};
use crate::exec::device::{MemGroup, Pool, PoolRef};
use crate::exec::kernels::attention::AttnShape;
use crate::plan::inventory::DType;

/// Relative error allowed against f32: outputs are rounded to bf16 (2^-9 relative) and so are
/// the probabilities and dS in the kernels' second products.
const TOLERANCE: f64 = 2e-2;

/// The CPU reference of one shape: (out, lse, dq, dk, dv, delta).
type Reference = [Vec<f32>; 6];

pub fn flash_checks(gpu: &Gpu) -> Result<Vec<Check>> {
    let pool = Pool::new("flash-check", usize::MAX);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut checks = Vec::new();
    for (&(head_dim, ..), (seq, heads, kv_heads)) in
        FLASH_KERNELS.iter().zip([(77, 4, 1), (128, 4, 4), (200, 4, 2)])
    {
        let sh = AttnShape {
            batch: 2,
            seq,
            heads,
            kv_heads,
            head_dim,
        };
        checks.extend(check_shape(gpu, &pool, &mut rng, sh)?);
    }
    Ok(checks)
}

fn check_shape(
    gpu: &Gpu,
    pool: &PoolRef,
    rng: &mut ChaCha8Rng,
    sh: AttnShape,
) -> Result<Vec<Check>> {
    let n = sh.batch * sh.seq;
    let (w, kvw) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let stats = sh.batch * sh.heads * sh.seq;
    let mut rounded = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0)).to_f32())
            .collect()
    };
    let (q, k, v, d_out) = (rounded(n * w), rounded(n * kvw), rounded(n * kvw), rounded(n * w));
    let want = reference(&q, &k, &v, &d_out, sh);

    let up = |data: &[f32]| -> Result<GpuTensor> {
        let data: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
        GpuTensor::from_host(gpu, pool, "in", &[data.len()], &data, MemGroup::Activations)
    };
    let zeros = |len: usize, dtype: DType| {
        GpuTensor::zeros(gpu, pool, "out", &[len], dtype, MemGroup::Activations)
    };
    let (gq, gk, gv, gdo) = (up(&q)?, up(&k)?, up(&v)?, up(&d_out)?);
    let (out, lse) = (zeros(n * w, DType::Bf16)?, zeros(stats, DType::F32)?);
    gpu.flash_attention_forward((out.ptr(), lse.ptr()), (gq.ptr(), gk.ptr(), gv.ptr()), sh)?;
    let (dq, dk, dv) = (
        zeros(n * w, DType::Bf16)?,
        zeros(n * kvw, DType::Bf16)?,
        zeros(n * kvw, DType::Bf16)?,
    );
    let (delta, dq_acc) = (zeros(stats, DType::F32)?, zeros(n * w, DType::F32)?);
    gpu.flash_attention_backward(
        (dq.ptr(), dk.ptr(), dv.ptr(), delta.ptr()),
        gdo.ptr(),
        (gq.ptr(), gk.ptr(), gv.ptr(), out.ptr(), lse.ptr()),
        dq_acc.ptr(),
        sh,
    )?;
    let down = |t: &GpuTensor| -> Result<Vec<f32>> {
        Ok(match t.dtype() {
            DType::Bf16 => t.to_host::<bf16>(gpu)?.iter().map(|x| x.to_f32()).collect(),
            _ => t.to_host::<f32>(gpu)?,
        })
    };
    let label = format!(
        "flash hd {} seq {} heads {}/{}",
        sh.head_dim, sh.seq, sh.heads, sh.kv_heads
    );
    let ours = [&out, &lse, &dq, &dk, &dv, &delta];
    let names = ["out", "lse", "dq", "dk", "dv", "delta"];
    let mut checks = Vec::new();
    for ((t, name), reference) in ours.into_iter().zip(names).zip(&want) {
        let tolerance = if name == "lse" { 1e-3 } else { TOLERANCE };
        let check = Check::new(format!("{label}: {name}"), &down(t)?, reference, tolerance);
        checks.push(check);
    }
    Ok(checks)
}

fn reference(q: &[f32], k: &[f32], v: &[f32], d_out: &[f32], sh: AttnShape) -> Reference {
    let cpu = CpuBackend::default();
    let n = sh.batch * sh.seq;
    let (w, kvw) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let stats = sh.batch * sh.heads * sh.seq;
    let (mut out, mut lse) = (vec![0.0; n * w], vec![0.0; stats]);
    cpu.attention_forward(&mut out, &mut lse, q, k, v, sh);
    let (mut dq, mut dk, mut dv, mut delta) = (
        vec![0.0; n * w],
        vec![0.0; n * kvw],
        vec![0.0; n * kvw],
        vec![0.0; stats],
    );
    cpu.attention_backward(
        &mut dq, &mut dk, &mut dv, &mut delta, d_out, q, k, v, &out, &lse, sh,
    );
    [out, lse, dq, dk, dv, delta]
}
