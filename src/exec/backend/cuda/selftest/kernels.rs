//! Every kernel against its CPU counterpart on random inputs.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Check, Result, cpu_attention};
use crate::data::IGNORE_TARGET;
use crate::exec::backend::CpuBackend;
use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::cpu::kernels::cross_entropy::HeadShape;
use crate::exec::backend::cpu::kernels::matmul::MatRef;
use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::backend::cuda::gemm::Gemm;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::device::{MemGroup, Pool, PoolRef};
use crate::exec::optim::{OptimizerConfig, update_elements};
use crate::plan::inventory::DType;
use crate::spec::RopeScaling;

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// A device tensor's f32 values.
fn down(gpu: &Gpu, t: &GpuTensor) -> Result<Vec<f32>> {
    t.to_host(gpu)
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
    fn up_i32(&self, data: &[i32]) -> Result<GpuTensor> {
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

/// Elementwise kernels' bound against the CPU backend.
const ELEMENTWISE_TOL: f64 = 1e-5;

/// Every kernel against its CPU counterpart on random inputs; products held to `gemm_tol`.
pub fn kernel_checks(gpu: &Gpu, gemm_tol: f64) -> Result<Vec<Check>> {
    let mut k = Kit {
        gpu,
        pool: Pool::new("cuda-check", usize::MAX),
        cpu: CpuBackend::default(),
        rng: ChaCha8Rng::seed_from_u64(11),
    };
    let mut checks = product_checks(&mut k, gemm_tol)?;
    checks.extend(norm_and_rope_checks(&mut k)?);
    checks.extend(swiglu_and_embedding_checks(&mut k)?);
    checks.extend(attention_checks(&mut k, gemm_tol)?);
    checks.extend(head_checks(&mut k, gemm_tol)?);
    checks.extend(adamw_checks(&mut k)?);
    Ok(checks)
}

/// Products, plain and transposed, against the CPU backend's.
fn product_checks(k: &mut Kit<'_>, gemm_tol: f64) -> Result<Vec<Check>> {
    let gpu = k.gpu;
    let mut checks = Vec::new();
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
            &down(gpu, &gc)?,
            &want,
            gemm_tol,
        ));
    }
    Ok(checks)
}

/// RMSNorm and RoPE, forward and backward.
fn norm_and_rope_checks(k: &mut Kit<'_>) -> Result<Vec<Check>> {
    let gpu = k.gpu;
    let mut checks = Vec::new();
    // RMSNorm forward and backward: rows of 768 in 16-byte vectors, rows of 203 element by
    // element; 37 rows leave warps of the last block idle.
    let rows = 37;
    for h in [768, 203] {
        let (x, w, dy, dw0) = (k.rand(rows * h), k.rand(h), k.rand(rows * h), k.rand(h));
        let (mut out, mut rstd) = (vec![0.0; rows * h], vec![0.0; rows]);
        k.cpu.rmsnorm_forward(&mut out, &mut rstd, &x, &w, 1e-5);
        let (gx, gw, go, gr) = (k.up(&x)?, k.up(&w)?, k.up(&out)?, k.up(&rstd)?);
        gpu.rmsnorm_forward(go.ptr(), gr.ptr(), gx.ptr(), gw.ptr(), rows, h, 1e-5)?;
        checks.push(Check::new(
            format!("rmsnorm forward h={h}"),
            &down(gpu, &go)?,
            &out,
            ELEMENTWISE_TOL,
        ));
        checks.push(Check::new(
            format!("rmsnorm forward rstd h={h}"),
            &down(gpu, &gr)?,
            &rstd,
            ELEMENTWISE_TOL,
        ));
        let (mut dx, mut dw) = (dy.clone(), dw0.clone());
        k.cpu.rmsnorm_backward(&mut dx, &mut dw, &x, &w, &rstd);
        let (gdy, gdw) = (k.up(&dy)?, k.up(&dw0)?);
        gpu.rmsnorm_backward(gdy.ptr(), gdw.ptr(), gx.ptr(), gw.ptr(), gr.ptr(), rows, h)?;
        checks.push(Check::new(
            format!("rmsnorm backward dx h={h}"),
            &down(gpu, &gdy)?,
            &dx,
            ELEMENTWISE_TOL,
        ));
        checks.push(Check::new(
            format!("rmsnorm backward dw (accumulate) h={h}"),
            &down(gpu, &gdw)?,
            &dw,
            ELEMENTWISE_TOL,
        ));
    }

    // RoPE and its inverse, at angles up to 511 radians; the second shape with Llama 3.1's
    // frequency scaling.
    let llama3 = Rope {
        theta: 500000.0,
        scaling: Some(RopeScaling::LLAMA_3_1),
    };
    for ((seq, width, hd, rope), inverse) in
        [(512, 128, 64, Rope::plain(10000.0)), (37, 48, 16, llama3)]
            .into_iter()
            .flat_map(|shape| [(shape, false), (shape, true)])
    {
        let x = k.rand(2 * seq * width);
        let mut want = x.clone();
        k.cpu.rope(&mut want, width, seq, hd, &rope, inverse);
        let gx = k.up(&x)?;
        gpu.rope(gx.ptr(), 2 * seq, width, seq, hd, &rope, inverse)?;
        checks.push(Check::new(
            format!(
                "rope seq={seq} head_dim={hd} scaling={} inverse={inverse}",
                rope.scaling.map_or("none", |s| s.name())
            ),
            &down(gpu, &gx)?,
            &want,
            ELEMENTWISE_TOL,
        ));
    }
    Ok(checks)
}

