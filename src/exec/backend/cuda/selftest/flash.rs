//! The flash-attention kernels (bf16 activations) against the CPU backend's attention in f32
//! on the same bf16-rounded inputs, for each head dimension they are built for, with grouped
//! query heads and sequences that end inside a 64-row tile.

use std::time::Instant;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Check, Result, cpu_attention};
use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::cuda::gpu::{FLASH_KERNELS, FlashLoads, Gpu};
use crate::exec::backend::cuda::limits::{FLASH_THREADS, flash_shared_bytes};
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::device::{MemGroup, Pool, PoolRef};
use crate::plan::inventory::{CUDA_FLASH_HEAD_DIMS, DType};

/// Relative error allowed against f32 (all but lse): outputs are rounded to bf16 (2^-9
/// relative), and so are the probabilities and dS in the kernels' second products.
pub const FLASH_TOLERANCE: f64 = 2e-2;
/// Relative error allowed for lse, which the kernels keep in f32.
pub const FLASH_LSE_TOLERANCE: f64 = 1e-3;

/// The shapes checked, one per head dimension of the flash kernels
/// ([`CUDA_FLASH_HEAD_DIMS`]): one key/value head for four query heads and a sequence ending
/// inside a tile; no grouping and whole tiles; groups of two and a partial last tile; two
/// query heads on one key/value head over two tiles, the second partial.
pub fn flash_check_shapes() -> Vec<AttnShape> {
    CUDA_FLASH_HEAD_DIMS
        .iter()
        .zip([(77, 4, 1), (128, 4, 4), (200, 4, 2), (100, 2, 1)])
        .map(|(&head_dim, (seq, heads, kv_heads))| AttnShape {
            batch: 2,
            seq,
            heads,
            kv_heads,
            head_dim,
        })
        .collect()
}

/// Random bf16-exact inputs for `sh`: q, k, v, dO.
pub fn flash_inputs(rng: &mut ChaCha8Rng, sh: &AttnShape) -> [Vec<f32>; 4] {
    let n = sh.batch * sh.seq;
    let (w, kvw) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let mut rounded = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0)).to_f32())
            .collect()
    };
    [
        rounded(n * w),
        rounded(n * kvw),
        rounded(n * kvw),
        rounded(n * w),
    ]
}

/// The names of [`cpu_attention`]'s tensors, and the tolerance each is held to.
pub const FLASH_OUTPUTS: [(&str, f64); 6] = [
    ("out", FLASH_TOLERANCE),
    ("lse", FLASH_LSE_TOLERANCE),
    ("dq", FLASH_TOLERANCE),
    ("dk", FLASH_TOLERANCE),
    ("dv", FLASH_TOLERANCE),
    ("delta", FLASH_TOLERANCE),
];

/// Both variants of the flash kernels ([`FlashLoads`]) against the CPU attention on every
/// shape of [`flash_check_shapes`].
pub fn flash_checks(gpu: &mut Gpu) -> Result<Vec<Check>> {
    let pool = Pool::new("flash-check", usize::MAX);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut checks = Vec::new();
    for sh in flash_check_shapes() {
        let inputs = flash_inputs(&mut rng, &sh);
        let each = with_each_flash_loads(gpu, |gpu| check_shape(gpu, &pool, &inputs, sh))?;
        checks.extend(each.into_iter().flatten());
    }
    Ok(checks)
}

/// Prints each flash kernel as this GPU's driver compiled it: registers a thread, bytes of
/// local memory a thread (registers spilled), the dynamic shared memory a launch gets, and the
/// blocks an SM can hold with them. `scripts/check-kernels` reads the same off CUDA 13.0's
/// ptxas without a GPU; a driver with another compiler may differ.
pub fn print_flash_kernels(gpu: &Gpu) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute as A;
    println!("\nflash kernels as compiled on this GPU ({FLASH_THREADS} threads a block)");
    println!("| kernel | registers | spilled bytes a thread | shared KiB | blocks an SM |");
    println!("|---|---:|---:|---:|---:|");
    for (head_dim, _, forward, backward) in FLASH_KERNELS {
        for (name, is_forward) in [(forward, true), (backward, false)] {
            let f = gpu.function(name)?;
            let shared = flash_shared_bytes(head_dim, is_forward);
            let regs = f.get_attribute(A::CU_FUNC_ATTRIBUTE_NUM_REGS)?;
            let local = f.get_attribute(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?;
            let blocks =
                f.occupancy_max_active_blocks_per_multiprocessor(FLASH_THREADS, shared, None)?;
            let kib = shared as f64 / 1024.0;
            println!("| `{name}` | {regs} | {local} | {kib:.1} | {blocks} |");
        }
    }
    Ok(())
}

/// `run` on `gpu` with each variant of the flash kernels in turn ([`FlashLoads::EACH`] order);
/// leaves `gpu` with the loads it had, whatever `run` returns.
fn with_each_flash_loads<T>(
    gpu: &mut Gpu,
    mut run: impl FnMut(&Gpu) -> Result<T>,
) -> Result<Vec<T>> {
    let before = gpu.flash_loads;
    let mut results = Vec::new();
    for loads in FlashLoads::EACH {
        gpu.flash_loads = loads;
        results.push(run(gpu));
    }
    gpu.flash_loads = before;
    results.into_iter().collect()
}

