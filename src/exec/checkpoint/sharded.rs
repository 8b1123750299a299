//! Hugging Face's two layouts of a set of tensors, for the model (`model`) and the optimizer
//! state (`optimizer`) alike: one `STEM.safetensors`, or shards `STEM-0000i-of-0000n.safetensors`
//! with `STEM.safetensors.index.json` mapping every tensor to its shard (`weight_map`) and
//! giving their bytes (`metadata.total_size`), which `from_pretrained` reads. A run over ranks
//! writes a shard per rank; a one-process run writes one file, or shards above `MAX_SHARD_BYTES`.
//! Whatever reads a checkpoint opens a [`TensorSet`], which reads either.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::manifest::{Incomplete, Manifest};
use crate::exec::checkpoint::safetensors_io::TensorFile;

/// The model's weights.
pub const MODEL: &str = "model";
/// AdamW's moments.
pub const OPTIMIZER: &str = "optimizer";
/// A one-process checkpoint splits its tensors into shards of at most this many bytes (a
/// tensor larger than this gets a shard of its own), as transformers does by default.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Which of a checkpoint's shards a writer writes: `index` of `count` (from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The whole checkpoint in one file.
    pub const ONE: Shard = Shard { index: 0, count: 1 };

    /// The file of this shard of `stem`'s tensors: `STEM.safetensors` when it is the only one.
    pub fn file(self, stem: &str) -> String {
        if self.count <= 1 {
            format!("{stem}.safetensors")
        } else {
            format!(
                "{stem}-{:05}-of-{:05}.safetensors",
                self.index + 1,
                self.count
            )
        }
    }
}

/// `STEM.safetensors.index.json`.
pub fn index_file(stem: &str) -> String {
    format!("{stem}.safetensors.index.json")
}

/// What an index file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub metadata: IndexMetadata,
    /// Tensor name to the file holding it.
    pub weight_map: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexMetadata {
    /// The bytes of every tensor's data together.
    pub total_size: u64,
}

impl ShardIndex {
    /// The distinct files the index names, in order.
    pub fn files(&self) -> Vec<&str> {
        let mut files: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        files.sort_unstable();
        files.dedup();
        files
    }
}

fn format_err(path: &Path, reason: impl ToString) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Each tensor's name and data bytes from a safetensors file's header, without its data.
pub fn header_sizes(path: &Path) -> Result<Vec<(String, u64)>, CheckpointError> {
    let io = |e: std::io::Error| CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    let file_len = file.metadata().map_err(io)?.len();
    if len > file_len.saturating_sub(8) {
        return Err(format_err(path, format!("a header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format_err(path, e))?;
    let mut sizes = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .filter(|(begin, end)| begin <= end)
            .ok_or_else(|| format_err(path, format!("tensor {name} has no data_offsets")))?;
        sizes.push((name, offsets.1 - offsets.0));
    }
    Ok(sizes)
}

/// Writes `STEM.safetensors.index.json` for the `count` shards of `stem` in `dir`, from their
/// headers; a tensor in two shards is refused.
pub fn write_index(dir: &Path, stem: &str, count: u32) -> Result<ShardIndex, CheckpointError> {
    let mut index = ShardIndex {
        metadata: IndexMetadata { total_size: 0 },
        weight_map: BTreeMap::new(),
    };
    for i in 0..count {
        let file = Shard { index: i, count }.file(stem);
        let path = dir.join(&file);
        for (name, bytes) in header_sizes(&path)? {
            if let Some(other) = index.weight_map.insert(name.clone(), file.clone()) {
                return Err(format_err(
                    &path,
                    format!("tensor {name} is in {other} too"),
                ));
            }
            index.metadata.total_size += bytes;
        }
    }
    let path = dir.join(index_file(stem));
    let text = serde_json::to_vec_pretty(&index).map_err(|e| format_err(&path, e))?;
    std::fs::write(&path, text).map_err(|e| CheckpointError::write(&path, e))?;
    Ok(index)
}

/// The index of `stem` in `dir`, when the checkpoint is sharded (`None`: one file).
pub fn read_index(dir: &Path, stem: &str) -> Result<Option<ShardIndex>, CheckpointError> {
    let path = dir.join(index_file(stem));
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CheckpointError::Io {
                path,
                reason: e.to_string(),
            });
        }
    };
    let index: ShardIndex = serde_json::from_slice(&text).map_err(|e| format_err(&path, e))?;
    // The index names files beside it, never a path elsewhere.
    if let Some(bad) = index.files().into_iter().find(|f| !is_plain_name(f)) {
        return Err(format_err(&path, format!("{bad:?} is not a file name")));
    }
    Ok(Some(index))
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && Path::new(name).file_name().is_some()
}