/// SwiGLU and the embedding, forward and backward.
fn swiglu_and_embedding_checks(k: &mut Kit<'_>) -> Result<Vec<Check>> {
    let gpu = k.gpu;
    let mut checks = Vec::new();
    // SwiGLU: 16-byte vectors, then a ragged tail.
    let n = 1003;
    let (g, u, da) = (k.rand(n), k.rand(n), k.rand(n));
    let mut act = vec![0.0; n];
    k.cpu.swiglu_forward(&mut act, &g, &u);
    let (gg, gu, gact) = (k.up(&g)?, k.up(&u)?, k.up(&act)?);
    gpu.swiglu_forward(gact.ptr(), gg.ptr(), gu.ptr(), n)?;
    checks.push(Check::new(
        "swiglu forward",
        &down(gpu, &gact)?,
        &act,
        ELEMENTWISE_TOL,
    ));
    let (mut dg, mut du) = (vec![0.0; n], da.clone());
    k.cpu.swiglu_backward(&mut act, &mut dg, &mut du, &g, &u);
    let (gdg, gdu) = (k.up(&dg)?, k.up(&da)?);
    gpu.swiglu_backward(gdg.ptr(), gdu.ptr(), gg.ptr(), gu.ptr(), n)?;
    checks.push(Check::new(
        "swiglu backward d_gate",
        &down(gpu, &gdg)?,
        &dg,
        ELEMENTWISE_TOL,
    ));
    checks.push(Check::new(
        "swiglu backward d_up",
        &down(gpu, &gdu)?,
        &du,
        ELEMENTWISE_TOL,
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
        &down(gpu, &gout)?,
        &out,
        ELEMENTWISE_TOL,
    ));
    let d_out = k.rand(tokens * hidden);
    let mut d_table = table.clone();
    k.cpu.embedding_backward(&mut d_table, &d_out, &ids, hidden);
    let gdo = k.up(&d_out)?;
    gpu.embedding_backward(gt.ptr(), gdo.ptr(), gids.ptr(), tokens, hidden)?;
    checks.push(Check::new(
        "embedding backward (accumulate)",
        &down(gpu, &gt)?,
        &d_table,
        ELEMENTWISE_TOL,
    ));
    Ok(checks)
}

