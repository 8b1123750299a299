//! CUDA kernels without a GPU: `tests/host_cuda/` builds kernels from `kernels/*.cu` for the
//! host with a C++20 compiler, each block's threads as threads (and the tensor-core product by
//! the PTX ISA's fragment layouts), and the results are held against the CPU backend.
//!
//! - The bf16 flash-attention kernels (with `attn_delta` and `cast_to_act`, as the backend
//!   launches them), with the shapes and tolerances of `selftest --gpu`'s flash checks: their
//!   indexing, masking, online softmax and grouped heads.
//! - The rope kernel, f32 and bf16 builds, at a thousand positions.
//! - The elementwise kernels (residual sums, casts, SwiGLU), projection biases, RMSNorm's, cross-entropy's and
//!   the attention path's row kernels (softmax, probabilities, dS, delta), f32 and bf16
//!   builds, on their 16-byte vector paths, with ragged rows or tails, and unaligned.
//! - The flash and RMSNorm kernels built with ThreadSanitizer: no data races between threads.
//!
//! The GPU runs of the same checks (`scripts/gpu-check`) check the hardware's side.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::backend::cpu::kernels::attention::AttnShape;
use chronospipe::exec::backend::cpu::kernels::bias;
use chronospipe::exec::backend::cpu::kernels::rope::{Rope, rope_apply};
use chronospipe::exec::backend::cuda::limits::flash_shared_bytes;
use chronospipe::exec::backend::cuda::selftest::{
    FLASH_OUTPUTS, cpu_attention, flash_check_shapes, flash_inputs,
};
use chronospipe::exec::compare::rel_err;
use chronospipe::exec::optim::{OptimizerConfig, update_elements};
use chronospipe::plan::inventory::CUDA_FLASH_HEAD_DIMS;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The C++ compiler: `$CXX`, else `c++` or `g++` on the path.
fn compiler() -> String {
    let candidates = std::env::var("CXX")
        .into_iter()
        .chain(["c++".into(), "g++".into()]);
    for cxx in candidates {
        if Command::new(&cxx).arg("--version").output().is_ok() {
            return cxx;
        }
    }
    panic!(
        "no C++ compiler (set CXX, or install g++ 10 or newer): the flash kernels' host check needs one"
    );
}

/// Builds `tests/host_cuda/{name}.cpp` into `dir` at -O2 with the extra compiler flags `flags`
/// (later flags win).
fn build(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/host_cuda/{name}.cpp"));
    let tag: String = (flags.concat().chars())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let binary = dir.join(format!("{name}{tag}"));
    let out = Command::new(compiler())
        .args(["-std=c++20", "-O2", "-pthread"])
        .args(flags)
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "compiling {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// The f32 and bf16 (`-DCP_ACT_BF16`) builds of `tests/host_cuda/{name}.cpp`, each with
/// whether it stores bf16.
fn both_builds(dir: &Path, name: &str) -> [(bool, PathBuf); 2] {
    [
        (false, build(dir, name, &[])),
        (true, build(dir, name, &["-DCP_ACT_BF16"])),
    ]
}

/// Relative errors held to tolerances, printed as they come; the test fails at the end with
/// every one past its tolerance.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, case: &str, ours: &[f32], reference: &[f32], tolerance: f64) {
        let err = rel_err(ours, reference);
        println!("{case}: rel err {err:.2e} (tolerance {tolerance:.0e})");
        if err.is_nan() || err > tolerance {
            self.0.push(format!("{case}: {err:.2e}"));
        }
    }

    fn assert_all_passed(self) {
        assert!(self.0.is_empty(), "{:?}", self.0);
    }
}

/// Runs `command` (a host program and its leading arguments) with an input file holding
/// `input` and an output file as its last two arguments; returns what it wrote. Panics unless
/// it succeeds within 5 minutes (a kernel whose threads miss a barrier would otherwise hang
/// the suite).
fn exchange(dir: &Path, mut command: Command, input: &[u8]) -> Vec<u8> {
    let (in_path, out_path) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&in_path, input).unwrap();
    command.arg(&in_path).arg(&out_path);
    let status = wait_at_most(command.spawn().unwrap(), Duration::from_secs(300));
    assert!(status.success(), "{command:?} failed: {status}");
    std::fs::read(&out_path).unwrap()
}

/// `binary` with `args`, as a command.
fn program(binary: &Path, args: impl IntoIterator<Item = impl ToString>) -> Command {
    let mut command = Command::new(binary);
    command.args(args.into_iter().map(|a| a.to_string()));
    command
}

