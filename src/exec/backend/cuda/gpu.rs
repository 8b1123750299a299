//! One CUDA device: its context, the stream every kernel and product runs on, a copy stream for
//! offload and prefetch (`offload`), a cuBLAS handle and the kernels of `kernels/*.cu`, compiled by NVRTC for the device's architecture the first
//! time a device of that architecture is opened, and loaded into each context that opens.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, sys};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::exec::backend::cuda::dev_ptr::DevPtr;
use crate::exec::backend::cuda::libs::Libraries;
use crate::exec::backend::cuda::limits::{GROUP_MAX, flash_shared_bytes};
use crate::exec::backend::cuda::pinned::PinnedCache;
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::device::{Pool, PoolRef};
use crate::plan::inventory::DType;

/// The kernel sources, compiled together as one program (the header first).
pub const KERNEL_SOURCES: [(&str, &str); 12] = [
    ("common.cuh", include_str!("../../../../kernels/common.cuh")),
    ("rmsnorm.cu", include_str!("../../../../kernels/rmsnorm.cu")),
    ("rope.cu", include_str!("../../../../kernels/rope.cu")),
    ("swiglu.cu", include_str!("../../../../kernels/swiglu.cu")),
    (
        "embedding.cu",
        include_str!("../../../../kernels/embedding.cu"),
    ),
    (
        "attention.cu",
        include_str!("../../../../kernels/attention.cu"),
    ),
    (
        "cross_entropy.cu",
        include_str!("../../../../kernels/cross_entropy.cu"),
    ),
    ("optim.cu", include_str!("../../../../kernels/optim.cu")),
    (
        "elementwise.cu",
        include_str!("../../../../kernels/elementwise.cu"),
    ),
    (
        "product_group.cu",
        include_str!("../../../../kernels/product_group.cu"),
    ),
    ("bias.cu", include_str!("../../../../kernels/bias.cu")),
    (
        "replica_sum.cu",
        include_str!("../../../../kernels/replica_sum.cu"),
    ),
];

/// The flash-attention kernels, compiled after [`KERNEL_SOURCES`] and built only with bf16
/// activations: per head dimension and [`FlashLoads`] variant, a forward and a backward kernel
/// ([`FLASH_KERNELS`]).
pub const FLASH_SOURCE: &str = include_str!("../../../../kernels/flash_attention.cu");

/// How the flash kernels load tensor-core fragments from shared memory. Both variants compute
/// the same products; which is faster is for a GPU to tell (`selftest --gpu` times both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashLoads {
    /// 32- and 16-bit shared loads, one or two elements of a fragment register at a time.
    Scalar,
    /// `ldmatrix`: four 8x8 matrices (transposed where the product needs it) per instruction.
    Ldmatrix,
}

impl FlashLoads {
    pub const EACH: [FlashLoads; 2] = [FlashLoads::Scalar, FlashLoads::Ldmatrix];

    pub fn name(self) -> &'static str {
        match self {
            FlashLoads::Scalar => "scalar loads",
            FlashLoads::Ldmatrix => "ldmatrix",
        }
    }
}

/// The flash kernels: head dimension, fragment loads, forward and backward.
pub const FLASH_KERNELS: [(usize, FlashLoads, &str, &str); 8] = [
    (
        16,
        FlashLoads::Scalar,
        "flash_forward_16",
        "flash_backward_16",
    ),
    (
        32,
        FlashLoads::Scalar,
        "flash_forward_32",
        "flash_backward_32",
    ),
    (
        64,
        FlashLoads::Scalar,
        "flash_forward_64",
        "flash_backward_64",
    ),
    (
        128,
        FlashLoads::Scalar,
        "flash_forward_128",
        "flash_backward_128",
    ),
    (
        16,
        FlashLoads::Ldmatrix,
        "flash_forward_ldsm_16",
        "flash_backward_ldsm_16",
    ),
    (
        32,
        FlashLoads::Ldmatrix,
        "flash_forward_ldsm_32",
        "flash_backward_ldsm_32",
    ),
    (
        64,
        FlashLoads::Ldmatrix,
        "flash_forward_ldsm_64",
        "flash_backward_ldsm_64",
    ),
    (
        128,
        FlashLoads::Ldmatrix,
        "flash_forward_ldsm_128",
        "flash_backward_ldsm_128",
    ),
];