fn check_shape(
    gpu: &Gpu,
    pool: &PoolRef,
    inputs: &[Vec<f32>; 4],
    sh: AttnShape,
) -> Result<Vec<Check>> {
    let n = sh.batch * sh.seq;
    let (w, kvw) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let stats = sh.batch * sh.heads * sh.seq;
    let [q, k, v, d_out] = inputs;
    let want = cpu_attention(inputs, sh);

    let up = |data: &[f32]| -> Result<GpuTensor> {
        let data: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
        GpuTensor::from_host(gpu, pool, "in", &[data.len()], &data, MemGroup::Activations)
    };
    let zeros = |len: usize, dtype: DType| {
        GpuTensor::zeros(gpu, pool, "out", &[len], dtype, MemGroup::Activations)
    };
    let (gq, gk, gv, gdo) = (up(q)?, up(k)?, up(v)?, up(d_out)?);
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
        "flash ({}) hd {} seq {} heads {}/{}",
        gpu.flash_loads.name(),
        sh.head_dim,
        sh.seq,
        sh.heads,
        sh.kv_heads
    );
    let ours = [&out, &lse, &dq, &dk, &dv, &delta];
    let mut checks = Vec::new();
    for ((t, (name, tolerance)), reference) in ours.into_iter().zip(FLASH_OUTPUTS).zip(&want) {
        let check = Check::new(format!("{label}: {name}"), &down(t)?, reference, tolerance);
        checks.push(check);
    }
    Ok(checks)
}

/// Milliseconds of one causal attention forward and backward with bf16 activations, through
/// cuBLAS with scores in device memory and on each variant of the flash kernels (in
/// [`FlashLoads::EACH`] order; none where no flash kernel covers the head dimension), for `sh`,
/// each the mean of `reps` after one warm-up.
pub fn time_attention(gpu: &mut Gpu, sh: AttnShape, reps: usize) -> Result<(f64, Vec<f64>)> {
    let pool = Pool::new("flash-timing", usize::MAX);
    let n = sh.batch * sh.seq;
    let (w, kvw) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let (stats, scores) = (sh.batch * sh.heads * sh.seq, sh.heads * sh.seq * sh.seq);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut tensor = |len: usize, dtype: DType| -> Result<GpuTensor> {
        match dtype {
            DType::Bf16 => {
                let data: Vec<bf16> = (0..len)
                    .map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0)))
                    .collect();
                GpuTensor::from_host(gpu, &pool, "t", &[len], &data, MemGroup::Activations)
            }
            _ => GpuTensor::zeros(gpu, &pool, "t", &[len], dtype, MemGroup::Activations),
        }
    };
    let [q, d_out] = [0, 1].map(|_| tensor(n * w, DType::Bf16));
    let [k, v] = [0, 1].map(|_| tensor(n * kvw, DType::Bf16));
    let (q, k, v, d_out) = (q?, k?, v?, d_out?);
    let [out, dq] = [0, 1].map(|_| tensor(n * w, DType::Bf16));
    let [dk, dv] = [0, 1].map(|_| tensor(n * kvw, DType::Bf16));
    let [lse, delta] = [0, 1].map(|_| tensor(stats, DType::F32));
    let [s, ds] = [0, 1].map(|_| tensor(scores, DType::Bf16));
    let (out, dq, dk, dv, lse, delta, s, ds) = (out?, dq?, dk?, dv?, lse?, delta?, s?, ds?);
    let mut dq_acc = tensor(n * w, DType::F32)?;
    let grads = (dq.ptr(), dk.ptr(), dv.ptr(), delta.ptr());
    let kept = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr());
    type Step<'a> = &'a dyn Fn(&Gpu, &mut GpuTensor) -> Result<()>;
    let time = |gpu: &Gpu, acc: &mut GpuTensor, step: Step<'_>| -> Result<f64> {
        step(gpu, acc)?;
        gpu.synchronize()?;
        let start = Instant::now();
        for _ in 0..reps {
            step(gpu, acc)?;
        }
        gpu.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3 / reps.max(1) as f64)
    };
    let cublas = time(gpu, &mut dq_acc, &|gpu, _| {
        gpu.attention_forward(out.ptr(), lse.ptr(), q.ptr(), k.ptr(), v.ptr(), s.ptr(), sh)?;
        gpu.attention_backward(grads, d_out.ptr(), kept, (s.ptr(), ds.ptr()), sh)
    })?;
    if !CUDA_FLASH_HEAD_DIMS.contains(&sh.head_dim) {
        return Ok((cublas, Vec::new()));
    }
    let flash_step = |gpu: &Gpu, acc: &mut GpuTensor| {
        let (qkv, kept_out) = ((q.ptr(), k.ptr(), v.ptr()), (out.ptr(), lse.ptr()));
        gpu.flash_attention_forward(kept_out, qkv, sh)?;
        acc.fill_zero(gpu)?;
        gpu.flash_attention_backward(grads, d_out.ptr(), kept, acc.ptr(), sh)
    };
    let flash = with_each_flash_loads(gpu, |gpu| time(gpu, &mut dq_acc, &flash_step))?;
    Ok((cublas, flash))
}
