//! `chronospipe selftest --gpu`: holds the CUDA backend against the CPU backend, kernel by
//! kernel on random data and for a whole training step of `shared/testdata/hf-llama-tiny`
//! (also against the PyTorch reference stored there), then times training of a ~125M Llama
//! on one GPU in each precision. Every check prints a line; the run fails if any check fails.

use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Microbatch;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::libs::Libraries;
use crate::exec::backend::cuda::model::GpuTrainer;
use crate::exec::backend::cuda::ops::Gemm;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::backend::{Backend, CpuBackend};
use crate::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use crate::exec::checkpoint::safetensors_io::TensorFile;
use crate::exec::device::{MemGroup, Pool, PoolRef};
use crate::exec::kernels::attention::AttnShape;
use crate::exec::kernels::cross_entropy::HeadShape;
use crate::exec::kernels::matmul::MatRef;
use crate::exec::model::chunk::{backward_chunk, forward_chunk};
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use crate::exec::optim::clip::{clip_factor, global_norm, part_squares, scale_grads};
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::optim::{OptimizerConfig, PartOptimState, update_elements};
use crate::plan::cost::part_forward_flops;
use crate::plan::inventory::{MicroShape, ModelDims, Part, Profile};
use crate::plan::schedule::{ScheduleKind, build};
use crate::plan::simulate::{Hardware, chunk_costs, simulate};

type Result<T> = std::result::Result<T, CudaError>;

const MIB: f64 = (1 << 20) as f64;

/// One comparison: relative L2 error against a reference, and the bound it must stay under.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn new(name: impl Into<String>, ours: &[f32], reference: &[f32], tolerance: f64) -> Check {
        Check {
            name: name.into(),
            rel_err: rel_err(ours, reference),
            tolerance,
        }
    }

    pub fn passed(&self) -> bool {
        self.rel_err < self.tolerance
    }
}

/// `|ours - reference| / |reference|` in the L2 norm; infinite for unequal lengths or NaNs.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    if ours.len() != reference.len() {
        return f64::INFINITY;
    }
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    let err = (num / den.max(1e-30)).sqrt();
    if err.is_nan() { f64::INFINITY } else { err }
}

fn print_checks(title: &str, checks: &[Check]) -> bool {
    println!("\n{title}");
    for c in checks {
        let verdict = if c.passed() { "ok  " } else { "FAIL" };
        println!(
            "  {verdict} {:<48} rel err {:.2e} (< {:.0e})",
            c.name, c.rel_err, c.tolerance
        );
    }
    checks.iter().all(Check::passed)
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

struct Kit<'a> {
    gpu: &'a Gpu,
    pool: PoolRef,
    cpu: CpuBackend,
    rng: ChaCha8Rng,
}

impl Kit<'_> {
    fn up(&self, data: &[f32]) -> Result<GpuTensor> {
        GpuTensor::from_host(
            self.gpu,
            &self.pool,
            "t",
            &[data.len()],
            data,
            MemGroup::Activations,
        )
    }
    fn up_i32(&self, data: &[i32]) -> Result<GpuTensor<i32>> {
        GpuTensor::from_host(
            self.gpu,
            &self.pool,
            "ids",
            &[data.len()],
            data,
            MemGroup::Activations,
        )
    }
    fn rand(&mut self, n: usize) -> Vec<f32> {
        random(&mut self.rng, n)
    }
}

