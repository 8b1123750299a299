//! Writing a checkpoint so that it is whole or absent: its files go into a hidden staging
//! directory beside it, its manifest last, and only then does the staging directory take the
//! checkpoint's name. A write that fails (a full disk, say) removes what it staged and leaves
//! every earlier checkpoint as it was.

use std::path::{Path, PathBuf};

use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::manifest::write_manifest;

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.{suffix}"))
}

/// Where `dir`'s files are written before they are complete.
pub fn staging_dir(dir: &Path) -> PathBuf {
    sibling(dir, "partial")
}

fn remove_dir(dir: &Path) -> Result<(), CheckpointError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError::write(dir, e)),
        _ => Ok(()),
    }
}

/// Runs `write` on a staging directory, adds the manifest, and puts it in place of `dir`
/// (replacing an older checkpoint of the same name). On any error the staging directory is
/// removed and `dir` is untouched.
pub fn write_checkpoint<E: From<CheckpointError>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let staging = staging_dir(dir);
    let staged = remove_dir(&staging)
        .and_then(|_| {
            std::fs::create_dir_all(&staging).map_err(|e| CheckpointError::write(&staging, e))
        })
        .map_err(E::from)
        .and_then(|_| write(&staging))
        .and_then(|_| write_manifest(&staging).map(|_| ()).map_err(E::from));
    if let Err(e) = staged {
        if let Err(left) = remove_dir(&staging) {
            tracing::warn!(error = %left, "cannot remove a partial checkpoint");
        }
        return Err(e);
    }
    replace(&staging, dir).map_err(E::from)
}

fn replace(staging: &Path, dir: &Path) -> Result<(), CheckpointError> {
    let old = sibling(dir, "old");
    if dir.exists() {
        remove_dir(&old)?;
        std::fs::rename(dir, &old).map_err(|e| CheckpointError::write(dir, e))?;
    }
    std::fs::rename(staging, dir).map_err(|e| CheckpointError::write(dir, e))?;
    remove_dir(&old)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| CheckpointError::write(parent, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::checkpoint::manifest::verify;

    #[test]
    fn a_failed_write_leaves_the_older_checkpoint_and_no_partial_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-4");
        write_checkpoint::<CheckpointError>(&dir, |d| {
            std::fs::write(d.join("model.safetensors"), b"first").unwrap();
            Ok(())
        })
        .unwrap();
        let failed = write_checkpoint::<CheckpointError>(&dir, |d| {
            std::fs::write(d.join("model.safetensors"), b"torn").unwrap();
            Err(CheckpointError::write(
                d,
                std::io::Error::other("disk full"),
            ))
        });
        assert!(failed.is_err());
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            b"first"
        );
        assert!(verify(&dir, true).is_ok());
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["step-4"], "nothing staged is left behind");

        write_checkpoint::<CheckpointError>(&dir, |d| {
            std::fs::write(d.join("model.safetensors"), b"second").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            b"second"
        );
        assert!(verify(&dir, true).is_ok());
    }
}
