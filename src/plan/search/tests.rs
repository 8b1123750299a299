use super::*;
use crate::plan::presets;
use crate::plan::validate::validate;

fn request(layers: usize) -> Request {
    let mut model = presets::model("llama2-70b").unwrap();
    model.layers = layers;
    Request {
        model,
        seq_len: 4096,
        global_batch: 64,
        micro_batch_size: Some(1),
        microbatches: None,
        pipeline: None,
        schedule: None,
        recompute: Recompute::Auto,
        offload: Offload::Auto,
        shard_optimizer: false,
    }
}

#[test]
fn llama2_70b_on_64_a100s_fits_and_explains_the_runners_up() {
    let cluster = presets::cluster("a100-80g-pp8-tp8").unwrap();
    let answer = search(&request(80), &cluster).unwrap();
    assert!(answer.best.fits);
    assert!(answer.best.peak_bytes <= answer.budget_bytes);
    assert!(!answer.runners_up.is_empty());
    for r in &answer.runners_up {
        assert!(!r.why.is_empty());
        assert!(r.candidate.tokens_per_s <= answer.best.tokens_per_s || !r.candidate.fits);
    }
    crate::plan::validate::validate(&answer.plan).unwrap();
}

#[test]
fn too_little_memory_is_a_typed_error_with_what_would_fit() {
    let mut cluster = presets::cluster("a100-80g-pp8-tp8").unwrap();
    cluster.memory_bytes = 4 << 30;
    let err = search(&request(80), &cluster).unwrap_err();
    let PlanError::DoesNotFit {
        have_bytes,
        need_bytes,
        closest,
    } = err
    else {
        panic!("{err}")
    };
    assert!(need_bytes > have_bytes);
    assert!(closest.contains("pp8"), "{closest}");
    // With the memory it asked for, that configuration fits.
    cluster.memory_bytes =
        (need_bytes as f64 / (1.0 - cluster.reserve_fraction)) as u64 + (1 << 20);
    assert!(search(&request(80), &cluster).is_ok());
}

#[test]
fn bad_requests_are_typed_errors() {
    let cluster = presets::cluster("a100-80g-pp8-tp8").unwrap();
    let mut r = request(80);
    r.model.kv_heads = 7;
    assert_eq!(
        search(&r, &cluster).unwrap_err().field(),
        Some("model.kv_heads")
    );
    let mut r = request(80);
    r.seq_len = 0;
    assert_eq!(search(&r, &cluster).unwrap_err().field(), Some("seq_len"));
    let mut r = request(80);
    r.pipeline = Some(3);
    assert_eq!(search(&r, &cluster).unwrap_err().field(), Some("pipeline"));
    let mut r = request(4);
    r.pipeline = Some(8);
    assert_eq!(
        search(&r, &cluster).unwrap_err().field(),
        Some("model.layers")
    );
    let mut r = request(80);
    r.pipeline = Some(8);
    r.schedule = Some(ScheduleKind::Interleaved {
        chunks_per_device: 2,
    });
    r.microbatches = Some(6);
    assert_eq!(
        search(&r, &cluster).unwrap_err().field(),
        Some("microbatches")
    );
}

fn tiny_request(global_batch: u32, pipeline: Option<u32>) -> Request {
    Request {
        model: presets::model("tiny").unwrap(),
        seq_len: 64,
        global_batch,
        micro_batch_size: Some(2),
        microbatches: None,
        pipeline,
        schedule: None,
        recompute: Recompute::Auto,
        offload: Offload::Auto,
        shard_optimizer: false,
    }
}

/// Reductions per chunk in a plan's programs.
fn reductions(plan: &Plan) -> Vec<usize> {
    (0..plan.chunks.len() as u32)
        .map(|c| {
            let is_c = |a: &&crate::plan::Action| {
                matches!(a, crate::plan::Action::Reduce { chunk, .. } if *chunk == c)
            };
            plan.programs.iter().flatten().filter(is_c).count()
        })
        .collect()
}