/// The files of `stem`'s tensors in `dir`, whichever layout: the one file, or the index and
/// every shard it names.
pub fn files_of(dir: &Path, stem: &str) -> Result<Vec<String>, CheckpointError> {
    Ok(match read_index(dir, stem)? {
        None => vec![Shard::ONE.file(stem)],
        Some(index) => {
            let mut files = vec![index_file(stem)];
            files.extend(index.files().into_iter().map(str::to_string));
            files
        }
    })
}

/// Whether `manifest` lists every file of `stem`'s tensors in `dir`, whichever layout: a
/// checkpoint that lacks one (or whose index does not parse) cannot be loaded. Names files,
/// never a server path.
pub fn check_listed(dir: &Path, manifest: &Manifest, stem: &str) -> Result<(), Incomplete> {
    let files = files_of(dir, stem).map_err(|e| Incomplete::Unreadable {
        name: index_file(stem),
        reason: match e {
            CheckpointError::Format { reason, .. } | CheckpointError::Io { reason, .. } => reason,
            other => other.to_string(),
        },
    })?;
    match files.into_iter().find(|f| manifest.file(f).is_none()) {
        Some(name) => Err(Incomplete::Missing { name }),
        None => Ok(()),
    }
}

/// `stem`'s tensors in `dir`, read from one file or from the shards its index names.
pub struct TensorSet {
    files: Vec<TensorFile>,
    /// Tensor name to its file's position in `files` (sharded only).
    map: Option<BTreeMap<String, usize>>,
    index_path: PathBuf,
}

impl TensorSet {
    pub fn open(dir: &Path, stem: &str) -> Result<TensorSet, CheckpointError> {
        let index_path = dir.join(index_file(stem));
        let Some(index) = read_index(dir, stem)? else {
            let file = TensorFile::open(&dir.join(Shard::ONE.file(stem)))?;
            return Ok(TensorSet {
                files: vec![file],
                map: None,
                index_path,
            });
        };
        let names = index.files();
        let files = names
            .iter()
            .map(|f| TensorFile::open(&dir.join(f)))
            .collect::<Result<Vec<_>, _>>()?;
        let map = index
            .weight_map
            .iter()
            .map(|(tensor, file)| {
                let at = names.iter().position(|f| f == file).unwrap_or_default();
                (tensor.clone(), at)
            })
            .collect();
        Ok(TensorSet {
            files,
            map: Some(map),
            index_path,
        })
    }

    fn file_of(&self, name: &str) -> Result<&TensorFile, CheckpointError> {
        let at = match &self.map {
            None => 0,
            Some(map) => *map
                .get(name)
                .ok_or_else(|| CheckpointError::MissingTensor {
                    path: self.index_path.clone(),
                    name: name.to_string(),
                })?,
        };
        Ok(&self.files[at])
    }

    /// The tensor as f32 with its shape (see `TensorFile::f32`).
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        self.file_of(name)?.f32(name)
    }

    /// Every tensor's name, in file order.
    pub fn names(&self) -> Vec<String> {
        self.files.iter().flat_map(TensorFile::names).collect()
    }
}

