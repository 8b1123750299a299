//! Checkpoints in Hugging Face layout: `model.safetensors` (or its shards and
//! `model.safetensors.index.json`: `sharded`) + `config.json` that transformers'
//! `LlamaForCausalLM.from_pretrained` loads, plus the optimizer state in the same layout and
//! `trainer_state.json` for an exact resume, and `manifest.json` written last.

pub mod commit;
pub mod manifest;
pub mod model_files;
pub mod retention;
pub mod safetensors_io;
pub mod sharded;
pub mod single_device;
pub mod trainer_state;

use std::path::PathBuf;

use thiserror::Error;

use crate::exec::device::DeviceError;
use crate::exec::model::ModelError;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// Writing a checkpoint file failed; the OS error says whether storage is full.
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid checkpoint file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor {name}: shape {found:?} in the file, the model needs {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name}: dtype {dtype} is not supported (f32, bf16, f16 are)")]
    WrongDtype { name: String, dtype: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl CheckpointError {
    pub(crate) fn write(path: &std::path::Path, source: std::io::Error) -> Self {
        CheckpointError::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// ENOSPC, EROFS, EDQUOT.
pub fn is_storage_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::ReadOnlyFilesystem | ErrorKind::QuotaExceeded
    )
}