/// One AdamW step with a clipping factor.
fn adamw_checks(k: &mut Kit<'_>) -> Result<Vec<Check>> {
    let gpu = k.gpu;
    let mut checks = Vec::new();
    // AdamW with a clipping factor.
    let n = 1003;
    let (w0, g, m0, v0) = (
        k.rand(n),
        k.rand(n),
        k.rand(n),
        k.rand(n).iter().map(|x| x.abs()).collect::<Vec<_>>(),
    );
    let adamw = OptimizerConfig::default();
    let c = adamw.coeffs(3, 1e-3);
    let factor = 0.7;
    let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
    update_elements(&adamw, &c, factor, &mut w, &mut g.clone(), &mut m, &mut v);
    let (gw, gg, gm, gv) = (k.up(&w0)?, k.up(&g)?, k.up(&m0)?, k.up(&v0)?);
    // The copy of the weights the products would read (f32 here: activations are f32).
    let copy = k.up(&vec![0.0; n])?;
    gpu.adamw_update(
        gw.ptr(),
        Some(copy.ptr()),
        gg.ptr(),
        gm.ptr(),
        gv.ptr(),
        n,
        factor,
        (0.9, 0.95, 1e-8),
        c.kernel_args(),
    )?;
    checks.push(Check::new(
        "adamw weights",
        &down(gpu, &gw)?,
        &w,
        ELEMENTWISE_TOL,
    ));
    checks.push(Check::new(
        "adamw exp_avg",
        &down(gpu, &gm)?,
        &m,
        ELEMENTWISE_TOL,
    ));
    checks.push(Check::new(
        "adamw exp_avg_sq",
        &down(gpu, &gv)?,
        &v,
        ELEMENTWISE_TOL,
    ));
    let left = down(gpu, &gg)?
        .iter()
        .fold(0.0f64, |m, &x| m.max(x.abs() as f64));
    checks.push(Check {
        name: "adamw clears the gradients (largest left)".into(),
        rel_err: left,
        tolerance: f64::MIN_POSITIVE,
    });
    checks.push(Check::new(
        "adamw's copy of the weights vs the weights",
        &down(gpu, &copy)?,
        &down(gpu, &gw)?,
        f64::MIN_POSITIVE,
    ));
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
    let inputs = [
        k.rand(n * w),
        k.rand(n * kvw),
        k.rand(n * kvw),
        k.rand(n * w),
    ];
    let [out, lse, dq, dk, dv, delta] = cpu_attention(&inputs, sh);
    let [q, kk, v, d_out] = &inputs;

    let (gq, gk, gv, gdo) = (k.up(q)?, k.up(kk)?, k.up(v)?, k.up(d_out)?);
    let zeros =
        |len: usize| GpuTensor::zeros(gpu, &k.pool, "z", &[len], DType::F32, MemGroup::Activations);
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
            &down(gpu, &gout)?,
            &out,
            tol,
        ),
        Check::new("attention forward lse", &down(gpu, &glse)?, &lse, tol),
        Check::new(
            "attention backward delta",
            &down(gpu, &gdelta)?,
            &delta,
            tol,
        ),
        Check::new("attention backward dq", &down(gpu, &gdq)?, &dq, tol),
        Check::new("attention backward dk", &down(gpu, &gdk)?, &dk, tol),
        Check::new("attention backward dv", &down(gpu, &gdv)?, &dv, tol),
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
    // Every seventh target is masked: both backends must give it no loss and no gradient.
    let targets: Vec<i32> = (0..tokens)
        .map(|i| match i % 7 {
            3 => IGNORE_TARGET,
            _ => ((i * 13) % vocab) as i32,
        })
        .collect();
    let mut block = vec![0.0; 64 * vocab];
    let loss = k.cpu.head_ce_forward(&mut block, &x, &w, &targets, sh);
    let (mut dx, mut dw) = (vec![0.0; tokens * hidden], vec![0.0; vocab * hidden]);
    let scale = 1.0 / tokens as f32;
    k.cpu
        .head_ce_backward(&mut dx, &mut dw, &mut block, &x, &w, &targets, scale, sh);

    let (gx, gw, gt) = (k.up(&x)?, k.up(&w)?, k.up_i32(&targets)?);
    let zeros =
        |len: usize| GpuTensor::zeros(gpu, &k.pool, "z", &[len], DType::F32, MemGroup::Activations);
    let (logits, rows, fused_rows, gdx, gdw) = (
        zeros(tokens * vocab)?,
        zeros(tokens)?,
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
    let gpu_loss: f64 = down(gpu, &rows)?.iter().map(|&l| l as f64).sum();
    let fused = Some(fused_rows.ptr());
    gpu.ce_backward(logits.ptr(), fused, gt.ptr(), tokens, vocab, scale)?;
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
        Check::new(
            "cross-entropy losses written by the backward vs the forward's",
            &down(gpu, &fused_rows)?,
            &down(gpu, &rows)?,
            1e-7,
        ),
        Check::new("cross-entropy backward dx", &down(gpu, &gdx)?, &dx, tol),
        Check::new("cross-entropy backward dw", &down(gpu, &gdw)?, &dw, tol),
    ])
}