#[test]
fn each_degree_gets_the_replicas_the_devices_and_the_batch_allow() {
    let cpu = Cluster::cpu(4, 1 << 30);
    // 6 micro-batches of 2: one stage runs 3 replicas (4 do not split 6), two stages 2.
    let answer = search(&tiny_request(12, None), &cpu).unwrap();
    let mut seen = vec![(answer.best.pipeline, answer.best.data_parallel)];
    seen.extend(
        (answer.runners_up.iter()).map(|r| (r.candidate.pipeline, r.candidate.data_parallel)),
    );
    for (p, dp) in &seen {
        let want = match p {
            1 => 3,
            2 => 2,
            _ => 1,
        };
        assert_eq!(*dp, want, "pp{p}: {seen:?}");
    }
    let best = &answer.best;
    assert_eq!(answer.plan.replicas, best.data_parallel);
    assert_eq!(best.microbatches * best.data_parallel * 2, 12);
    validate(&answer.plan).unwrap();
    let each = if best.data_parallel > 1 { 1 } else { 0 };
    assert!(reductions(&answer.plan).iter().all(|&n| n == each));
    // A pipeline alone on the 4 devices is no faster: the search would have taken it.
    let pp_only = search(&tiny_request(12, Some(4)), &cpu).unwrap();
    assert_eq!(pp_only.best.data_parallel, 1);
    assert!(pp_only.best.tokens_per_s <= best.tokens_per_s);
    // Two stages fixed on four devices: two replicas of them.
    let two = search(&tiny_request(12, Some(2)), &cpu).unwrap();
    assert_eq!((two.best.pipeline, two.plan.replicas), (2, 2));
    assert_eq!(reductions(&two.plan), vec![1; two.plan.chunks.len()]);
}

#[test]
fn reductions_are_timed_on_the_links() {
    // A 7B model on eight GPUs, two stages: four replicas all-reduce each chunk's gradients.
    let mut cluster = presets::cluster("h100-80g-x8").unwrap();
    let mut req = request(32);
    req.model = presets::model("llama2-7b").unwrap();
    req.pipeline = Some(2);
    req.schedule = Some(ScheduleKind::OneFOneB);
    let fast = search(&req, &cluster).unwrap();
    assert_eq!(fast.best.data_parallel, 4);
    let reducing = |a: &Answer| -> f64 {
        (a.plan.programs[0].iter().zip(&a.sim.devices[0].spans))
            .filter(|(a, _)| matches!(a, crate::plan::Action::Reduce { .. }))
            .map(|(_, (t0, t1))| t1 - t0)
            .sum()
    };
    // Ten times slower links: the reductions take about ten times as long, and so the step.
    cluster.p2p_bytes_per_s /= 10.0;
    let slow = search(&req, &cluster).unwrap();
    assert_eq!(slow.best.data_parallel, 4);
    assert!(reducing(&fast) > 0.0);
    assert!(
        reducing(&slow) > 5.0 * reducing(&fast),
        "{} vs {}",
        reducing(&slow),
        reducing(&fast)
    );
    assert!(slow.best.step_time_s > fast.best.step_time_s);
}

#[test]
fn a_plan_that_fits_only_with_sharded_optimizer_state_is_found() {
    // One stage on two devices: two replicas. Between the sharded and the whole plan's
    // peaks, only the sharded one fits, and the search plans candidates sharded.
    let mut req = tiny_request(8, Some(1));
    req.recompute = Recompute::None;
    req.offload = Offload::None;
    let roomy = Cluster::cpu(2, 1 << 30);
    let whole = search(&req, &roomy).unwrap();
    req.shard_optimizer = true;
    let sharded = search(&req, &roomy).unwrap();
    assert_eq!((whole.plan.replicas, sharded.plan.replicas), (2, 2));
    assert!(!whole.plan.sharded(0) && !whole.best.shard_optimizer);
    assert!(sharded.best.shard_optimizer, "{}", describe(&sharded.best));
    for c in 0..sharded.plan.chunks.len() as u32 {
        assert!(sharded.plan.sharded(c));
    }
    validate(&sharded.plan).unwrap();
    let (w, s) = (whole.best.needs_bytes(), sharded.best.needs_bytes());
    assert!(s < w, "sharded {s} vs whole {w}");
    let tight = Cluster::cpu(2, (w + s) / 2);
    req.shard_optimizer = false;
    let err = search(&req, &tight).unwrap_err();
    assert!(matches!(err, PlanError::DoesNotFit { .. }), "{err}");
    req.shard_optimizer = true;
    let found = search(&req, &tight).unwrap();
    assert!(found.best.fits && found.plan.sharded(0));
    assert_eq!(found.best.needs_bytes(), s);
    assert_eq!(found.sim.peak_bytes(), found.best.peak_bytes);
    assert!(describe(&found.best).starts_with("pp1 dp2 sharded "));
}