/// Every kernel against its CPU counterpart on random inputs; products held to `gemm_tol`.
pub fn kernel_checks(gpu: &Gpu, gemm_tol: f64) -> Result<Vec<Check>> {
    let mut k = Kit {
        gpu,
        pool: Pool::new("cuda-check", usize::MAX),
        cpu: CpuBackend::default(),
        rng: ChaCha8Rng::seed_from_u64(11),
    };
    let mut checks = Vec::new();
    let ew = 1e-5;

    // Products, plain and transposed.
    for (ta, tb) in [(false, true), (true, false), (false, false)] {
        let (m, n, kk) = (67, 45, 33);
        let a = k.rand(m * kk);
        let b = k.rand(kk * n);
        let c0 = k.rand(m * n);
        let mut want = c0.clone();
        let am = if ta {
            MatRef::rows(&a, kk, m).t()
        } else {
            MatRef::rows(&a, m, kk)
        };
        let bm = if tb {
            MatRef::rows(&b, n, kk).t()
        } else {
            MatRef::rows(&b, kk, n)
        };
        k.cpu.matmul(&mut want, am, bm, true);
        let (ga, gb, gc) = (k.up(&a)?, k.up(&b)?, k.up(&c0)?);
        gpu.gemm(
            gc.ptr(),
            ga.ptr(),
            gb.ptr(),
            Gemm::dense(m, n, kk, ta, tb, true),
        )?;
        checks.push(Check::new(
            format!("gemm ta={ta} tb={tb} (accumulate)"),
            &gc.to_host(gpu)?,
            &want,
            gemm_tol,
        ));
    }

    // RMSNorm forward and backward (h not a multiple of the block).
    let (rows, h) = (37, 200);
    let (x, w, dy, dw0) = (k.rand(rows * h), k.rand(h), k.rand(rows * h), k.rand(h));
    let (mut out, mut rstd) = (vec![0.0; rows * h], vec![0.0; rows]);
    k.cpu.rmsnorm_forward(&mut out, &mut rstd, &x, &w, 1e-5);
    let (gx, gw, go, gr) = (k.up(&x)?, k.up(&w)?, k.up(&out)?, k.up(&rstd)?);
    gpu.rmsnorm_forward(go.ptr(), gr.ptr(), gx.ptr(), gw.ptr(), rows, h, 1e-5)?;
    checks.push(Check::new("rmsnorm forward", &go.to_host(gpu)?, &out, ew));
    checks.push(Check::new(
        "rmsnorm forward rstd",
        &gr.to_host(gpu)?,
        &rstd,
        ew,
    ));
    let (mut dx, mut dw) = (dy.clone(), dw0.clone());
    k.cpu.rmsnorm_backward(&mut dx, &mut dw, &x, &w, &rstd);
    let (gdy, gdw) = (k.up(&dy)?, k.up(&dw0)?);
    gpu.rmsnorm_backward(gdy.ptr(), gdw.ptr(), gx.ptr(), gw.ptr(), gr.ptr(), rows, h)?;
    checks.push(Check::new(
        "rmsnorm backward dx",
        &gdy.to_host(gpu)?,
        &dx,
        ew,
    ));
    checks.push(Check::new(
        "rmsnorm backward dw (accumulate)",
        &gdw.to_host(gpu)?,
        &dw,
        ew,
    ));

    // RoPE and its inverse.
    let (seq, width, hd) = (16, 64, 16);
    for inverse in [false, true] {
        let x = k.rand(2 * seq * width);
        let mut want = x.clone();
        k.cpu.rope(&mut want, width, seq, hd, 10000.0, inverse);
        let gx = k.up(&x)?;
        gpu.rope(gx.ptr(), 2 * seq, width, seq, hd, 10000.0, inverse)?;
        checks.push(Check::new(
            format!("rope inverse={inverse}"),
            &gx.to_host(gpu)?,
            &want,
            ew,
        ));
    }

    // SwiGLU.
    let n = 1000;
    let (g, u, da) = (k.rand(n), k.rand(n), k.rand(n));
    let mut act = vec![0.0; n];
    k.cpu.swiglu_forward(&mut act, &g, &u);
    let (gg, gu, gact) = (k.up(&g)?, k.up(&u)?, k.up(&act)?);
    gpu.swiglu_forward(gact.ptr(), gg.ptr(), gu.ptr(), n)?;
    checks.push(Check::new("swiglu forward", &gact.to_host(gpu)?, &act, ew));
    let (mut dg, mut du) = (vec![0.0; n], da.clone());
    k.cpu.swiglu_backward(&mut dg, &mut du, &g, &u);
    let (gdg, gdu) = (k.up(&dg)?, k.up(&da)?);
    gpu.swiglu_backward(gdg.ptr(), gdu.ptr(), gg.ptr(), gu.ptr(), n)?;
    checks.push(Check::new(
        "swiglu backward d_gate",
        &gdg.to_host(gpu)?,
        &dg,
        ew,
    ));
    checks.push(Check::new(
        "swiglu backward d_up",
        &gdu.to_host(gpu)?,
        &du,
        ew,
    ));

    // Embedding.
    let (vocab, hidden, tokens) = (50, 24, 40);
    let table = k.rand(vocab * hidden);
    let ids: Vec<i32> = (0..tokens).map(|i| ((i * 7) % vocab) as i32).collect();
    let mut out = vec![0.0; tokens * hidden];
    k.cpu.embedding_forward(&mut out, &table, &ids, hidden);
    let (gt, gids, gout) = (k.up(&table)?, k.up_i32(&ids)?, k.up(&out)?);
    gpu.embedding_forward(gout.ptr(), gt.ptr(), gids.ptr(), tokens, hidden)?;
    checks.push(Check::new(
        "embedding forward",
        &gout.to_host(gpu)?,
        &out,
        ew,
    ));
    let d_out = k.rand(tokens * hidden);
    let mut d_table = table.clone();
    k.cpu.embedding_backward(&mut d_table, &d_out, &ids, hidden);
    let gdo = k.up(&d_out)?;
    gpu.embedding_backward(gt.ptr(), gdo.ptr(), gids.ptr(), tokens, hidden)?;
    checks.push(Check::new(
        "embedding backward (accumulate)",
        &gt.to_host(gpu)?,
        &d_table,
        ew,
    ));

    checks.extend(attention_checks(&mut k, gemm_tol)?);
    checks.extend(head_checks(&mut k, gemm_tol)?);

    // AdamW with a clipping factor.
    let n = 1000;
    let (w0, g, m0, v0) = (
        k.rand(n),
        k.rand(n),
        k.rand(n),
        k.rand(n).iter().map(|x| x.abs()).collect::<Vec<_>>(),
    );
    let adamw = OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let c = adamw.coeffs(3, 1e-3);
    let factor = 0.7;
    let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
    let scaled: Vec<f32> = g.iter().map(|x| x * factor).collect();
    update_elements(&adamw, &c, &mut w, &scaled, &mut m, &mut v);
    let (gw, gg, gm, gv) = (k.up(&w0)?, k.up(&g)?, k.up(&m0)?, k.up(&v0)?);
    gpu.adamw_update(
        gw.ptr(),
        gg.ptr(),
        gm.ptr(),
        gv.ptr(),
        n,
        factor,
        (0.9, 0.95, 1e-8),
        c.kernel_args(),
    )?;
    checks.push(Check::new("adamw weights", &gw.to_host(gpu)?, &w, ew));
    checks.push(Check::new("adamw exp_avg", &gm.to_host(gpu)?, &m, ew));
    checks.push(Check::new("adamw exp_avg_sq", &gv.to_host(gpu)?, &v, ew));
    Ok(checks)
}