fn wait_at_most(mut child: Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("the host build of a kernel ran past {limit:?} (a missed barrier?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect()
}

/// A runner's output as f32 values: `parts` in order, each (elements, whether they are
/// activations, else f32), all of the output and nothing past it.
fn split_output(bytes: &[u8], bf16_build: bool, parts: &[(usize, bool)]) -> Vec<Vec<f32>> {
    let mut at = 0;
    let tensors = (parts.iter())
        .map(|&(n, activations)| {
            let bf16 = activations && bf16_build;
            let size = if bf16 { 2 } else { 4 };
            let chunk = &bytes[at..at + n * size];
            at += n * size;
            acts_from_bytes(chunk, bf16)
        })
        .collect();
    assert_eq!(at, bytes.len(), "output longer than its tensors");
    tensors
}

/// Random inputs for `sh` (q, k, v, dO), the flash program's input file holding them and its
/// leading arguments (`ldmatrix`: the kernels that load fragments with ldmatrix; the dynamic
/// shared memory the backend launches each kernel with).
fn flash_case(
    rng: &mut ChaCha8Rng,
    sh: &AttnShape,
    ldmatrix: bool,
) -> ([Vec<f32>; 4], Vec<u8>, [usize; 8]) {
    let inputs = flash_inputs(rng, sh);
    let bytes = inputs.iter().flat_map(|t| bf16_bytes(t)).collect();
    let args = [
        sh.head_dim,
        sh.batch,
        sh.seq,
        sh.heads,
        sh.kv_heads,
        ldmatrix as usize,
        flash_shared_bytes(sh.head_dim, true),
        flash_shared_bytes(sh.head_dim, false),
    ];
    (inputs, bytes, args)
}

/// The flash program (`ldmatrix`: its variant loading fragments with ldmatrix) on every shape
/// of the selftest's flash checks against the CPU attention, with their tolerances.
fn check_flash_kernels(ldmatrix: bool) {
    let dir = tempfile::tempdir().unwrap();
    let binary = build(dir.path(), "flash_attention", &[]);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut checks = Checks::default();
    for sh in flash_check_shapes() {
        let (inputs, input, dims) = flash_case(&mut rng, &sh, ldmatrix);
        let output = exchange(dir.path(), program(&binary, dims), &input);
        let (n, stats) = (sh.batch * sh.seq, sh.batch * sh.heads * sh.seq);
        let (w, kvw) = (n * sh.heads * sh.head_dim, n * sh.kv_heads * sh.head_dim);
        // The program writes out, dq, dk, dv, lse, delta; the reference is out, lse, dq, dk,
        // dv, delta.
        let parts = [
            (w, true),
            (w, true),
            (kvw, true),
            (kvw, true),
            (stats, false),
            (stats, false),
        ];
        let got = split_output(&output, true, &parts);
        let got = [&got[0], &got[4], &got[1], &got[2], &got[3], &got[5]];
        let want = cpu_attention(&inputs, sh);
        for ((ours, reference), (name, tolerance)) in got.into_iter().zip(&want).zip(FLASH_OUTPUTS)
        {
            let case = format!("{sh:?} ldmatrix={ldmatrix} {name}");
            checks.check(&case, ours, reference, tolerance);
        }
    }
    checks.assert_all_passed();
}

#[test]
fn flash_kernels_run_on_the_host_match_the_cpu_attention() {
    check_flash_kernels(false);
}

/// The same with fragments loaded by ldmatrix (its lanes' addresses and the matrices' layouts,
/// transposed and not, by the PTX ISA).
#[test]
fn flash_kernels_with_ldmatrix_run_on_the_host_match_the_cpu_attention() {
    check_flash_kernels(true);
}

/// The dynamic shared memory the backend launches the flash kernels with
/// (`limits::flash_shared_bytes`) is what they carve, to the 16-byte piece: the checks above run
/// on exactly that much, and 16 bytes less for either kernel makes the host run abort (the
/// GPU would fault), at every head dimension.
#[test]
fn flash_kernels_get_exactly_the_shared_memory_they_carve() {
    let dir = tempfile::tempdir().unwrap();
    let binary = build(dir.path(), "flash_attention", &[]);
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    for head_dim in CUDA_FLASH_HEAD_DIMS {
        let sh = AttnShape {
            batch: 1,
            seq: 64,
            heads: 1,
            kv_heads: 1,
            head_dim,
        };
        let (_, input, args) = flash_case(&mut rng, &sh, false);
        std::fs::write(dir.path().join("in.bin"), &input).unwrap();
        for short in [6, 7] {
            let mut args = args;
            args[short] -= 16;
            let mut command = program(&binary, args);
            command
                .arg(dir.path().join("in.bin"))
                .arg(dir.path().join("out.bin"));
            let out = command.output().unwrap();
            let kernel = if short == 6 { "forward" } else { "backward" };
            assert!(
                !out.status.success(),
                "head dim {head_dim}: the {kernel} ran on 16 bytes less than it is given"
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("dynamic shared memory"), "{stderr}");
        }
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Activations as a host build reads them: bf16 bits or f32.
fn act_bytes(values: &[f32], bf16_build: bool) -> Vec<u8> {
    if bf16_build {
        bf16_bytes(values)
    } else {
        f32_bytes(values)
    }
}

fn acts_from_bytes(bytes: &[u8], bf16_build: bool) -> Vec<f32> {
    if bf16_build {
        (bytes.chunks_exact(2))
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    } else {
        (bytes.chunks_exact(4))
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// `n` values uniform in `-range..range`.
fn uniform(rng: &mut ChaCha8Rng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-range..range)).collect()
}

/// `values` as the activation type holds them.
fn as_acts(mut values: Vec<f32>, bf16_build: bool) -> Vec<f32> {
    if bf16_build {
        values
            .iter_mut()
            .for_each(|v| *v = bf16::from_f32(*v).to_f32());
    }
    values
}

/// The rope kernel's f32 and bf16 builds against the CPU backend's rope (the same frequencies
/// from `Rope::inv_freq`), forward and inverse, at positions up to 1023 (angles up to 1023 radians),
/// on 3 blocks so that each block strides over many rows: within the selftest's elementwise
/// tolerance (f32) or bf16's rounding of the output.
#[test]
fn rope_kernel_run_on_the_host_matches_the_cpu_rope() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut checks = Checks::default();
    for (bf16_build, binary) in both_builds(dir.path(), "rope") {
        let tolerance = if bf16_build { 4e-3 } else { 1e-5 };
        // (seq, width, head_dim): grouped layouts of the models, the smallest and largest head
        // dimensions, and one whose pairs do not divide the block (96: 5 rows of 48 threads).
        for (seq, width, head_dim) in [
            (1024, 256, 64),
            (300, 48, 16),
            (40, 512, 256),
            (64, 192, 96),
        ] {
            for inverse in [false, true] {
                let rows = 2 * seq;
                let x = as_acts(uniform(&mut rng, rows * width, 1.0), bf16_build);
                let mut input = f32_bytes(&Rope::plain(10000.0).inv_freq(head_dim));
                input.extend(act_bytes(&x, bf16_build));
                let dims = [rows, width, seq, head_dim, inverse as usize, 3];
                let got = exchange(dir.path(), program(&binary, dims), &input);
                let got = acts_from_bytes(&got, bf16_build);
                assert_eq!(got.len(), x.len(), "rope output length");
                let mut want = x;
                rope_apply(
                    &mut want,
                    width,
                    seq,
                    head_dim,
                    &Rope::plain(10000.0),
                    inverse,
                );
                let case = format!(
                    "rope bf16={bf16_build} seq={seq} width={width} head_dim={head_dim} inverse={inverse}"
                );
                checks.check(&case, &got, &want, tolerance);
            }
        }
    }
    checks.assert_all_passed();
}

/// `add` (into a third buffer and in place), `cast_to_act`, `swiglu_forward` and
/// `swiglu_backward`, f32 and bf16 builds,
/// against the CPU backend on the same (activation-typed) inputs: sums and casts to the bit
/// (both round one f32 result the same way), SwiGLU within the selftest's elementwise tolerance
/// (f32) or bf16's rounding. Lengths and offsets take each path: whole 16-byte vectors, vectors
/// then a ragged tail, and unaligned buffers one element at a time; one block strides over
/// them several times.
#[test]
fn elementwise_kernels_run_on_the_host_match_the_cpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = CpuBackend::default();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mut checks = Checks::default();
    for (bf16_build, binary) in both_builds(dir.path(), "elementwise") {
        let swiglu_tolerance = if bf16_build { 4e-3 } else { 1e-5 };
        for (n, offset) in [(4096, 0), (4099, 0), (4099, 1)] {
            let mut acts = |range: f32| as_acts(uniform(&mut rng, n, range), bf16_build);
            let (a, b) = (acts(1.0), acts(1.0));
            let (gate, up, d_act) = (acts(4.0), acts(1.0), acts(1.0));
            let x = uniform(&mut rng, n, 1.0);
            let sum: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
            let mut act = vec![0.0; n];
            cpu.swiglu_forward(&mut act, &gate, &up);
            let (mut d_gate, mut d_up) = (vec![0.0; n], d_act.clone());
            cpu.swiglu_backward(&mut act.clone(), &mut d_gate, &mut d_up, &gate, &up);
            let acts = |v: &[f32]| act_bytes(v, bf16_build);
            // (operation, its inputs' bytes, the outputs it should write, tolerance)
            let sum = as_acts(sum, bf16_build);
            let cases: [(&str, Vec<u8>, _, f64); 5] = [
                ("add", [acts(&a), acts(&b)].concat(), vec![sum.clone()], 0.0),
                (
                    "add_in_place",
                    [acts(&a), acts(&b)].concat(),
                    vec![sum],
                    0.0,
                ),
                (
                    "cast_to_act",
                    f32_bytes(&x),
                    vec![as_acts(x.clone(), bf16_build)],
                    0.0,
                ),
                (
                    "swiglu_forward",
                    [acts(&gate), acts(&up)].concat(),
                    vec![act.clone()],
                    swiglu_tolerance,
                ),
                (
                    "swiglu_backward",
                    [acts(&gate), acts(&up), acts(&d_act)].concat(),
                    vec![d_gate.clone(), d_up.clone()],
                    swiglu_tolerance,
                ),
            ];
            for (op, input, want, tolerance) in cases {
                let args = [
                    op.to_string(),
                    n.to_string(),
                    offset.to_string(),
                    "3".into(),
                ];
                let got = exchange(dir.path(), program(&binary, args), &input);
                let got = acts_from_bytes(&got, bf16_build);
                assert_eq!(got.len(), n * want.len(), "{op}: output length");
                for (i, (ours, reference)) in got.chunks(n).zip(&want).enumerate() {
                    let case = format!("{op} output {i}, bf16={bf16_build} n={n} offset={offset}");
                    checks.check(&case, ours, reference, tolerance);
                }
            }
        }
    }
    checks.assert_all_passed();
}

/// RMSNorm's kernels (forward, apply, backward of weights and input), f32 and bf16 builds,
/// against the CPU backend on the same inputs: 1/rms and the weight gradient (f32 in both
/// builds) within the selftest's elementwise tolerance, activations within it (f32) or bf16's
/// rounding. Rows of 768 take the vector path; rows of 203, or buffers one element off a
/// 16-byte boundary, the element-by-element one; 37 rows leave the last block's warps idle;
/// 100 rows are 7 groups of 16 for the weight gradient's 3 blocks down the rows (the host
/// program's cap), so blocks take more than one group, as past the GPU's grid limit.
#[test]
fn rmsnorm_kernels_run_on_the_host_match_the_cpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = CpuBackend::default();
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let mut checks = Checks::default();
    for (bf16_build, binary) in both_builds(dir.path(), "rmsnorm") {
        let act_tolerance = if bf16_build { 4e-3 } else { 1e-5 };
        for (rows, h, offset) in [(37, 768, 0), (37, 203, 0), (37, 768, 1), (100, 768, 0)] {
            let mut random = |n: usize| uniform(&mut rng, n, 1.0);
            let (x, w, dy, dw0) = (random(rows * h), random(h), random(rows * h), random(h));
            let (x, dy) = (as_acts(x, bf16_build), as_acts(dy, bf16_build));
            let input = [
                act_bytes(&x, bf16_build),
                f32_bytes(&w),
                act_bytes(&dy, bf16_build),
                f32_bytes(&dw0),
            ]
            .concat();
            let (mut out, mut rstd) = (vec![0.0; rows * h], vec![0.0; rows]);
            cpu.rmsnorm_forward(&mut out, &mut rstd, &x, &w, 1e-5);
            let mut applied = vec![0.0; rows * h];
            cpu.rmsnorm_apply(&mut applied, &rstd, &x, &w);
            let (mut dx, mut dw) = (dy.clone(), dw0.clone());
            cpu.rmsnorm_backward(&mut dx, &mut dw, &x, &w, &rstd);

            let bytes = exchange(dir.path(), program(&binary, [rows, h, offset]), &input);
            // out, rstd, applied out, dx (activations of every row), dw (f32 per column)
            let (acts, per_row, per_column) = ((rows * h, true), (rows, false), (h, false));
            let parts = [acts, per_row, acts, acts, per_column];
            let got = split_output(&bytes, bf16_build, &parts);
            let outputs = [
                ("out", out, act_tolerance),
                ("rstd", rstd, 1e-5),
                ("applied out", applied, act_tolerance),
                ("dx", dx, act_tolerance),
                ("dw", dw, 1e-5),
            ];
            for ((name, reference, tolerance), ours) in outputs.into_iter().zip(got) {
                let case =
                    format!("rmsnorm {name}, bf16={bf16_build} rows={rows} h={h} offset={offset}");
                checks.check(&case, &ours, &reference, tolerance);
            }
        }
    }
    checks.assert_all_passed();
}

