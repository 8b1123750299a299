use serde_json::{Value, json};

use super::*;

fn llama() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 176, "vocab_size": 256,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
        "tie_word_embeddings": false, "attention_dropout": 0.0, "pretraining_tp": 1,
        "bos_token_id": 1, "eos_token_id": [2, 3], "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0", "_name_or_path": "x", "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    })
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v.as_object_mut().unwrap().insert(key.into(), value);
    v
}

/// The field a refusal names and its message.
fn refused(v: &Value) -> (String, String) {
    match LlamaConfig::from_hf_json(v) {
        Err(ModelError::BadConfig { field, reason }) => (field, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const LLAMA3: RopeScaling = RopeScaling::LLAMA_3_1;

#[test]
fn llama3_scaling_reads_in_either_spelling() {
    let old = LlamaConfig::from_hf_json(&llama()).unwrap();
    assert_eq!(old.rope.theta, 500000.0);
    assert_eq!(old.rope.scaling, Some(LLAMA3));
    let mut new = llama();
    let obj = new.as_object_mut().unwrap();
    let mut params = obj.remove("rope_scaling").unwrap();
    obj.remove("rope_theta");
    params
        .as_object_mut()
        .unwrap()
        .insert("rope_theta".into(), json!(500000.0));
    obj.insert("rope_parameters".into(), params);
    assert_eq!(LlamaConfig::from_hf_json(&new).unwrap(), old);
    // Older files name the kind `type`.
    let linear = with(
        llama(),
        "rope_scaling",
        json!({"type": "linear", "factor": 2.0}),
    );
    assert_eq!(
        LlamaConfig::from_hf_json(&linear).unwrap().rope.scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
    let default = with(
        llama(),
        "rope_scaling",
        json!({"rope_type": "default", "rope_theta": 500000.0}),
    );
    assert_eq!(
        LlamaConfig::from_hf_json(&default).unwrap().rope.scaling,
        None
    );
}

#[test]
fn written_configs_read_back_the_same() {
    for architecture in Architecture::ALL {
        let llama = LlamaConfig::from_hf_json(&llama()).unwrap();
        let cfg = LlamaConfig {
            architecture,
            dims: ModelDims {
                qkv_bias: architecture.qkv_bias(),
                tied_embeddings: false,
                ..llama.dims
            },
            ..llama
        };
        let back = LlamaConfig::from_hf_json(&cfg.to_hf_json()).unwrap();
        assert_eq!(back, cfg);
    }
    let written = LlamaConfig::from_hf_json(&llama()).unwrap().to_hf_json();
    assert_eq!(written["max_position_embeddings"], 131072);
    assert_eq!(written["rms_norm_eps"], 1e-5);
    let plain = with(llama(), "rope_scaling", Value::Null);
    let cfg = LlamaConfig::from_hf_json(&plain).unwrap();
    assert_eq!(cfg.to_hf_json()["rope_scaling"], Value::Null);
    assert_eq!(LlamaConfig::from_hf_json(&cfg.to_hf_json()).unwrap(), cfg);
    // A model that states no context gets one its rotary scaling fits.
    let mut unstated = llama();
    unstated
        .as_object_mut()
        .unwrap()
        .remove("max_position_embeddings");
    let unstated = LlamaConfig::from_hf_json(&unstated).unwrap();
    assert_eq!(unstated.to_hf_json()["max_position_embeddings"], 65536);
}

/// `tie_word_embeddings` is read (true, false, left out or null) and written back as read.
#[test]
fn tied_embeddings_are_read_and_written_back() {
    let tied =
        LlamaConfig::from_hf_json(&with(llama(), "tie_word_embeddings", json!(true))).unwrap();
    assert!(tied.dims.tied_embeddings);
    assert_eq!(tied.to_hf_json()["tie_word_embeddings"], json!(true));
    assert_eq!(LlamaConfig::from_hf_json(&tied.to_hf_json()).unwrap(), tied);
    assert!(tied.arch().tie_embeddings);
    assert_eq!(LlamaConfig::from_arch(&tied.arch()).unwrap(), tied);
    for untied in [json!(false), Value::Null] {
        let cfg = LlamaConfig::from_hf_json(&with(llama(), "tie_word_embeddings", untied));
        assert!(!cfg.unwrap().dims.tied_embeddings);
    }
    let mut unstated = llama();
    unstated
        .as_object_mut()
        .unwrap()
        .remove("tie_word_embeddings");
    let cfg = LlamaConfig::from_hf_json(&unstated).unwrap();
    assert!(!cfg.dims.tied_embeddings);
    assert_eq!(cfg.to_hf_json()["tie_word_embeddings"], json!(false));
}

/// A Qwen2 config as transformers writes it, its sliding window off.
fn qwen2() -> Value {
    let mut v = with(llama(), "model_type", json!("qwen2"));
    v = with(v, "architectures", json!(["Qwen2ForCausalLM"]));
    let obj = v.as_object_mut().unwrap();
    obj.remove("attention_bias");
    obj.remove("mlp_bias");
    v = with(v, "sliding_window", json!(4096));
    v = with(v, "use_sliding_window", json!(false));
    with(v, "max_window_layers", json!(28))
}

#[test]
fn qwen2_has_qkv_biases_and_is_written_back_as_qwen2() {
    let cfg = LlamaConfig::from_hf_json(&qwen2()).unwrap();
    assert_eq!(cfg.architecture, Architecture::Qwen2);
    assert!(cfg.dims.qkv_bias);
    let written = cfg.to_hf_json();
    assert_eq!(written["architectures"], json!(["Qwen2ForCausalLM"]));
    assert_eq!(written["model_type"], "qwen2");
    assert_eq!(written["use_sliding_window"], false);
    assert_eq!(LlamaConfig::from_hf_json(&written).unwrap(), cfg);
    assert!(!LlamaConfig::from_hf_json(&llama()).unwrap().dims.qkv_bias);
}

#[test]
fn mistral_without_a_sliding_window_is_a_llama() {
    let mut v = with(llama(), "model_type", json!("mistral"));
    v = with(v, "architectures", json!(["MistralForCausalLM"]));
    v = with(v, "sliding_window", Value::Null);
    let cfg = LlamaConfig::from_hf_json(&v).unwrap();
    assert_eq!(cfg.architecture, Architecture::Mistral);
    assert_eq!(
        cfg.to_hf_json()["architectures"],
        json!(["MistralForCausalLM"])
    );
    let windowed = with(v, "sliding_window", json!(4096));
    let (field, reason) = refused(&windowed);
    assert_eq!(field, "sliding_window");
    assert!(reason.contains("sliding-window"), "{reason}");
}

#[test]
fn every_setting_not_implemented_is_refused_by_name() {
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            with(
                with(qwen2(), "sliding_window", Value::Null),
                "use_sliding_window",
                json!(true),
            ),
            "use_sliding_window",
            "false",
        ),
        (
            with(
                with(qwen2(), "sliding_window", json!(4096)),
                "use_sliding_window",
                Value::Null,
            ),
            "sliding_window",
            "sliding-window",
        ),
        (
            with(llama(), "model_type", json!("gpt2")),
            "model_type",
            "supported: llama",
        ),
        (
            with(
                llama(),
                "architectures",
                json!(["LlamaForSequenceClassification"]),
            ),
            "architectures",
            "LlamaForCausalLM",
        ),
        (
            with(
                llama(),
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
            ),
            "rope_scaling.rope_type",
            "yarn",
        ),
        (
            with(
                llama(),
                "rope_scaling",
                json!({"type": "dynamic", "factor": 2.0}),
            ),
            "rope_scaling.rope_type",
            "dynamic",
        ),
        (
            with(
                llama(),
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0}),
            ),
            "rope_scaling.low_freq_factor",
            "missing",
        ),
        (
            with(
                llama(),
                "rope_scaling",
                json!({"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5}),
            ),
            "rope_scaling.attention_factor",
            "not used",
        ),
        (
            with(llama(), "rope_parameters", json!({"rope_theta": 10000.0})),
            "rope_parameters.rope_theta",
            "disagrees",
        ),
        (
            with(llama(), "tie_word_embeddings", json!("yes")),
            "tie_word_embeddings",
            "true, false or null",
        ),
        (
            with(llama(), "attention_bias", json!(true)),
            "attention_bias",
            "false",
        ),
        (with(llama(), "mlp_bias", json!(true)), "mlp_bias", "false"),
        (
            with(llama(), "hidden_act", json!("gelu")),
            "hidden_act",
            "silu",
        ),
        (
            with(llama(), "pretraining_tp", json!(2)),
            "pretraining_tp",
            "1",
        ),
        (
            with(llama(), "attention_dropout", json!(0.1)),
            "attention_dropout",
            "0",
        ),
        (
            with(llama(), "sliding_window", json!(4096)),
            "sliding_window",
            "null",
        ),
        (
            with(
                llama(),
                "layer_types",
                json!(["full_attention", "sliding_attention"]),
            ),
            "layer_types",
            "full_attention",
        ),
        (
            with(llama(), "head_dim", json!(32)),
            "head_dim",
            "hidden_size",
        ),
        (
            with(llama(), "quantization_config", json!({"bits": 4})),
            "quantization_config",
            "cannot be trained faithfully",
        ),
    ];
    for (config, want_field, want_text) in cases {
        let (field, reason) = refused(&config);
        assert_eq!(field, want_field, "{reason}");
        assert!(
            reason.contains(want_text),
            "{field}: {reason} lacks {want_text:?}"
        );
    }
}