fn attention_checks(k: &mut Kit<'_>, tol: f64) -> Result<Vec<Check>> {
    let gpu = k.gpu;
    let sh = AttnShape {
        batch: 2,
        seq: 48,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
    };
    let (n, w, kvw) = (
        sh.batch * sh.seq,
        sh.heads * sh.head_dim,
        sh.kv_heads * sh.head_dim,
    );
    let stats = sh.batch * sh.heads * sh.seq;
    let (q, kk, v, d_out) = (
        k.rand(n * w),
        k.rand(n * kvw),
        k.rand(n * kvw),
        k.rand(n * w),
    );
    let (mut out, mut lse) = (vec![0.0; n * w], vec![0.0; stats]);
    k.cpu.attention_forward(&mut out, &mut lse, &q, &kk, &v, sh);
    let (mut dq, mut dk, mut dv, mut delta) = (
        vec![0.0; n * w],
        vec![0.0; n * kvw],
        vec![0.0; n * kvw],
        vec![0.0; stats],
    );
    k.cpu.attention_backward(
        &mut dq, &mut dk, &mut dv, &mut delta, &d_out, &q, &kk, &v, &out, &lse, sh,
    );

    let (gq, gk, gv, gdo) = (k.up(&q)?, k.up(&kk)?, k.up(&v)?, k.up(&d_out)?);
    let zeros =
        |len: usize| GpuTensor::<f32>::zeros(gpu, &k.pool, "z", &[len], MemGroup::Activations);
    let (gout, glse, scores, d_scores) = (
        zeros(n * w)?,
        zeros(stats)?,
        zeros(sh.heads * sh.seq * sh.seq)?,
        zeros(sh.heads * sh.seq * sh.seq)?,
    );
    gpu.attention_forward(
        gout.ptr(),
        glse.ptr(),
        gq.ptr(),
        gk.ptr(),
        gv.ptr(),
        scores.ptr(),
        sh,
    )?;
    let (gdq, gdk, gdv, gdelta) = (
        zeros(n * w)?,
        zeros(n * kvw)?,
        zeros(n * kvw)?,
        zeros(stats)?,
    );
    gpu.attention_backward(
        (gdq.ptr(), gdk.ptr(), gdv.ptr(), gdelta.ptr()),
        gdo.ptr(),
        (gq.ptr(), gk.ptr(), gv.ptr(), gout.ptr(), glse.ptr()),
        (scores.ptr(), d_scores.ptr()),
        sh,
    )?;
    Ok(vec![
        Check::new(
            "attention forward out (GQA 4/2 heads)",
            &gout.to_host(gpu)?,
            &out,
            tol,
        ),
        Check::new("attention forward lse", &glse.to_host(gpu)?, &lse, tol),
        Check::new(
            "attention backward delta",
            &gdelta.to_host(gpu)?,
            &delta,
            tol,
        ),
        Check::new("attention backward dq", &gdq.to_host(gpu)?, &dq, tol),
        Check::new("attention backward dk", &gdk.to_host(gpu)?, &dk, tol),
        Check::new("attention backward dv", &gdv.to_host(gpu)?, &dv, tol),
    ])
}