/// The projection-bias kernels (the bias added to each row, its gradient the column sums),
/// f32 and bf16 builds, against the CPU backend's: rows within the selftest's elementwise
/// tolerance (f32) or bf16's rounding, the f32 gradient within the elementwise tolerance.
/// Widths of 64 and 203 (more than a block of columns is not needed: 300 takes two), buffers
/// aligned and one element off; 100 rows are 7 groups of 16 for the gradient's 3 blocks down
/// the rows, so blocks take more than one group.
#[test]
fn bias_kernels_run_on_the_host_match_the_cpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut checks = Checks::default();
    for (bf16_build, binary) in both_builds(dir.path(), "bias") {
        let act_tolerance = if bf16_build { 4e-3 } else { 1e-5 };
        for (rows, width, offset) in [(100, 64, 0), (37, 203, 1), (100, 300, 0)] {
            let mut random = |n: usize| uniform(&mut rng, n, 1.0);
            let (y, b, dy, db0) = (
                random(rows * width),
                random(width),
                random(rows * width),
                random(width),
            );
            let (y, dy) = (as_acts(y, bf16_build), as_acts(dy, bf16_build));
            let input = [
                act_bytes(&y, bf16_build),
                f32_bytes(&b),
                act_bytes(&dy, bf16_build),
                f32_bytes(&db0),
            ]
            .concat();
            let mut biased = y.clone();
            bias::bias_add(&mut biased, &b);
            let mut db = db0.clone();
            bias::bias_backward(&mut db, &dy);
            let bytes = exchange(dir.path(), program(&binary, [rows, width, offset]), &input);
            let got = split_output(&bytes, bf16_build, &[(rows * width, true), (width, false)]);
            let outputs = [("y + b", biased, act_tolerance), ("db", db, 1e-5)];
            for ((name, reference, tolerance), ours) in outputs.into_iter().zip(got) {
                let case =
                    format!("{name}, bf16={bf16_build} rows={rows} width={width} offset={offset}");
                checks.check(&case, &ours, &reference, tolerance);
            }
        }
    }
    checks.assert_all_passed();
}

