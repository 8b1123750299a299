//! One function per kernel of `kernels/*.cu` (matrix products are `gemm`'s; the attention
//! kernels' are `attention_kernels`').
//! Pointers come from [`GpuTensor`](super::tensor::GpuTensor)s; callers pass the shapes the
//! buffers were made for (a wrong shape reads or writes out of bounds, as any kernel would).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::gpu::{Gpu, Work};
use crate::exec::backend::cuda::kernel_args::{Arg, RopeFreqs};
use crate::exec::backend::cuda::limits::{MAX_HEAD_DIM, ROPE_MAX_HALF};
use crate::plan::inventory::DType;

type R = Result<(), CudaError>;

impl Gpu {
    /// Launches kernel `name` with `args` in the order of its signature in kernels/*.cu; `work`
    /// is what it computes or moves, for the profile's rates.
    pub(crate) fn launch(
        &self,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[Arg<'_>],
        work: Work,
    ) -> R {
        let f = self.function(name)?;
        self.timed(
            || name.to_string(),
            work,
            || {
                let mut builder = self.stream.launch_builder(f);
                for a in args {
                    match a {
                        Arg::Ptr(p) => builder.arg(&p.addr),
                        Arg::I32(v) => builder.arg(v),
                        Arg::I64(v) => builder.arg(v),
                        Arg::F32(v) => builder.arg(v),
                        Arg::RopeFreqs(v) => builder.arg(*v),
                        Arg::GroupPointers(v) => builder.arg(*v),
                    };
                }
                // SAFETY: the argument list matches the kernel's signature, and the buffers
                // behind the pointers are at least as long as the shapes the caller passed.
                unsafe { builder.launch(cfg) }?;
                Ok(())
            },
        )
    }
}

use Arg::{F32, I32, I64, Ptr};

const BLOCK: u32 = 256;

/// One block of 256 threads per row.
pub(super) fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, `CP_RMS_ROWS` (kernels/rmsnorm.cu) rows to a 256-thread block.
pub(super) fn warp_per_row(rows: usize) -> LaunchConfig {
    const ROWS_PER_BLOCK: usize = 8;
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Enough 256-thread blocks for `n` elements, capped (the kernels loop over the rest).
pub(super) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 16384) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn len(n: usize) -> Arg<'static> {
    I64(n as i64)
}

pub(super) fn int(n: usize) -> Arg<'static> {
    I32(n as i32)
}

impl Gpu {
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_forward(
        &self,
        out: DevPtr,
        rstd: DevPtr,
        x: DevPtr,
        w: DevPtr,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> R {
        self.launch(
            "rmsnorm_forward",
            warp_per_row(rows),
            &[
                Ptr(out),
                Ptr(rstd),
                Ptr(x),
                Ptr(w),
                int(rows),
                int(h),
                F32(eps),
            ],
            Work::moving(rows * h, &[x, out]),
        )
    }

    pub fn rmsnorm_apply(
        &self,
        out: DevPtr,
        rstd: DevPtr,
        x: DevPtr,
        w: DevPtr,
        rows: usize,
        h: usize,
    ) -> R {
        self.launch(
            "rmsnorm_apply",
            warp_per_row(rows),
            &[Ptr(out), Ptr(rstd), Ptr(x), Ptr(w), int(rows), int(h)],
            Work::moving(rows * h, &[x, out]),
        )
    }

    /// `dw += Σ dy·x·rstd`, then `dy` becomes `dx` in place.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward(
        &self,
        dy_dx: DevPtr,
        dw: DevPtr,
        x: DevPtr,
        w: DevPtr,
        rstd: DevPtr,
        rows: usize,
        h: usize,
    ) -> R {
        // Blocks of 256 threads (each one column, or 16 bytes of columns) by groups of 16
        // rows; past the grid's y limit, each block takes every `grid.y`-th group.
        const ROWS_PER_BLOCK: usize = 16;
        const MAX_GRID_Y: usize = 65_535;
        let cfg = LaunchConfig {
            grid_dim: (
                h.div_ceil(BLOCK as usize) as u32,
                rows.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_GRID_Y) as u32,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "rmsnorm_backward_weight",
            cfg,
            &[
                Ptr(dw),
                Ptr(dy_dx),
                Ptr(x),
                Ptr(rstd),
                int(rows),
                int(h),
                int(ROWS_PER_BLOCK),
            ],
            Work::moving(rows * h, &[dy_dx, x]),
        )?;
        self.launch(
            "rmsnorm_backward_input",
            warp_per_row(rows),
            &[Ptr(dy_dx), Ptr(x), Ptr(w), Ptr(rstd), int(rows), int(h)],
            Work::moving(rows * h, &[dy_dx, x, dy_dx]),
        )
    }