fn head_checks(k: &mut Kit<'_>, tol: f64) -> Result<Vec<Check>> {
    let gpu = k.gpu;
    let (tokens, hidden, vocab) = (70, 32, 300);
    let sh = HeadShape {
        tokens,
        hidden,
        vocab,
        block: 64,
    };
    let (x, w) = (k.rand(tokens * hidden), k.rand(vocab * hidden));
    let targets: Vec<i32> = (0..tokens).map(|i| ((i * 13) % vocab) as i32).collect();
    let mut block = vec![0.0; 64 * vocab];
    let loss = k.cpu.head_ce_forward(&mut block, &x, &w, &targets, sh);
    let (mut dx, mut dw) = (vec![0.0; tokens * hidden], vec![0.0; vocab * hidden]);
    let scale = 1.0 / tokens as f32;
    k.cpu
        .head_ce_backward(&mut dx, &mut dw, &mut block, &x, &w, &targets, scale, sh);

    let (gx, gw, gt) = (k.up(&x)?, k.up(&w)?, k.up_i32(&targets)?);
    let zeros =
        |len: usize| GpuTensor::<f32>::zeros(gpu, &k.pool, "z", &[len], MemGroup::Activations);
    let (logits, rows, gdx, gdw) = (
        zeros(tokens * vocab)?,
        zeros(tokens)?,
        zeros(tokens * hidden)?,
        zeros(vocab * hidden)?,
    );
    gpu.gemm(
        logits.ptr(),
        gx.ptr(),
        gw.ptr(),
        Gemm::dense(tokens, vocab, hidden, false, true, false),
    )?;
    gpu.ce_forward(rows.ptr(), logits.ptr(), gt.ptr(), tokens, vocab)?;
    let gpu_loss: f64 = rows.to_host(gpu)?.iter().map(|&l| l as f64).sum();
    gpu.ce_backward(logits.ptr(), gt.ptr(), tokens, vocab, scale)?;
    gpu.gemm(
        gdw.ptr(),
        logits.ptr(),
        gx.ptr(),
        Gemm::dense(vocab, hidden, tokens, true, false, true),
    )?;
    gpu.gemm(
        gdx.ptr(),
        logits.ptr(),
        gw.ptr(),
        Gemm::dense(tokens, hidden, vocab, false, false, false),
    )?;
    Ok(vec![
        Check::new(
            "cross-entropy loss",
            &[gpu_loss as f32],
            &[loss as f32],
            tol,
        ),
        Check::new("cross-entropy backward dx", &gdx.to_host(gpu)?, &dx, tol),
        Check::new("cross-entropy backward dw", &gdw.to_host(gpu)?, &dw, tol),
    ])
}