/// `attn_delta` (each query row's dO . O, which the attention backward subtracts), f32 and bf16
/// builds, against the same sums on the host: rows of head dimension 64 in 16-byte vectors,
/// of 10 element by element, and unaligned buffers; one block strides over 606 rows.
#[test]
fn attn_delta_run_on_the_host_matches_the_row_sums() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(37);
    let mut checks = Checks::default();
    for (bf16_build, binary) in both_builds(dir.path(), "attn_delta") {
        for (head_dim, offset) in [(64, 0), (10, 0), (64, 1)] {
            let (batch, heads, seq) = (2, 3, 101);
            let n = batch * seq * heads * head_dim;
            let mut random = || as_acts(uniform(&mut rng, n, 1.0), bf16_build);
            let (d_out, out) = (random(), random());
            let mut want = vec![0.0f32; batch * heads * seq];
            for (row, (d, o)) in d_out.chunks(head_dim).zip(out.chunks(head_dim)).enumerate() {
                let (token, head) = (row / heads, row % heads);
                let (b, t) = (token / seq, token % seq);
                let dot: f64 = d.iter().zip(o).map(|(x, y)| *x as f64 * *y as f64).sum();
                want[(b * heads + head) * seq + t] = dot as f32;
            }
            let input = [act_bytes(&d_out, bf16_build), act_bytes(&out, bf16_build)].concat();
            let args = [batch, heads, seq, head_dim, offset, 1];
            let got = exchange(dir.path(), program(&binary, args), &input);
            let got = acts_from_bytes(&got, false);
            let case = format!("attn_delta bf16={bf16_build} head_dim={head_dim} offset={offset}");
            checks.check(&case, &got, &want, 1e-5);
        }
    }
    checks.assert_all_passed();
}