/// Every `extern "C" __global__` function in [`KERNEL_SOURCES`].
pub fn kernel_names() -> Vec<&'static str> {
    let mut names = Vec::new();
    for (_, src) in KERNEL_SOURCES {
        for line in src.lines() {
            if let Some(rest) = line.trim().strip_prefix("extern \"C\" __global__ void ") {
                names.push(rest.split('(').next().unwrap_or(rest).trim());
            }
        }
    }
    names
}

/// The whole program NVRTC compiles.
pub fn kernel_program() -> String {
    KERNEL_SOURCES
        .iter()
        .map(|(name, src)| format!("// ---- kernels/{name}\n{src}\n"))
        .chain([format!(
            "// ---- kernels/flash_attention.cu\n{FLASH_SOURCE}\n"
        )])
        .collect()
}

/// Compiles the kernels to PTX for `compute_{major}{minor}` with activations stored as
/// `activations` (f32 or bf16: the kernels' `act_t`). Needs NVRTC, not a device.
pub fn compile_kernels(major: i32, minor: i32, activations: DType) -> Result<Ptx, CudaError> {
    let mut options = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    match activations {
        DType::F32 => {}
        DType::Bf16 => options.push("-DCP_ACT_BF16".to_string()),
        other => {
            return Err(CudaError::Unsupported(format!(
                "activations stored as {other:?} (f32 or bf16 are)"
            )));
        }
    }
    let opts = CompileOptions {
        options,
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(kernel_program(), opts)
        .map_err(|e| CudaError::Compile(e.to_string()))
}

/// The kernels' PTX for an architecture and activation type, compiled on first use and kept
/// for the process.
fn cached_kernels(major: i32, minor: i32, activations: DType) -> Result<Ptx, CudaError> {
    type Cache = BTreeMap<(i32, i32, bool), String>;
    static CACHE: Mutex<Cache> = Mutex::new(BTreeMap::new());
    let key = (major, minor, activations == DType::Bf16);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(src) = cache.get(&key) {
        return Ok(Ptx::from_src(src.clone()));
    }
    let ptx = compile_kernels(major, minor, activations)?;
    cache.insert(key, ptx.to_src());
    Ok(ptx)
}

/// Makes the device's stream-ordered allocator keep the memory it frees for reuse. cudarc
/// allocates every buffer from the device's default memory pool (`cuMemAllocAsync`), whose
/// release threshold is 0 unless set: each synchronisation (a step reads its loss) would hand
/// the freed memory back to the driver, and the next allocations would map it again. The
/// pools (`device::Pool`) still bound what the run allocates; the driver's pool holds at most
/// the largest amount live at once.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), CudaError> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool, a handle that lives as long as the
    // device; the attribute takes a pointer to a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(())
}

/// cuBLAS's workspace on a GPU of compute capability `major`: the sizes NVIDIA's cuBLAS
/// documentation recommends, 32 MiB on Hopper and newer, 4 MiB before (cuBLAS chooses among
/// its kernels by what fits there; set explicitly, it does not depend on the library's
/// default). It comes out of the memory a run leaves outside the device's pool
/// (`exec::run::setup`'s `GPU_RESERVE`).
fn blas_workspace_size(major: i32) -> usize {
    if major >= 9 { 32 << 20 } else { 4 << 20 }
}