fn microbatch(shape: MicroShape, input_ids: Vec<i32>, targets: Vec<i32>) -> Microbatch {
    Microbatch {
        step: 0,
        index: 0,
        shape,
        windows: Vec::new(),
        input_ids,
        targets,
    }
}

/// A fresh host copy of every part's layout (for downloads).
fn host_parts(config: &LlamaConfig, pool: &PoolRef) -> Result<Vec<PartParams>> {
    PartId::all(config.dims.layers)
        .into_iter()
        .map(|id| Ok(PartParams::allocate(pool, config, id)?))
        .collect()
}

/// One AdamW step (clipped at 1.0) of the fixture's batch, CPU against GPU, plus the PyTorch
/// reference for the loss, the gradient norm and every gradient.
pub fn model_checks(gpu: Gpu, fixture: &Path, tol: f64, own_grads: bool) -> Result<Vec<Check>> {
    let bad = |e: &dyn std::fmt::Display| {
        CudaError::Unsupported(format!("fixture {}: {e}", fixture.display()))
    };
    let config = read_hf_config(fixture).map_err(|e| bad(&e))?;
    let reference =
        TensorFile::open(&fixture.join("reference.safetensors")).map_err(|e| bad(&e))?;
    let (shape, input_ids) = reference.i32("input_ids").map_err(|e| bad(&e))?;
    let (_, targets) = reference.i32("targets").map_err(|e| bad(&e))?;
    let micro = MicroShape {
        batch: shape[0],
        seq: shape[1],
    };
    let host = Pool::new("cpu:0", usize::MAX);
    let ids = PartId::all(config.dims.layers);
    let mut cpu_parts = load_hf_parts(fixture, &config, &ids, &host).map_err(|e| bad(&e))?;
    let (lr, max_norm) = (1e-3, 1.0);
    let adamw = OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    let pool = gpu.pool(None, 1 << 30)?;
    let mut trainer = GpuTrainer::upload(
        gpu,
        pool,
        config,
        &cpu_parts,
        adamw,
        LrSchedule::constant(lr),
        Some(max_norm),
    )?;

    // CPU: forward and backward of the whole batch as one micro-batch.
    let backend = CpuBackend::default();
    let ctx = PartCtx {
        backend: &backend,
        pool: &host,
        config: &config,
        micro,
    };
    let tokens = MicroTokens {
        input_ids: &input_ids,
        targets: &targets,
    };
    let (stash, out) = forward_chunk(&ctx, &cpu_parts, None, tokens).map_err(CudaError::from)?;
    let PartOutput::LossSum(cpu_loss_sum) = out else {
        return Err(CudaError::Unsupported(
            "the model's last part is not the head".into(),
        ));
    };
    let scale = 1.0 / micro.tokens() as f32;
    backward_chunk(&ctx, &mut cpu_parts, stash, None, scale).map_err(CudaError::from)?;
    let cpu_loss = cpu_loss_sum / micro.tokens() as f64;

    // GPU: the same micro-batch.
    let gpu_loss = trainer.forward_backward(
        &microbatch(micro, input_ids.clone(), targets.clone()),
        scale,
    )? / micro.tokens() as f64;
    let mut gpu_parts = host_parts(&config, &host)?;
    for (g, h) in trainer.parts.iter().zip(gpu_parts.iter_mut()) {
        g.download(&trainer.gpu, h)?;
    }
    let torch = |name: &str| reference.f32(name).map(|(_, v)| v).map_err(|e| bad(&e));
    let mut checks = vec![
        Check::new("loss vs CPU", &[gpu_loss as f32], &[cpu_loss as f32], tol),
        Check::new("loss vs PyTorch", &[gpu_loss as f32], &torch("loss")?, tol),
    ];
    for (c, g) in cpu_parts.iter().zip(&gpu_parts) {
        for ((name, cg), gg) in c.names.iter().zip(&c.grads).zip(&g.grads) {
            checks.push(Check::new(
                format!("grad.{name} vs CPU"),
                gg.data(),
                cg.data(),
                tol,
            ));
            checks.push(Check::new(
                format!("grad.{name} vs PyTorch"),
                gg.data(),
                &torch(&format!("grad.{name}"))?,
                tol,
            ));
        }
    }
    let cpu_norm = global_norm(&cpu_parts.iter().map(part_squares).collect::<Vec<_>>());
    let gpu_norm = trainer.grad_norm()?;
    checks.push(Check::new(
        "grad_norm vs CPU",
        &[gpu_norm as f32],
        &[cpu_norm as f32],
        tol,
    ));
    checks.push(Check::new(
        "grad_norm vs PyTorch",
        &[gpu_norm as f32],
        &torch("grad_norm")?,
        tol,
    ));

    // One AdamW step with clipping on both.
    let cpu_grads: Vec<Vec<Vec<f32>>> = cpu_parts
        .iter()
        .map(|p| p.grads.iter().map(|g| g.data().to_vec()).collect())
        .collect();
    let factor = clip_factor(cpu_norm, max_norm);
    for p in &mut cpu_parts {
        scale_grads(p, factor);
        let mut state = PartOptimState::allocate(&host, &adamw, p)?;
        crate::exec::optim::step_part(&adamw, 1, lr, p, &mut state);
    }
    // With rounded products, AdamW's first step (about lr·sign(g)) turns the rounding noise
    // of near-zero gradients into whole steps; there the step runs on the CPU's gradients,
    // so it checks the update itself. Strict f32 runs it on the GPU's own gradients.
    let suffix = if own_grads {
        trainer.update(1, lr, clip_factor(gpu_norm, max_norm))?;
        ""
    } else {
        for (g, c) in trainer.parts.iter_mut().zip(&cpu_grads) {
            for (dst, src) in g.grads.iter_mut().zip(c) {
                dst.copy_from_host(&trainer.gpu, src)?;
            }
        }
        trainer.update(1, lr, factor)?;
        " (same gradients)"
    };
    for (g, h) in trainer.parts.iter().zip(gpu_parts.iter_mut()) {
        g.download(&trainer.gpu, h)?;
    }
    for (c, g) in cpu_parts.iter().zip(&gpu_parts) {
        for ((name, cw), gw) in c.names.iter().zip(&c.weights).zip(&g.weights) {
            let label = format!("adamw.{name} vs CPU{suffix}");
            checks.push(Check::new(label, gw.data(), cw.data(), tol));
        }
    }
    Ok(checks)
}