/// The cross-entropy kernels (one-pass log-sum-exp, then the gradient in place), f32 and bf16
/// builds, against the same in f64 on the host: losses within the selftest's elementwise
/// tolerance, gradients within it (f32) or bf16's rounding. Logits up to +-8 make the running
/// maximum move; vocabularies of 5,000 go in 16-byte vectors (several strides of a 256-thread
/// block), of 5,001 element by element, as do logits one element off a 16-byte boundary. A row
/// whose target is the ignore id (-100) has no loss and a zero gradient on both paths.
#[test]
fn cross_entropy_kernels_run_on_the_host_match_f64_sums() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut checks = Checks::default();
    for (bf16_build, binary) in both_builds(dir.path(), "cross_entropy") {
        let grad_tolerance = if bf16_build { 4e-3 } else { 1e-5 };
        let cases = [(5000, 0, None), (5001, 0, None), (5000, 1, None)];
        let masked = [(5000, 0, Some(2)), (5001, 1, Some(4))];
        for (vocab, offset, ignored) in cases.into_iter().chain(masked) {
            let (rows, scale) = (5, 0.25f32);
            let logits = as_acts(uniform(&mut rng, rows * vocab, 8.0), bf16_build);
            let targets: Vec<i32> = (0..rows)
                .map(|r| match ignored {
                    Some(i) if i == r => -100,
                    _ => ((r * 337 + 11) % vocab) as i32,
                })
                .collect();
            let (mut loss, mut grad) = (Vec::new(), Vec::new());
            for (row, &target) in logits.chunks(vocab).zip(&targets) {
                if target < 0 {
                    loss.push(0.0);
                    grad.extend(std::iter::repeat_n(0.0, vocab));
                    continue;
                }
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
                let lse = max + sum.ln();
                loss.push((lse - row[target as usize] as f64) as f32);
                grad.extend(row.iter().enumerate().map(|(j, &x)| {
                    let hot = if j == target as usize { 1.0 } else { 0.0 };
                    (((x as f64 - lse).exp() - hot) * scale as f64) as f32
                }));
            }
            let targets: Vec<u8> = targets.iter().flat_map(|t| t.to_le_bytes()).collect();
            let input = [act_bytes(&logits, bf16_build), targets].concat();
            let args = [
                rows.to_string(),
                vocab.to_string(),
                offset.to_string(),
                scale.to_string(),
            ];
            let got = exchange(dir.path(), program(&binary, args), &input);
            let shapes = [(rows, false), (rows, false), (rows * vocab, true)];
            let got = split_output(&got, bf16_build, &shapes);
            let case =
                format!("bf16={bf16_build} vocab={vocab} offset={offset} ignored={ignored:?}");
            checks.check(&format!("ce loss {case}"), &got[0], &loss, 1e-5);
            // The backward's losses are the forward's, to the bit.
            checks.check(
                &format!("ce backward's loss {case}"),
                &got[1],
                &got[0],
                1e-30,
            );
            checks.check(&format!("ce grad {case}"), &got[2], &grad, grad_tolerance);
        }
    }
    checks.assert_all_passed();
}

