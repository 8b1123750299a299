use super::*;

const GIB: usize = 1 << 30;

#[test]
fn stages_share_their_gpu_equally_or_take_their_cap_if_it_fits() {
    let four = stage_budgets(&[0, 0, 0, 0], None, &[8 * GIB; 4]).unwrap();
    assert_eq!(four[3], ("cuda:0/stage3".to_string(), 2 * GIB));
    let two = stage_budgets(&[0, 1], None, &[8 * GIB, 6 * GIB]).unwrap();
    assert_eq!(
        two,
        vec![
            ("cuda:0".to_string(), 8 * GIB),
            ("cuda:1".to_string(), 6 * GIB)
        ]
    );
    let capped = stage_budgets(&[1, 1], Some(3 * GIB), &[8 * GIB; 2]).unwrap();
    assert!(capped.iter().all(|(_, b)| *b == 3 * GIB));
    let err = stage_budgets(&[1, 1, 1], Some(3 * GIB), &[8 * GIB; 3])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3 stages of 3072 MiB on cuda:1 need 9216 MiB but it has 8192 MiB free"),
        "{err}"
    );
}

#[test]
fn cuda_refuses_head_dimensions_its_kernels_do_not_run_by_field() {
    let spec = |heads: usize| {
        JobSpec::from_json(&format!(
            r#"{{"model": {{"hidden_size": 1024, "num_layers": 2, "num_heads": {heads},
                          "intermediate_size": 256, "vocab_size": 256}},
                "data": {{"train": "f"}},
                "training": {{"seq_len": 16, "micro_batch_size": 1, "microbatches": 1,
                              "steps": 1}}}}"#
        ))
        .unwrap()
    };
    let wide = spec(2);
    let arch = resolve_arch(&wide).unwrap();
    let err = plan_on_gpu(&wide, &arch, "cuda:0", 8 * GIB)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.num_heads") && err.contains("head_dim = hidden_size / num_heads = 512"),
        "{err}"
    );
    assert!(err.contains("use at least 4 heads"), "{err}");
    let fits = spec(4);
    let arch = resolve_arch(&fits).unwrap();
    plan_on_gpu(&fits, &arch, "cuda:0", 8 * GIB).unwrap();
}
