use crate::spec::JobSpec;

fn spec_with(training: &str) -> JobSpec {
    JobSpec::from_json(&format!(
        r#"{{"model": {{"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                      "intermediate_size": 176, "vocab_size": 256}},
            "data": {{"train": "f"}},
            "training": {{"seq_len": 8, "micro_batch_size": 2, "microbatches": 3, {training}}}}}"#
    ))
    .unwrap()
}

fn refusals(spec: &JobSpec) -> Vec<(String, String)> {
    spec.validate()
        .map_or_else(|e| e.0, |()| Vec::new())
        .into_iter()
        .map(|e| (e.param, e.message))
        .collect()
}

#[test]
fn epochs_or_steps_exactly_one() {
    let both = refusals(&spec_with(r#""steps": 3, "epochs": 2"#));
    assert_eq!(both.len(), 1, "{both:?}");
    assert_eq!(both[0].0, "training.epochs");
    assert!(both[0].1.contains("not both"), "{both:?}");
    let neither = refusals(&spec_with(r#""warmup_steps": 0"#));
    assert_eq!(neither[0].0, "training.steps", "{neither:?}");
    assert!(neither[0].1.contains("training.epochs"), "{neither:?}");
    let zero = refusals(&spec_with(r#""epochs": 0"#));
    assert_eq!(zero[0].0, "training.epochs", "{zero:?}");
    assert!(refusals(&spec_with(r#""epochs": 2"#)).is_empty());
}

/// `epochs` passes over the windows, rounded up to whole steps of 6 sequences.
#[test]
fn epochs_come_to_whole_steps_over_the_windows() {
    let t = spec_with(r#""epochs": 2"#).training;
    assert_eq!(t.total_steps(12).unwrap(), 4);
    assert_eq!(t.total_steps(13).unwrap(), 5); // 26 sequences: the fifth step is partly pass 3
    assert_eq!(t.total_steps(1).unwrap(), 1);
    let given = spec_with(r#""steps": 7"#).training;
    assert_eq!(given.total_steps(1000).unwrap(), 7);
    let warm = spec_with(r#""epochs": 1, "warmup_steps": 3"#).training;
    let err = warm.total_steps(12).unwrap_err();
    assert_eq!(err.param, "training.warmup_steps");
    assert!(err.message.contains("exceed the 2 training steps"), "{err}");
}