/// The optimizer kernels, f32 and bf16 builds, against the CPU optimizer (`update_elements`):
/// AdamW (step 3, with a clipping factor) and SGD on 1,500 weights, over two blocks so the
/// grid-stride loop takes several strides. Each also writes the copy of the updated weights
/// the products read, which must be those weights rounded to the activations' type, to the
/// bit, and clears the gradients it read, as the CPU optimizer does.
#[test]
fn optimizer_kernels_run_on_the_host_match_the_cpu_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(47);
    let mut checks = Checks::default();
    let n = 1500;
    let (w, g, m) = (
        uniform(&mut rng, n, 1.0),
        uniform(&mut rng, n, 1.0),
        uniform(&mut rng, n, 0.1),
    );
    let v: Vec<f32> = uniform(&mut rng, n, 0.01).iter().map(|x| x.abs()).collect();
    let (factor, lr) = (0.7f32, 1e-3f32);
    let adamw = OptimizerConfig::default();
    let OptimizerConfig::AdamW {
        beta1, beta2, eps, ..
    } = adamw
    else {
        unreachable!("the default optimizer is AdamW")
    };
    let c = adamw.coeffs(3, lr);
    let (decay, step_size, bc2_sqrt) = c.kernel_args();
    let (mut cpu_w, mut cpu_m, mut cpu_v) = (w.clone(), m.clone(), v.clone());
    update_elements(
        &adamw,
        &c,
        factor,
        &mut cpu_w,
        &mut g.clone(),
        &mut cpu_m,
        &mut cpu_v,
    );
    let sgd = OptimizerConfig::Sgd;
    let mut sgd_w = w.clone();
    let (mut m0, mut v0) = (m.clone(), v.clone());
    update_elements(
        &sgd,
        &sgd.coeffs(3, lr),
        factor,
        &mut sgd_w,
        &mut g.clone(),
        &mut m0,
        &mut v0,
    );
    let input = [&w, &g, &m, &v].map(|x| f32_bytes(x)).concat();
    for (bf16_build, binary) in both_builds(dir.path(), "optim") {
        let args =
            [factor, beta1, beta2, eps, decay, step_size, bc2_sqrt, lr].map(|x| x.to_string());
        let got = exchange(
            dir.path(),
            program(&binary, [n.to_string()].into_iter().chain(args)),
            &input,
        );
        let shapes = [
            (n, false),
            (n, false),
            (n, false),
            (n, true),
            (n, false),
            (n, true),
            (n, false),
            (n, false),
        ];
        let got = split_output(&got, bf16_build, &shapes);
        let case = format!("bf16={bf16_build}");
        checks.check(&format!("adamw w {case}"), &got[0], &cpu_w, 1e-6);
        checks.check(&format!("adamw m {case}"), &got[1], &cpu_m, 1e-6);
        checks.check(&format!("adamw v {case}"), &got[2], &cpu_v, 1e-6);
        checks.check(&format!("sgd w {case}"), &got[4], &sgd_w, 1e-6);
        // The copies are the kernels' own updated weights in the activations' type.
        let adamw_copy = as_acts(got[0].clone(), bf16_build);
        checks.check(&format!("adamw copy {case}"), &got[3], &adamw_copy, 1e-30);
        let sgd_copy = as_acts(got[4].clone(), bf16_build);
        checks.check(&format!("sgd copy {case}"), &got[5], &sgd_copy, 1e-30);
        for (kernel, grads) in ["adamw", "sgd"].iter().zip(&got[6..]) {
            assert!(
                grads.iter().all(|&x| x == 0.0),
                "{kernel} left gradients {case}"
            );
        }
    }
    checks.assert_all_passed();
}

