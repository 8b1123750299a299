//! Hugging Face `config.json`, as transformers writes it in any version: read strictly (a field
//! whose setting this project does not implement is refused by name, never ignored) and written
//! back as the class it came from.

use serde_json::{Map, Value, json};

use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::model::config::default_context;
use crate::exec::model::{LlamaConfig, ModelError};
use crate::plan::inventory::ModelDims;
use crate::spec::{Architecture, RopeScaling};

/// Fields that describe how a checkpoint is stored or served, not what training computes.
const METADATA: &[&str] = &[
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "is_llama_config",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "tokenizer_class",
];

/// Fields read into the model (the rotary ones through `read_rope`).
const READ: &[&str] = &[
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
];

/// Fields whose every value but one (or null) changes the model: `(field, what it must be)`.
const FIXED: &[(&str, &str)] = &[
    ("hidden_act", "\"silu\""),
    ("attention_bias", "false"),
    ("mlp_bias", "false"),
    ("use_sliding_window", "false"),
    ("pretraining_tp", "1"),
    ("attention_dropout", "0"),
    ("partial_rotary_factor", "1"),
    ("rope_interleaved", "false"),
];

fn bad(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::BadConfig {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl LlamaConfig {
    /// Reads a transformers config (`LlamaConfig`, `MistralConfig` or `Qwen2Config`), refusing by name every
    /// field set to something the model does not compute.
    pub fn from_hf_json(v: &Value) -> Result<LlamaConfig, ModelError> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad("config.json", "is not a JSON object"))?;
        let architecture = read_architecture(obj)?;
        check_fields(obj)?;
        let int = |key: &str| -> Result<usize, ModelError> {
            obj.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(key, "missing or not a whole number"))
        };
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let kv_heads = match obj.get("num_key_value_heads") {
            Some(Value::Null) | None => heads,
            Some(_) => int("num_key_value_heads")?,
        };
        if let Some(hd) = obj.get("head_dim").filter(|h| !h.is_null()) {
            let hd = hd
                .as_u64()
                .ok_or_else(|| bad("head_dim", "not a whole number"))?;
            if heads > 0 && hd as usize * heads != hidden {
                return Err(bad(
                    "head_dim",
                    format!(
                        "{hd} x {heads} heads != hidden_size {hidden}: a head size apart from \
                         hidden_size / num_attention_heads is not implemented"
                    ),
                ));
            }
        }
        let eps = match obj.get("rms_norm_eps") {
            None => 1e-6,
            Some(e) => e
                .as_f64()
                .ok_or_else(|| bad("rms_norm_eps", "not a number"))?,
        };
        let rope = read_rope(obj)?;
        let cfg = LlamaConfig {
            dims: ModelDims {
                hidden,
                layers: int("num_hidden_layers")?,
                heads,
                kv_heads,
                ffn: int("intermediate_size")?,
                vocab: int("vocab_size")?,
                qkv_bias: architecture.qkv_bias(),
                tied_embeddings: read_tied(obj)?,
            },
            rms_norm_eps: eps as f32,
            rope,
            architecture,
            max_position_embeddings: match obj.get("max_position_embeddings") {
                None | Some(Value::Null) => default_context(rope.scaling),
                Some(_) => int("max_position_embeddings")?,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A `config.json` that transformers' `AutoModelForCausalLM.from_pretrained` loads as the
    /// class this model came from.
    pub fn to_hf_json(&self) -> Value {
        let d = &self.dims;
        let mut v = json!({
            "architectures": [self.architecture.class_name()],
            "model_type": self.architecture.model_type(),
            "hidden_size": d.hidden,
            "num_hidden_layers": d.layers,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim(),
            "intermediate_size": d.ffn,
            "vocab_size": d.vocab,
            "rms_norm_eps": shortest(self.rms_norm_eps),
            "rope_theta": shortest(self.rope.theta),
            "rope_scaling": self.rope.scaling,
            "hidden_act": "silu",
            "tie_word_embeddings": d.tied_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        });
        let extra = match self.architecture {
            Architecture::Llama => json!({"attention_bias": false, "mlp_bias": false}),
            Architecture::Mistral => json!({"sliding_window": null}),
            Architecture::Qwen2 => json!({"sliding_window": null, "use_sliding_window": false}),
        };
        let (Value::Object(out), Value::Object(extra)) = (&mut v, extra) else {
            unreachable!("both are literal objects")
        };
        out.extend(extra);
        v
    }
}

/// The f64 nearest the shortest decimal that reads back as `x` (1e-5, not 9.99999974e-6), so a
/// written config states the value the one it came from did.
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// `tie_word_embeddings`: true, false, or left out or null (false, transformers' default for
/// every class read here).
fn read_tied(obj: &Map<String, Value>) -> Result<bool, ModelError> {
    match obj.get("tie_word_embeddings") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(tied)) => Ok(*tied),
        Some(other) => Err(bad(
            "tie_word_embeddings",
            format!("{other} is not true, false or null"),
        )),
    }
}