    /// Rotates `rows` rows of `width = heads * head_dim` in place by their positions in
    /// sequences of `seq` rows (see kernels/rope.cu); `inverse` turns the other way.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: DevPtr,
        rows: usize,
        width: usize,
        seq: usize,
        head_dim: usize,
        rope: &Rope,
        inverse: bool,
    ) -> R {
        let half = head_dim / 2;
        if !head_dim.is_multiple_of(2)
            || half == 0
            || half > ROPE_MAX_HALF
            || !width.is_multiple_of(head_dim)
        {
            return Err(CudaError::Unsupported(format!(
                "rope: head dimension {head_dim} in rows of {width} (the kernel takes even head \
                 dimensions from 2 to {MAX_HEAD_DIM} that divide the row)"
            )));
        }
        let mut freqs = RopeFreqs([0.0; ROPE_MAX_HALF]);
        freqs.0[..half].copy_from_slice(&rope.inv_freq(head_dim));
        let rows_per_block = BLOCK as usize / half;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(rows_per_block).clamp(1, 16384) as u32, 1, 1),
            block_dim: ((rows_per_block * half) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "rope",
            cfg,
            &[
                Ptr(x),
                int(rows),
                int(width),
                int(seq),
                int(head_dim),
                Arg::RopeFreqs(&freqs),
                I32(inverse as i32),
            ],
            Work::moving(rows * width, &[x, x]),
        )
    }

    /// Threads for a kernel that moves `n` activations in 16-byte vectors (kernels/common.cuh's
    /// `cp_acts`).
    fn act_vectors(&self, n: usize) -> LaunchConfig {
        elementwise(n.div_ceil(16 / self.precision.activations().bytes()))
    }

    pub fn swiglu_forward(&self, act: DevPtr, gate: DevPtr, up: DevPtr, n: usize) -> R {
        self.launch(
            "swiglu_forward",
            self.act_vectors(n),
            &[Ptr(act), Ptr(gate), Ptr(up), len(n)],
            Work::moving(n, &[gate, up, act]),
        )
    }

    pub fn swiglu_backward(
        &self,
        d_gate: DevPtr,
        d_act_to_d_up: DevPtr,
        gate: DevPtr,
        up: DevPtr,
        n: usize,
    ) -> R {
        self.launch(
            "swiglu_backward",
            self.act_vectors(n),
            &[Ptr(d_gate), Ptr(d_act_to_d_up), Ptr(gate), Ptr(up), len(n)],
            Work::moving(n, &[gate, up, d_act_to_d_up, d_act_to_d_up, d_gate]),
        )
    }

    pub fn embedding_forward(
        &self,
        out: DevPtr,
        table: DevPtr,
        ids: DevPtr,
        tokens: usize,
        hidden: usize,
    ) -> R {
        self.launch(
            "embedding_forward",
            elementwise(tokens * hidden),
            &[Ptr(out), Ptr(table), Ptr(ids), len(tokens), int(hidden)],
            Work::moving(tokens * hidden, &[table, out]),
        )
    }

    pub fn embedding_backward(
        &self,
        d_table: DevPtr,
        d_out: DevPtr,
        ids: DevPtr,
        tokens: usize,
        hidden: usize,
    ) -> R {
        self.launch(
            "embedding_backward",
            elementwise(tokens * hidden),
            &[Ptr(d_table), Ptr(d_out), Ptr(ids), len(tokens), int(hidden)],
            Work::moving(tokens * hidden, &[d_out, d_table, d_table]),
        )
    }

    /// `out = a + b` over `n` elements; `out` may be `a`.
    pub fn add(&self, out: DevPtr, a: DevPtr, b: DevPtr, n: usize) -> R {
        self.launch(
            "add",
            self.act_vectors(n),
            &[Ptr(out), Ptr(a), Ptr(b), len(n)],
            Work::moving(n, &[a, b, out]),
        )
    }

    /// `y[r, c] += b[c]` over `rows` rows of `width` (a projection's bias).
    pub fn bias_add(&self, y: DevPtr, b: DevPtr, rows: usize, width: usize) -> R {
        self.launch(
            "bias_add",
            elementwise(rows * width),
            &[Ptr(y), Ptr(b), len(rows), int(width)],
            Work::moving(rows * width, &[y, y]),
        )
    }

    /// `db[c] += Σ_r dy[r, c]` over `rows` rows of `width` (a projection bias's gradient).
    pub fn bias_backward(&self, db: DevPtr, dy: DevPtr, rows: usize, width: usize) -> R {
        // As RMSNorm's weight gradient: a thread a column, blocks by groups of 16 rows.
        const ROWS_PER_BLOCK: usize = 16;
        const MAX_GRID_Y: usize = 65_535;
        let cfg = LaunchConfig {
            grid_dim: (
                width.div_ceil(BLOCK as usize) as u32,
                rows.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_GRID_Y) as u32,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "bias_backward",
            cfg,
            &[Ptr(db), Ptr(dy), int(rows), int(width), int(ROWS_PER_BLOCK)],
            Work::moving(rows * width, &[dy]),
        )
    }

    /// `out` (activation type) = `x` (f32) over `n` elements, rounded.
    pub fn cast_to_act(&self, out: DevPtr, x: DevPtr, n: usize) -> R {
        self.launch(
            "cast_to_act",
            self.act_vectors(n),
            &[Ptr(out), Ptr(x), len(n)],
            Work::moving(n, &[x, out]),
        )
    }

    /// Per-row losses `lse(logits) - logits[target]` of `rows` rows.
    pub fn ce_forward(
        &self,
        loss_rows: DevPtr,
        logits: DevPtr,
        targets: DevPtr,
        rows: usize,
        vocab: usize,
    ) -> R {
        self.launch(
            "ce_forward",
            per_row(rows),
            &[Ptr(loss_rows), Ptr(logits), Ptr(targets), int(vocab)],
            Work::moving(rows * vocab, &[logits]),
        )
    }

    /// Logits become `scale · (softmax - one_hot(target))` in place; with `loss_rows`, each
    /// row's loss is written there too, as [`Gpu::ce_forward`] would (one pass over the logits
    /// fewer when the loss and the gradient are both wanted).
    pub fn ce_backward(
        &self,
        logits: DevPtr,
        loss_rows: Option<DevPtr>,
        targets: DevPtr,
        rows: usize,
        vocab: usize,
        scale: f32,
    ) -> R {
        self.launch(
            "ce_backward",
            per_row(rows),
            &[
                Ptr(logits),
                Ptr(or_null(loss_rows)),
                Ptr(targets),
                int(vocab),
                F32(scale),
            ],
            // The log-sum-exp pass, then the gradient's read and write.
            Work::moving(rows * vocab, &[logits, logits, logits]),
        )
    }

    /// AdamW on `n` weights, clearing their gradients; with `w_act`, the updated weights are
    /// also written there in the activations' type (a weight's bf16 copy).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update(
        &self,
        w: DevPtr,
        w_act: Option<DevPtr>,
        g: DevPtr,
        m: DevPtr,
        v: DevPtr,
        n: usize,
        factor: f32,
        (beta1, beta2, eps): (f32, f32, f32),
        (decay, step_size, bc2_sqrt): (f32, f32, f32),
    ) -> R {
        self.launch(
            "adamw_update",
            elementwise(n),
            &[
                Ptr(w),
                Ptr(or_null(w_act)),
                Ptr(g),
                Ptr(m),
                Ptr(v),
                len(n),
                F32(factor),
                F32(beta1),
                F32(beta2),
                F32(eps),
                F32(decay),
                F32(step_size),
                F32(bc2_sqrt),
            ],
            Work::moving(n, &[w, g, m, v, w, g, m, v]).and(Work::moving(n, w_act.as_slice())),
        )
    }

    /// SGD on `n` weights, clearing their gradients; `w_act` as for [`Gpu::adamw_update`].
    pub fn sgd_update(
        &self,
        w: DevPtr,
        w_act: Option<DevPtr>,
        g: DevPtr,
        n: usize,
        factor: f32,
        lr: f32,
    ) -> R {
        self.launch(
            "sgd_update",
            elementwise(n),
            &[
                Ptr(w),
                Ptr(or_null(w_act)),
                Ptr(g),
                len(n),
                F32(factor),
                F32(lr),
            ],
            Work::moving(n, &[w, g, w, g]).and(Work::moving(n, w_act.as_slice())),
        )
    }

    /// `acc += x` over `n` f32 elements (one replica's gradient into the sum of those before).
    pub fn replica_add(&self, acc: DevPtr, x: DevPtr, n: usize) -> R {
        self.launch(
            "replica_add",
            elementwise(n),
            &[Ptr(acc), Ptr(x), len(n)],
            Work::moving(n, &[acc, x, acc]),
        )
    }

    /// `*acc += Σ x²` in f64 (`acc` addresses one double).
    pub fn sum_squares(&self, acc: DevPtr, x: DevPtr, n: usize) -> R {
        let mut cfg = elementwise(n);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
        self.launch(
            "sum_squares",
            cfg,
            &[Ptr(acc), Ptr(x), len(n)],
            Work::moving(n, &[x]),
        )
    }
}

/// A kernel's optional pointer argument: null when absent.
fn or_null(p: Option<DevPtr>) -> DevPtr {
    p.unwrap_or(DevPtr::new(0, DType::F32))
}