/// The cuBLAS attention path's row kernels, f32 and bf16 builds, against f64 on the host:
/// `attn_softmax` (causal softmax in place and each row's log-sum-exp in one pass),
/// `attn_probs` (the probabilities again from that log-sum-exp) and `attn_dscores` (on the
/// softmax's own output). Sequences of 40 go in 16-byte vectors, of 37 element by element, as
/// do buffers one element off a 16-byte boundary; sequences of 296 and 297 on 32-thread
/// blocks take several strides of a row either way.
#[test]
fn attention_row_kernels_run_on_the_host_match_f64_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let mut checks = Checks::default();
    for (bf16_build, binary) in both_builds(dir.path(), "attention_rows") {
        let tolerance = if bf16_build { 4e-3 } else { 1e-5 };
        // (heads, seq, offset, threads a block): the kernels are written for any multiple of 32
        // threads (the GPU runs 256); fewer threads keep the host's thread count down and make
        // the long rows take several strides.
        let cases = [
            (2, 40, 0, 64),
            (2, 37, 0, 64),
            (2, 40, 1, 64),
            (1, 296, 0, 32),
            (1, 297, 0, 32),
        ];
        for (heads, seq, offset, threads) in cases {
            let scale = 0.125f32;
            let n = heads * seq * seq;
            let mut acts = |range: f32| as_acts(uniform(&mut rng, n, range), bf16_build);
            let (scores, grad) = (acts(6.0), acts(1.0));
            let delta = uniform(&mut rng, heads * seq, 1.0);
            let (mut probs, mut lse) = (Vec::new(), Vec::new());
            for (r, row) in scores.chunks(seq).enumerate() {
                let t = r % seq;
                let max = row[..=t]
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let l = max
                    + row[..=t]
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                lse.push(l as f32);
                probs.extend((0..seq).map(|j| {
                    if j <= t {
                        (row[j] as f64 - l).exp() as f32
                    } else {
                        0.0
                    }
                }));
            }
            let input = [
                act_bytes(&scores, bf16_build),
                act_bytes(&grad, bf16_build),
                f32_bytes(&delta),
            ]
            .concat();
            let args = [
                heads.to_string(),
                seq.to_string(),
                offset.to_string(),
                scale.to_string(),
                threads.to_string(),
            ];
            let out = exchange(dir.path(), program(&binary, args), &input);
            let parts = [(n, true), (heads * seq, false), (n, true), (n, true)];
            let [got_probs, got_lse, got_again, got_ds]: [Vec<f32>; 4] =
                split_output(&out, bf16_build, &parts).try_into().unwrap();
            let ds: Vec<f32> = (got_probs.iter().zip(&grad).enumerate())
                .map(|(i, (p, g))| p * (g - delta[i / seq]) * scale)
                .collect();
            let case = format!("bf16={bf16_build} seq={seq} offset={offset} threads={threads}");
            checks.check(
                &format!("attn_softmax probs {case}"),
                &got_probs,
                &probs,
                tolerance,
            );
            checks.check(&format!("attn_softmax lse {case}"), &got_lse, &lse, 1e-5);
            checks.check(&format!("attn_probs {case}"), &got_again, &probs, tolerance);
            checks.check(&format!("attn_dscores {case}"), &got_ds, &ds, tolerance);
        }
    }
    checks.assert_all_passed();
}

