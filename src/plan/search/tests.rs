use super::*;
use crate::plan::presets;

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