/// One opened device.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Offload and prefetch copies, ordered against `stream` by explicit events.
    pub copy: Arc<CudaStream>,
    /// Pinned host buffers for offloaded tensors, kept for reuse.
    pub(crate) pinned: PinnedCache,
    pub(crate) blas: CudaBlas,
    /// cuBLAS's workspace (see [`blas_workspace_size`]); declared after `blas`, so the handle
    /// is destroyed before its workspace is freed.
    blas_workspace: CudaSlice<u8>,
    functions: HashMap<&'static str, CudaFunction>,
    pub precision: Precision,
    /// The flash kernels' fragment loads (bf16 activations; scalar loads unless set).
    pub flash_loads: FlashLoads,
    /// Whether layers run their products that share an input as one batched call (see
    /// `product_group`; off unless set).
    pub batch_products: bool,
    /// The operand addresses of a batched product (`product_group`): 3 x `GROUP_MAX`, held
    /// from their write until the product is queued.
    pub(crate) group_pointers: Mutex<CudaSlice<u64>>,
    pub name: String,
    pub ordinal: usize,
    /// The operations queued while profiling (see [`Gpu::profile`]).
    profile: Option<Mutex<Vec<Span>>>,
}

/// What an operation computes (floating-point operations of products) and moves (bytes of
/// device memory read and written, counting the main buffers once per pass), for the
/// profile's rates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Work {
    pub flops: f64,
    pub bytes: f64,
}

impl Work {
    pub fn products(flops: f64) -> Work {
        Work { flops, bytes: 0.0 }
    }

    /// One pass over `n` elements of each of `buffers` (a buffer read and written is listed
    /// twice).
    pub fn moving(n: usize, buffers: &[DevPtr]) -> Work {
        let per_element: usize = buffers.iter().map(|b| b.dtype.bytes()).sum();
        Work {
            flops: 0.0,
            bytes: (n * per_element) as f64,
        }
    }