/// The kernels that share memory between threads, built with ThreadSanitizer: the flash
/// kernels (shared tiles between warps, with grouped heads and several partial tiles) and
/// RMSNorm's (warp reductions through the host shim). A barrier missing between one warp's
/// writes and another's reads is a data race here, which the host results alone could miss
/// (the threads may happen to run in a safe order) and the GPU would not forgive; a planted one
/// (the forward's barrier after loading a key tile, or the backward's before loading the next
/// queries) is reported. The sanitizer exits with 66
/// on a report. Runs under `setarch -R` where present: the sanitizer needs its memory layout.
#[test]
fn kernels_sharing_memory_have_no_data_races_under_thread_sanitizer() {
    let dir = tempfile::tempdir().unwrap();
    let sanitize = ["-fsanitize=thread", "-g", "-O1"];
    let sanitized = |binary: &Path, args: &[usize]| {
        if Command::new("setarch").arg("--version").output().is_ok() {
            let mut command = Command::new("setarch");
            command.arg("-R").arg(binary);
            command.args(args.iter().map(|a| a.to_string()));
            command
        } else {
            program(binary, args)
        }
    };
    // The flash kernels' cp.async copies landing as late as the rules allow (a read before
    // the wait and barrier sees stale data or races) and as early (a copy into a tile another
    // warp still reads races with that read).
    let flash_builds = [
        build(dir.path(), "flash_attention", &sanitize),
        build(
            dir.path(),
            "flash_attention",
            &[&sanitize[..], &["-DCP_ASYNC_EAGER"]].concat(),
        ),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let shapes = [
        (16, 70, 2, 1, false),
        (64, 130, 2, 2, false),
        (64, 130, 2, 2, true),
    ];
    for flash in &flash_builds {
        for (head_dim, seq, heads, kv_heads, ldmatrix) in shapes {
            let sh = AttnShape {
                batch: 1,
                seq,
                heads,
                kv_heads,
                head_dim,
            };
            let (_, input, dims) = flash_case(&mut rng, &sh, ldmatrix);
            exchange(dir.path(), sanitized(flash, &dims), &input);
        }
    }
    let rmsnorm = build(
        dir.path(),
        "rmsnorm",
        &[&sanitize[..], &["-DCP_ACT_BF16"]].concat(),
    );
    let (rows, h) = (37, 768);
    let values = uniform(&mut rng, 2 * rows * h + 2 * h, 1.0);
    let (x, rest) = values.split_at(rows * h);
    let (w, rest) = rest.split_at(h);
    let (dy, dw) = rest.split_at(rows * h);
    let input = [bf16_bytes(x), f32_bytes(w), bf16_bytes(dy), f32_bytes(dw)].concat();
    exchange(dir.path(), sanitized(&rmsnorm, &[rows, h, 0]), &input);
}
