//! The weights (`model.safetensors`, or its shards and index: `sharded`) and `config.json`:
//! the Hugging Face model directory.

use std::path::Path;

use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::safetensors_io::{F32View, write_f32_file};
use crate::exec::checkpoint::sharded::{MODEL, Shard, TensorSet};
use crate::exec::device::PoolRef;
use crate::exec::model::{LlamaConfig, PartId, PartParams};

fn io_err(path: &Path, e: impl ToString) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Reads `DIR/config.json` of a Hugging Face Llama.
pub fn read_hf_config(dir: &Path) -> Result<LlamaConfig, CheckpointError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok(LlamaConfig::from_hf_json(&json)?)
}

/// Copies every parameter of `parts` from a model's tensors, by Hugging Face name.
pub fn load_weights(parts: &mut [PartParams], file: &TensorSet) -> Result<(), CheckpointError> {
    for part in parts.iter_mut() {
        for (name, w) in part.names.iter().zip(part.weights.iter_mut()) {
            let (shape, data) = file.f32(name)?;
            if shape != w.shape() {
                return Err(CheckpointError::ShapeMismatch {
                    name: name.clone(),
                    found: shape,
                    expected: w.shape().to_vec(),
                });
            }
            w.data_mut().copy_from_slice(&data);
        }
    }
    Ok(())
}

/// Allocates the given parts in `pool` and loads them from a Hugging Face directory.
pub fn load_hf_parts(
    dir: &Path,
    config: &LlamaConfig,
    ids: &[PartId],
    pool: &PoolRef,
) -> Result<Vec<PartParams>, CheckpointError> {
    let mut parts = ids
        .iter()
        .map(|&id| PartParams::allocate(pool, config, id))
        .collect::<Result<Vec<_>, _>>()?;
    load_weights(&mut parts, &TensorSet::open(dir, MODEL)?)?;
    Ok(parts)
}

/// Writes `shard` of the model's weights into `dir`: every part given, by HF name.
pub fn save_weights(
    dir: &Path,
    shard: Shard,
    parts: &[&PartParams],
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::write(dir, e))?;
    let tensors = parts
        .iter()
        .flat_map(|p| p.counted().map(|(i, name)| (name, &p.weights[i])))
        .map(|(name, w)| {
            (
                name.clone(),
                F32View {
                    shape: w.shape().to_vec(),
                    data: w.data(),
                },
            )
        })
        .collect();
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    write_f32_file(&dir.join(shard.file(MODEL)), tensors, meta)
}

/// Writes `DIR/config.json`.
pub fn save_config(dir: &Path, config: &LlamaConfig) -> Result<(), CheckpointError> {
    let cfg_path = dir.join("config.json");
    let text =
        serde_json::to_string_pretty(&config.to_hf_json()).map_err(|e| io_err(&cfg_path, e))?;
    std::fs::write(&cfg_path, text).map_err(|e| CheckpointError::write(&cfg_path, e))
}

/// Writes `DIR/model.safetensors` (every part given, HF names) and `DIR/config.json`.
pub fn save_model(
    dir: &Path,
    config: &LlamaConfig,
    parts: &[&PartParams],
) -> Result<(), CheckpointError> {
    save_weights(dir, Shard::ONE, parts)?;
    save_config(dir, config)
}