/// One row of the timing table.
#[derive(Debug, Clone)]
pub struct Timing {
    pub precision: Precision,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Model FLOPs per second over the GPU's dense peak for the precision, if known.
    pub mfu: Option<f64>,
    pub peak_bytes: usize,
    /// The planner's prediction for the same run (`cuda-f32` inventory, one-stage plan).
    pub predicted_peak_bytes: u64,
    /// Per-operation times of one extra step, when asked for (calls, seconds), longest first.
    pub profile: Vec<(String, u64, f64)>,
}

/// The ~125M-parameter Llama of the issue: hidden 768, 12 layers, 12 heads, FFN 2048.
pub fn llama_125m() -> LlamaConfig {
    LlamaConfig {
        dims: ModelDims {
            hidden: 768,
            layers: 12,
            heads: 12,
            kv_heads: 12,
            ffn: 2048,
            vocab: 32000,
        },
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
    }
}

/// Dense tensor-core peak in FLOP/s for the GPUs whose figures we know.
fn peak_flops(name: &str, precision: Precision) -> Option<f64> {
    let hopper = name.contains("H100") || name.contains("H200") || name.contains("GH200");
    let a100 = name.contains("A100");
    match precision {
        Precision::Bf16 if hopper => Some(989.4e12),
        Precision::Tf32 if hopper => Some(494.7e12),
        Precision::Bf16 if a100 => Some(312e12),
        Precision::Tf32 if a100 => Some(156e12),
        _ => None,
    }
}

/// Model FLOPs of one training step (forward + backward = 3x forward, causal attention).
pub fn step_flops(config: &LlamaConfig, micro: MicroShape, microbatches: usize) -> f64 {
    let d = &config.dims;
    let f = |p| part_forward_flops(Profile::CudaF32, d, micro, p);
    let forward = f(Part::Embedding) + d.layers as f64 * f(Part::Layer) + f(Part::Head);
    3.0 * forward * microbatches as f64
}