/// `model_type`, and `architectures` when given, must name a class this project implements.
fn read_architecture(obj: &Map<String, Value>) -> Result<Architecture, ModelError> {
    let supported = || {
        Architecture::ALL
            .map(|a| format!("{} ({})", a.model_type(), a.class_name()))
            .join(", ")
    };
    let model_type = obj
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model_type", format!("missing; supported: {}", supported())))?;
    let arch = Architecture::ALL
        .into_iter()
        .find(|a| a.model_type() == model_type)
        .ok_or_else(|| {
            bad(
                "model_type",
                format!(
                    "{model_type:?}: this model type is not implemented; supported: {}",
                    supported()
                ),
            )
        })?;
    if let Some(classes) = obj.get("architectures").filter(|c| !c.is_null()) {
        let ok = classes
            .as_array()
            .is_some_and(|c| c.len() == 1 && c[0].as_str() == Some(arch.class_name()));
        if !ok {
            return Err(bad(
                "architectures",
                format!(
                    "{classes}: a {model_type} config.json trains as [\"{}\"] only",
                    arch.class_name()
                ),
            ));
        }
    }
    Ok(arch)
}

/// Every field is read, metadata, or set to the one value the model computes; any other
/// field is refused, since it may change what the checkpoint means.
fn check_fields(obj: &Map<String, Value>) -> Result<(), ModelError> {
    for (key, value) in obj {
        if key.starts_with('_') || METADATA.contains(&key.as_str()) || READ.contains(&key.as_str())
        {
            continue;
        }
        if let Some((_, want)) = FIXED.iter().find(|(k, _)| k == key) {
            let want: Value = serde_json::from_str(want).expect("FIXED holds JSON literals");
            let same = value.is_null()
                || *value == want
                || value.as_f64() == want.as_f64() && want.is_number();
            if !same {
                return Err(bad(
                    key,
                    format!("{value} is not implemented; only {want} (or leaving it out) is"),
                ));
            }
            continue;
        }
        match key.as_str() {
            "sliding_window" if !value.is_null() => {
                if obj.get("use_sliding_window") != Some(&Value::Bool(false)) {
                    return Err(bad(
                        key,
                        format!("{value}: sliding-window attention is not implemented; only null"),
                    ));
                }
            }
            "sliding_window" | "max_window_layers" => {}
            "layer_types" => {
                let full = value.as_array().is_some_and(|types| {
                    types.iter().all(|t| t.as_str() == Some("full_attention"))
                });
                if !full {
                    return Err(bad(
                        key,
                        format!("{value}: only \"full_attention\" layers are implemented"),
                    ));
                }
            }
            _ => {
                return Err(bad(
                    key,
                    format!(
                        "{value}: not a setting chronospipe implements or knows to be harmless, \
                         so the model it describes cannot be trained faithfully"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The base and scaling of rotary embeddings: `rope_theta` at the top or under
/// `rope_parameters` (newer transformers), scaling under `rope_parameters` or `rope_scaling`,
/// its kind named `rope_type` or (older files) `type`.
fn read_rope(obj: &Map<String, Value>) -> Result<Rope, ModelError> {
    let params = obj.get("rope_parameters").filter(|p| !p.is_null());
    let scaling = obj.get("rope_scaling").filter(|p| !p.is_null());
    let number = |field: &str, v: &Value| v.as_f64().ok_or_else(|| bad(field, "not a number"));
    let mut theta = None;
    for (field, v) in [
        ("rope_theta", obj.get("rope_theta")),
        (
            "rope_parameters.rope_theta",
            params.and_then(|p| p.get("rope_theta")),
        ),
    ] {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            let t = number(field, v)?;
            if theta.is_some_and(|seen| seen != t) {
                return Err(bad(
                    field,
                    format!("{t} disagrees with rope_theta {theta:?}"),
                ));
            }
            theta = Some(t);
        }
    }
    let from_params = params
        .map(|p| read_scaling("rope_parameters", p))
        .transpose()?;
    let from_scaling = scaling
        .map(|s| read_scaling("rope_scaling", s))
        .transpose()?;
    if let (Some(a), Some(b)) = (from_params, from_scaling)
        && a != b
    {
        return Err(bad(
            "rope_scaling",
            format!("{b:?} disagrees with rope_parameters' {a:?}"),
        ));
    }
    Ok(Rope {
        theta: theta.unwrap_or(10000.0) as f32,
        scaling: from_params.or(from_scaling).flatten(),
    })
}

/// One rotary settings object: `None` for `default`, the scaling for `linear` and `llama3`;
/// any other kind, or a field the kind does not use, is refused.
fn read_scaling(path: &str, v: &Value) -> Result<Option<RopeScaling>, ModelError> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad(path, format!("{v} is not an object")))?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let uses: &[&str] = match kind {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        other => {
            return Err(bad(
                &format!("{path}.rope_type"),
                format!("{other:?} is not implemented; supported: default, linear, llama3"),
            ));
        }
    };
    for key in obj.keys() {
        if !["rope_type", "type", "rope_theta"].contains(&key.as_str())
            && !uses.contains(&key.as_str())
        {
            return Err(bad(
                &format!("{path}.{key}"),
                format!("is not used by rope_type {kind:?}, and no other use is implemented"),
            ));
        }
    }
    let num = |key: &str| -> Result<f64, ModelError> {
        obj.get(key).and_then(Value::as_f64).ok_or_else(|| {
            bad(
                &format!("{path}.{key}"),
                format!("missing or not a number (rope_type {kind:?} needs it)"),
            )
        })
    };
    let scaling = match kind {
        "default" => return Ok(None),
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        _ => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as u64,
        },
    };
    let mut errors = Vec::new();
    scaling.check(path, &mut errors);
    if let Some(e) = errors.first() {
        return Err(bad(&e.param, e.message.clone()));
    }
    Ok(Some(scaling))
}

#[cfg(test)]
mod tests;
