//! `manifest.json`: each file of a checkpoint with its size and sha256, written last and
//! atomically, so a checkpoint is complete exactly when its manifest is there and its files
//! match it. A torn write (a killed worker, a full disk) or a file altered since leaves a
//! checkpoint that `verify` refuses, naming the file, never a server path.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::exec::checkpoint::CheckpointError;

pub const MANIFEST: &str = "manifest.json";
const MANIFEST_TEMP: &str = ".manifest.json.tmp";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    pub fn file(&self, name: &str) -> Option<&ManifestFile> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Why a checkpoint directory is not a complete checkpoint. Messages name files only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incomplete {
    #[error("it has no manifest (its writing never finished)")]
    NoManifest,
    #[error("its manifest is unreadable: {0}")]
    BadManifest(String),
    #[error("{name} is missing")]
    Missing { name: String },
    #[error("{name} holds {bytes} bytes, its manifest says {expected}")]
    Size {
        name: String,
        bytes: u64,
        expected: u64,
    },
    #[error("{name} differs from its manifest's sha256")]
    Digest { name: String },
    #[error("{name} cannot be read: {reason}")]
    Unreadable { name: String, reason: String },
}

fn io_err(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::write(path, e)
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Syncs the named files of `dir` to storage (a rank's shard, before rank 0 is told of it).
pub fn sync_files(dir: &Path, names: &[String]) -> Result<(), CheckpointError> {
    for name in names {
        let path = dir.join(name);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&path, e))?;
    }
    Ok(())
}

/// Syncs every file of `dir` and writes its manifest (temp file, sync, rename, sync the
/// directory): the last write of a checkpoint.
pub fn write_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name == MANIFEST || name.starts_with('.') || !path.is_file() {
            continue;
        }
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&path, e))?;
        let bytes = entry.metadata().map_err(|e| io_err(&path, e))?.len();
        let sha256 = sha256_file(&path).map_err(|e| io_err(&path, e))?;
        files.push(ManifestFile {
            name,
            bytes,
            sha256,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest { files };
    let temp = dir.join(MANIFEST_TEMP);
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    File::create(&temp)
        .and_then(|mut f| f.write_all(&text).and_then(|_| f.sync_all()))
        .map_err(|e| io_err(&temp, e))?;
    std::fs::rename(&temp, dir.join(MANIFEST)).map_err(|e| io_err(&temp, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))?;
    Ok(manifest)
}

/// The manifest of `dir`, when it has one that parses.
pub fn read_manifest(dir: &Path) -> Result<Manifest, Incomplete> {
    let text = match std::fs::read(dir.join(MANIFEST)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Incomplete::NoManifest),
        Err(e) => return Err(Incomplete::BadManifest(e.to_string())),
    };
    serde_json::from_slice(&text).map_err(|e| Incomplete::BadManifest(e.to_string()))
}

/// One file of `dir` against its manifest entry: its size, and its sha256 when `hash`.
pub fn check_file(dir: &Path, file: &ManifestFile, hash: bool) -> Result<(), Incomplete> {
    let path = dir.join(&file.name);
    let unreadable = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Incomplete::Missing {
            name: file.name.clone(),
        },
        _ => Incomplete::Unreadable {
            name: file.name.clone(),
            reason: e.kind().to_string(),
        },
    };
    let bytes = std::fs::metadata(&path).map_err(unreadable)?.len();
    if bytes != file.bytes {
        return Err(Incomplete::Size {
            name: file.name.clone(),
            bytes,
            expected: file.bytes,
        });
    }
    if hash && sha256_file(&path).map_err(unreadable)? != file.sha256 {
        return Err(Incomplete::Digest {
            name: file.name.clone(),
        });
    }
    Ok(())
}

/// Whether `dir` is a complete checkpoint: its manifest is there and every file it lists has
/// its size and, when `hash`, its sha256 (sizes alone are a cheap check for listings).
pub fn verify(dir: &Path, hash: bool) -> Result<Manifest, Incomplete> {
    let manifest = read_manifest(dir)?;
    for file in &manifest.files {
        check_file(dir, file, hash)?;
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), vec![7u8; 4096]).unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        write_manifest(dir.path()).unwrap();
        dir
    }

    #[test]
    fn a_written_manifest_verifies_and_lists_every_file() {
        let dir = checkpoint();
        let manifest = verify(dir.path(), true).unwrap();
        let names: Vec<_> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", "model.safetensors"]);
        assert_eq!(manifest.file("model.safetensors").unwrap().bytes, 4096);
        assert!(!dir.path().join(MANIFEST_TEMP).exists());
    }

    #[test]
    fn missing_truncated_and_altered_files_are_refused_by_name() {
        let dir = checkpoint();
        let model = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&model, &bytes).unwrap();
        // Sizes alone cannot see an altered byte; the hash does.
        assert!(verify(dir.path(), false).is_ok());
        assert_eq!(
            verify(dir.path(), true),
            Err(Incomplete::Digest {
                name: "model.safetensors".into()
            })
        );
        std::fs::write(&model, &bytes[..1000]).unwrap();
        assert_eq!(
            verify(dir.path(), false),
            Err(Incomplete::Size {
                name: "model.safetensors".into(),
                bytes: 1000,
                expected: 4096
            })
        );
        std::fs::remove_file(&model).unwrap();
        assert_eq!(
            verify(dir.path(), false),
            Err(Incomplete::Missing {
                name: "model.safetensors".into()
            })
        );
        std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        assert_eq!(verify(dir.path(), false), Err(Incomplete::NoManifest));
    }
}