/// The planner's peak for training on one device: a one-stage 1F1B plan (each micro-batch's
/// forward then backward, the step at the end) simulated with the `cuda-f32` inventory.
pub fn predicted_peak(config: &LlamaConfig, micro: MicroShape, microbatches: usize) -> Result<u64> {
    let planner = |e: crate::plan::PlanError| CudaError::Unsupported(format!("planner: {e}"));
    let plan = build(
        ScheduleKind::OneFOneB,
        1,
        microbatches as u32,
        config.dims.layers as u32,
    )
    .map_err(planner)?;
    let hw = Hardware {
        peak_flops: 1e15,
        efficiency: 1.0,
        hbm_bytes_per_s: 1e12,
        p2p_bytes_per_s: 1e30,
        p2p_latency_s: 0.0,
        host_bytes_per_s: 1e30,
    };
    let costs = chunk_costs(&plan, Profile::CudaF32, &config.dims, micro, &hw);
    Ok(simulate(&plan, &costs, &hw, false)
        .map_err(planner)?
        .peak_bytes())
}

/// Times `steps` training steps (after `warmup`) of `config` on GPU `ordinal`.
pub fn time_training(
    ordinal: usize,
    precision: Precision,
    config: LlamaConfig,
    micro: MicroShape,
    microbatches: usize,
    (warmup, steps): (usize, usize),
    profile: bool,
) -> Result<Timing> {
    let gpu = Gpu::open(ordinal, precision)?;
    let host = Pool::new("host", usize::MAX);
    let mut parts = host_parts(&config, &host)?;
    for p in &mut parts {
        p.init_from_seed(1234);
    }
    let pool = gpu.pool(None, 1 << 30)?;
    let adamw = OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut trainer = GpuTrainer::upload(
        gpu,
        pool,
        config,
        &parts,
        adamw,
        LrSchedule::constant(3e-4),
        Some(1.0),
    )?;
    drop(parts);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let vocab = config.dims.vocab as i32;
    let batches: Vec<Microbatch> = (0..microbatches)
        .map(|_| {
            let ids: Vec<i32> = (0..micro.tokens() + 1)
                .map(|_| rng.gen_range(0..vocab))
                .collect();
            microbatch(micro, ids[..micro.tokens()].to_vec(), ids[1..].to_vec())
        })
        .collect();
    for _ in 0..warmup {
        trainer.train_step(&batches)?;
    }
    trainer.gpu.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        trainer.train_step(&batches)?;
    }
    trainer.gpu.synchronize()?;
    let secs = start.elapsed().as_secs_f64() / steps.max(1) as f64;
    let tokens = (micro.tokens() * microbatches) as f64;
    let mfu = peak_flops(&trainer.gpu.name, precision)
        .map(|p| step_flops(&config, micro, microbatches) / secs / p);
    let mut report = Vec::new();
    if profile {
        trainer.gpu.profile();
        trainer.train_step(&batches)?;
        report = trainer.gpu.profile_report();
    }
    Ok(Timing {
        precision,
        tokens_per_s: tokens / secs,
        step_ms: secs * 1e3,
        mfu,
        peak_bytes: trainer.pool.peak_bytes(),
        predicted_peak_bytes: predicted_peak(&config, micro, microbatches)?,
        profile: report,
    })
}

/// What `selftest --gpu` runs.
#[derive(Debug, Clone)]
pub struct SelftestOptions {
    pub device: usize,
    pub fixture: std::path::PathBuf,
    pub micro_batch_size: usize,
    pub microbatches: usize,
    pub steps: usize,
    pub skip_timing: bool,
    /// Also print where one step's time goes, operation by operation.
    pub profile: bool,
}

/// Prints a section's error and reports failure, so one broken section does not hide the rest.
fn section<T>(title: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            println!("\n{title}\n  FAIL {e}");
            None
        }
    }
}