    pub fn and(self, other: Work) -> Work {
        Work {
            flops: self.flops + other.flops,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// One profiled operation: events on the compute stream before and after it, and its work.
struct Span {
    name: String,
    start: CudaEvent,
    end: CudaEvent,
    work: Work,
}

/// One line of [`Gpu::profile_report`]: an operation's calls, seconds on the GPU and work,
/// summed.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    pub name: String,
    pub calls: u64,
    pub secs: f64,
    pub work: Work,
}

impl Gpu {
    /// Opens device `ordinal` after checking that the libraries it needs are present.
    pub fn open(ordinal: usize, precision: Precision) -> Result<Gpu, CudaError> {
        Libraries::probe().require_compute()?;
        let count = CudaContext::device_count()?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::Unsupported(format!(
                "cuda:{ordinal} does not exist: this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream runs every kernel in order; the copy stream's uses of a buffer are ordered
        // against it with explicit events (`offload`), so cudarc's per-buffer events are not
        // needed.
        // SAFETY: every buffer used on the copy stream is ordered by those events.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        // A stream of its own rather than the context's legacy default (a null handle): a
        // buffer is freed in its stream's order (`cuMemFreeAsync`), and a null handle means
        // the legacy stream of whichever context is current on the dropping thread, which
        // after a transfer between GPUs can be the other GPU's.
        let stream = ctx.new_stream()?;
        let copy = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        let blas = CudaBlas::new(stream.clone())?;
        let blas_workspace = stream.alloc_zeros::<u8>(blas_workspace_size(major))?;
        {
            let (ptr, _sync) = blas_workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (field order in `Gpu`), and
            // every product runs on the handle's one stream, so no two use it at once. (Giving
            // the handle another stream would put it back on cuBLAS's default workspace.)
            unsafe {
                cublas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    blas_workspace.len(),
                )
                .result()?;
            }
        }
        let group_pointers = stream.alloc_zeros::<u64>(3 * GROUP_MAX)?;
        let bf16 = precision.activations() == DType::Bf16;
        if bf16 && major < 8 {
            return Err(CudaError::Unsupported(format!(
                "bf16 activations need a GPU of compute capability 8.0 or newer; cuda:{ordinal} \
                 is {major}.{minor}: use training.precision f32"
            )));
        }
        let ptx = cached_kernels(major, minor, precision.activations())?;
        let module = ctx.load_module(ptx)?;
        let mut functions = HashMap::new();
        for name in kernel_names() {
            functions.insert(name, module.load_function(name)?);
        }
        for &(head_dim, _, forward, backward) in FLASH_KERNELS.iter().filter(|_| bf16) {
            for (name, is_forward) in [(forward, true), (backward, false)] {
                let f = module.load_function(name)?;
                // Past 48 KiB a block's dynamic shared memory must be asked for. The kernels
                // keep their tiles there (copied past L1), so the SM's on-chip memory goes to
                // shared memory first (100: the largest carveout), and their register
                // budgets, not shared memory, set the blocks an SM.
                use sys::CUfunction_attribute as A;
                let bytes = flash_shared_bytes(head_dim, is_forward);
                f.set_attribute(
                    A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )?;
                f.set_attribute(A::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)?;
                functions.insert(name, f);
            }
        }
        Ok(Gpu {
            name: ctx.name()?,
            ctx,
            stream,
            copy,
            pinned: PinnedCache::default(),
            blas,
            blas_workspace,
            functions,
            precision,
            flash_loads: FlashLoads::Scalar,
            batch_products: false,
            group_pointers: Mutex::new(group_pointers),
            ordinal,
            profile: None,
        })
    }

    /// From now on, records an event on the compute stream before and after every kernel and
    /// product, so [`Gpu::profile_report`] can tell each one's time on the GPU. Nothing waits
    /// for the GPU; the events cost the host a few microseconds an operation.
    pub fn profile(&mut self) {
        self.profile = Some(Mutex::new(Vec::new()));
    }

    /// Operations profiled so far with their calls and seconds on the GPU, longest first (waits
    /// for the stream). An operation's time runs from the end of the work queued before it to
    /// its own end: where the host falls behind the GPU, it includes the wait for its launch.
    pub fn profile_report(&self) -> Result<Vec<ProfileRow>, CudaError> {
        let Some(profile) = &self.profile else {
            return Ok(Vec::new());
        };
        self.synchronize()?;
        let spans = profile.lock().unwrap_or_else(|e| e.into_inner());
        let mut totals: BTreeMap<&str, ProfileRow> = BTreeMap::new();
        for span in spans.iter() {
            let ms = span.start.elapsed_ms(&span.end)?;
            let row = totals.entry(&span.name).or_insert_with(|| ProfileRow {
                name: span.name.clone(),
                calls: 0,
                secs: 0.0,
                work: Work::default(),
            });
            row.calls += 1;
            row.secs += f64::from(ms) / 1e3;
            row.work = row.work.and(span.work);
        }
        let mut rows: Vec<ProfileRow> = totals.into_values().collect();
        rows.sort_by(|a, b| b.secs.total_cmp(&a.secs));
        Ok(rows)
    }

    /// Runs `op`, which queues `work` on the compute stream, between two events under `name()`
    /// while profiling.
    pub(crate) fn timed<T>(
        &self,
        name: impl FnOnce() -> String,
        work: Work,
        op: impl FnOnce() -> Result<T, CudaError>,
    ) -> Result<T, CudaError> {
        let Some(profile) = &self.profile else {
            return op();
        };
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing)?;
        let out = op()?;
        let end = self.stream.record_event(timing)?;
        let mut spans = profile.lock().unwrap_or_else(|e| e.into_inner());
        spans.push(Span {
            name: name(),
            start,
            end,
            work,
        });
        Ok(out)
    }

    /// The bytes of cuBLAS's workspace on this GPU.
    pub fn blas_workspace_bytes(&self) -> usize {
        self.blas_workspace.len()
    }

    pub(crate) fn function(&self, name: &'static str) -> Result<&CudaFunction, CudaError> {
        self.functions.get(name).ok_or(CudaError::NoKernel(name))
    }

    /// A pool for this device: what is free now less `reserve` bytes, at most `cap` bytes.
    pub fn pool(&self, cap: Option<usize>, reserve: usize) -> Result<PoolRef, CudaError> {
        let (free, _total) = self.ctx.mem_get_info()?;
        let available = free.saturating_sub(reserve);
        let budget = cap.map_or(available, |c| c.min(available));
        Ok(Pool::new(format!("cuda:{}", self.ordinal), budget))
    }

    /// Waits for everything queued on the compute and copy streams.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()?;
        Ok(self.copy.synchronize()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel's bytes are one pass over each listed buffer at its element size; products
    /// and passes add up.
    #[test]
    fn work_counts_each_buffer_pass_at_its_element_size() {
        let (f32_buf, bf16_buf) = (DevPtr::new(0, DType::F32), DevPtr::new(0, DType::Bf16));
        let pass = Work::moving(10, &[f32_buf, bf16_buf, bf16_buf]);
        assert_eq!((pass.flops, pass.bytes), (0.0, 80.0));
        let both = pass.and(Work::products(5.0)).and(Work::moving(3, &[]));
        assert_eq!((both.flops, both.bytes), (5.0, 80.0));
    }

    #[test]
    fn every_kernel_source_declares_kernels_and_names_are_unique() {
        let names = kernel_names();
        assert!(names.contains(&"rmsnorm_forward") && names.contains(&"adamw_update"));
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }

    /// The flash kernels exist for the head dimensions the planner's inventory assumes.
    #[test]
    fn flash_kernels_cover_the_planned_head_dimensions() {
        for loads in FlashLoads::EACH {
            let dims: Vec<usize> = (FLASH_KERNELS.iter())
                .filter(|k| k.1 == loads)
                .map(|k| k.0)
                .collect();
            assert_eq!(dims, crate::plan::inventory::CUDA_FLASH_HEAD_DIMS);
        }
        for (d, loads, forward, backward) in FLASH_KERNELS {
            let infix = if loads == FlashLoads::Ldmatrix {
                "ldsm_"
            } else {
                ""
            };
            assert_eq!(forward, format!("flash_forward_{infix}{d}"));
            assert_eq!(backward, format!("flash_backward_{infix}{d}"));
            assert!(FLASH_SOURCE.contains(&format!("\nFA_KERNELS({d}, ")));
        }
    }

    #[test]
    fn opening_a_device_is_a_gpu_or_a_typed_unavailable_error() {
        match Gpu::open(0, Precision::F32) {
            Ok(gpu) => assert!(!gpu.name.is_empty()),
            Err(CudaError::Unavailable { library, .. }) => assert!(!library.is_empty()),
            Err(other) => panic!("expected a GPU or CudaError::Unavailable, got {other}"),
        }
    }

    /// Runs where NVRTC is on the loader path (no GPU needed): the kernels compile for Hopper
    /// with f32 and with bf16 activations, and the two programs differ; they compile for
    /// Ampere too (`scripts/check-kernels` hands all four programs to ptxas).
    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so.13) on the library path"]
    fn gpu_kernels_compile_with_nvrtc() {
        let f32_src = cached_kernels(9, 0, DType::F32).unwrap().to_src();
        let bf16_src = cached_kernels(9, 0, DType::Bf16).unwrap().to_src();
        for src in [&f32_src, &bf16_src] {
            for name in kernel_names() {
                assert!(src.contains(name), "{name} missing from the PTX");
            }
        }
        for (_, _, forward, backward) in FLASH_KERNELS {
            assert!(bf16_src.contains(forward) && bf16_src.contains(backward));
            assert!(
                !f32_src.contains(forward),
                "{forward} built with f32 activations"
            );
        }
        let ampere = [DType::F32, DType::Bf16].map(|a| cached_kernels(8, 0, a).unwrap().to_src());
        // For reading the PTX (or, through ptxas, the SASS): CHRONOSPIPE_PTX_OUT=DIR gets
        // kernels-{f32,bf16}-sm{90,80}.ptx.
        if let Some(dir) = std::env::var_os("CHRONOSPIPE_PTX_OUT") {
            let dir = std::path::Path::new(&dir);
            let [f32_80, bf16_80] = &ampere;
            for (name, src) in [
                ("f32-sm90", &f32_src),
                ("bf16-sm90", &bf16_src),
                ("f32-sm80", f32_80),
                ("bf16-sm80", bf16_80),
            ] {
                std::fs::write(dir.join(format!("kernels-{name}.ptx")), src).unwrap();
            }
        }
        assert_ne!(f32_src, bf16_src);
        assert_eq!(cached_kernels(9, 0, DType::F32).unwrap().to_src(), f32_src);
    }
}