/// Groups tensors of the given sizes, in order, into shards of at most `max` bytes (a larger
/// tensor alone): the group of each tensor, and the number of groups.
pub fn split_by_size(sizes: &[u64], max: u64) -> (Vec<u32>, u32) {
    let mut groups = Vec::with_capacity(sizes.len());
    let (mut group, mut filled) = (0u32, 0u64);
    for &bytes in sizes {
        if filled > 0 && filled + bytes > max {
            group += 1;
            filled = 0;
        }
        filled += bytes;
        groups.push(group);
    }
    (groups, group + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::checkpoint::safetensors_io::{F32View, write_f32_file};

    fn write(dir: &Path, file: &str, tensors: &[(&str, Vec<f32>)]) {
        let views = tensors
            .iter()
            .map(|(name, data)| {
                let view = F32View {
                    shape: vec![data.len()],
                    data,
                };
                (name.to_string(), view)
            })
            .collect();
        write_f32_file(&dir.join(file), views, None).unwrap();
    }

    #[test]
    fn shard_files_are_named_as_transformers_names_them() {
        assert_eq!(Shard::ONE.file(MODEL), "model.safetensors");
        let second = Shard { index: 1, count: 3 };
        assert_eq!(second.file(MODEL), "model-00002-of-00003.safetensors");
        assert_eq!(
            second.file(OPTIMIZER),
            "optimizer-00002-of-00003.safetensors"
        );
        assert_eq!(index_file(MODEL), "model.safetensors.index.json");
    }

    #[test]
    fn a_sharded_set_reads_as_one_file_does() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (vec![1.0, 2.0], vec![3.5], vec![-1.0, 0.0, 7.0]);
        write(
            dir.path(),
            "model.safetensors",
            &[("a", a.clone()), ("b", b.clone()), ("c", c.clone())],
        );
        let one = TensorSet::open(dir.path(), MODEL).unwrap();

        let sharded = tempfile::tempdir().unwrap();
        let count = 2;
        write(
            sharded.path(),
            &Shard { index: 0, count }.file(MODEL),
            &[("a", a), ("c", c)],
        );
        write(
            sharded.path(),
            &Shard { index: 1, count }.file(MODEL),
            &[("b", b)],
        );
        let index = write_index(sharded.path(), MODEL, count).unwrap();
        assert_eq!(index.metadata.total_size, 6 * 4);
        assert_eq!(index.weight_map["b"], "model-00002-of-00002.safetensors");
        let set = TensorSet::open(sharded.path(), MODEL).unwrap();
        for name in ["a", "b", "c"] {
            assert_eq!(set.f32(name).unwrap(), one.f32(name).unwrap(), "{name}");
        }
        assert!(matches!(
            set.f32("d"),
            Err(CheckpointError::MissingTensor { .. })
        ));
        assert_eq!(
            files_of(sharded.path(), MODEL).unwrap(),
            [
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        assert_eq!(files_of(dir.path(), MODEL).unwrap(), ["model.safetensors"]);
    }

    #[test]
    fn a_tensor_in_two_shards_and_an_index_naming_a_path_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let count = 2;
        write(
            dir.path(),
            &Shard { index: 0, count }.file(MODEL),
            &[("a", vec![1.0])],
        );
        write(
            dir.path(),
            &Shard { index: 1, count }.file(MODEL),
            &[("a", vec![2.0])],
        );
        let err = write_index(dir.path(), MODEL, count)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor a is in model-00001-of-00002.safetensors too"),
            "{err}"
        );

        let index =
            r#"{"metadata": {"total_size": 4}, "weight_map": {"a": "../model.safetensors"}}"#;
        std::fs::write(dir.path().join(index_file(MODEL)), index).unwrap();
        let err = TensorSet::open(dir.path(), MODEL)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is not a file name"), "{err}");
    }

    #[test]
    fn tensors_split_into_shards_by_size() {
        assert_eq!(split_by_size(&[4, 4, 4], 100), (vec![0, 0, 0], 1));
        assert_eq!(split_by_size(&[4, 4, 4], 8), (vec![0, 0, 1], 2));
        // A tensor larger than a shard gets one of its own.
        assert_eq!(split_by_size(&[3, 20, 3], 8), (vec![0, 1, 2], 3));
        assert_eq!(split_by_size(&[], 8), (vec![], 1));
    }
}