/// Runs every check and prints the tables; `Ok(false)` when a check failed.
pub fn run(opts: &SelftestOptions) -> Result<bool> {
    let libs = Libraries::probe();
    println!("libraries: {libs}");
    libs.require_compute()?;
    let mut ok = true;
    for (precision, tol) in [(Precision::F32, 1e-5), (Precision::Tf32, 1e-3)] {
        let gpu = Gpu::open(opts.device, precision)?;
        if precision == Precision::F32 {
            let (free, total) = gpu.ctx.mem_get_info()?;
            let (major, minor) = gpu.ctx.compute_capability()?;
            println!(
                "device cuda:{}: {} (sm_{major}{minor}), {} MiB free of {} MiB",
                opts.device,
                gpu.name,
                free >> 20,
                total >> 20
            );
        }
        let title = format!("kernels vs CPU, products in {}", precision.name());
        ok &= section(&title, kernel_checks(&gpu, tol)).is_some_and(|c| print_checks(&title, &c));
        let title = format!(
            "hf-llama-tiny training step vs CPU and PyTorch, products in {}",
            precision.name()
        );
        ok &= section(
            &title,
            model_checks(gpu, &opts.fixture, tol, precision == Precision::F32),
        )
        .is_some_and(|c| print_checks(&title, &c));
    }
    if !opts.skip_timing {
        let config = llama_125m();
        let micro = MicroShape {
            batch: opts.micro_batch_size,
            seq: 1024,
        };
        println!(
            "\ntraining throughput: ~125M Llama (hidden 768, 12 layers, 12 heads, FFN 2048, \
             vocab 32000), seq 1024, {} x {} sequences per step, AdamW",
            opts.microbatches, opts.micro_batch_size
        );
        println!(
            "| precision | tokens/s | step ms | MFU | measured peak MiB | predicted peak MiB |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let mut profiles = Vec::new();
        for precision in [Precision::Tf32, Precision::Bf16] {
            let timed = time_training(
                opts.device,
                precision,
                config,
                micro,
                opts.microbatches,
                (2, opts.steps),
                opts.profile,
            );
            let Some(t) = section(precision.name(), timed) else {
                ok = false;
                continue;
            };
            let mfu = t.mfu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m));
            println!(
                "| {} | {:.0} | {:.1} | {mfu} | {:.1} | {:.1} |",
                precision.name(),
                t.tokens_per_s,
                t.step_ms,
                t.peak_bytes as f64 / MIB,
                t.predicted_peak_bytes as f64 / MIB
            );
            profiles.push((precision, t.profile));
        }
        for (precision, rows) in profiles.iter().filter(|(_, r)| !r.is_empty()) {
            let total: f64 = rows.iter().map(|r| r.2).sum();
            println!(
                "\none {} step, operation by operation (synchronised; total {:.1} ms)",
                precision.name(),
                total * 1e3
            );
            for (name, calls, secs) in rows.iter().take(25) {
                println!(
                    "  {:>7.2} ms {:>5.1}% {calls:>6}x  {name}",
                    secs * 1e3,
                    100.0 * secs / total
                );
            }
        }
    }
    println!(
        "\nnot run on the GPU yet: pipeline plans (the pipeline runtime drives CPU devices \
         only), NCCL transport, pinned-memory offload"
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::cost::model_params;
    use crate::plan::inventory::total_bytes;

    #[test]
    fn relative_error_is_infinite_for_mismatches_and_nans() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert!(!Check::new("x", &[2.0], &[1.0], 1e-3).passed());
    }

    /// The timing run's predicted peak holds the f32 states (16 bytes per parameter) and one
    /// micro-batch's stashes, never two: micro-batches run one after another.
    #[test]
    fn predicted_peak_of_the_timing_run_is_states_plus_one_microbatch() {
        let config = llama_125m();
        let micro = MicroShape {
            batch: 8,
            seq: 1024,
        };
        let states = 16 * model_params(&config.dims);
        let stash = |p| total_bytes(&Profile::CudaF32.part(&config.dims, micro, p).stash) as u64;
        let one_mb = stash(Part::Embedding) + 12 * stash(Part::Layer) + stash(Part::Head);
        let peak = predicted_peak(&config, micro, 2).unwrap();
        assert!(peak > states + one_mb, "{peak} <= {states} + {one_mb}");
        assert!(
            peak < states + 2 * one_mb,
            "{peak} >= {states} + 2 x {one_mb}"
        );
        assert_eq!(peak, predicted_peak(&config, micro, 4).unwrap());
        println!("predicted peak {:.1} MiB", peak as f64 / MIB);
    }
}
