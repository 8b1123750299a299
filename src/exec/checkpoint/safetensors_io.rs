//! Reading and writing f32 tensors in safetensors files.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::exec::checkpoint::CheckpointError;

/// One named f32 tensor to write.
pub struct F32View<'a> {
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

pub fn write_f32_file(
    path: &Path,
    tensors: Vec<(String, F32View<'_>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    safetensors::serialize_to_file(tensors, &metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => CheckpointError::Write {
            path: path.to_path_buf(),
            source,
        },
        other => CheckpointError::Format {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// A safetensors file read whole into memory.
pub struct TensorFile {
    pub path: std::path::PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<TensorFile, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file = TensorFile {
            path: path.to_path_buf(),
            bytes,
        };
        file.parsed()?;
        Ok(file)
    }

    fn parsed(&self) -> Result<SafeTensors<'_>, CheckpointError> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| CheckpointError::Format {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.parsed()
            .map(|st| st.names().into_iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The tensor as f32 (from f32, bf16 or f16) with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let st = self.parsed()?;
        let view = st
            .tensor(name)
            .map_err(|_| CheckpointError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(CheckpointError::WrongDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok((view.shape().to_vec(), data))
    }

    /// An integer tensor (i64 or i32) as i32, with its shape.
    pub fn i32(&self, name: &str) -> Result<(Vec<usize>, Vec<i32>), CheckpointError> {
        let st = self.parsed()?;
        let view = st
            .tensor(name)
            .map_err(|_| CheckpointError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as i32)
                .collect(),
            Dtype::I32 => raw
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            other => {
                return Err(CheckpointError::WrongDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok((view.shape().to_vec(), data))
    }
}
