//! Writing a checkpoint so that it is whole or absent: its files go into a hidden staging
//! directory beside it (one per writing: [`Staging`]), its manifest last, and only then does
//! the staging directory take the checkpoint's name. A write that fails (a full disk, say)
//! removes what it staged and leaves every earlier checkpoint as it was.

use std::path::{Path, PathBuf};

use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::manifest::write_manifest;

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn remove_dir(dir: &Path) -> Result<(), CheckpointError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError::write(dir, e)),
        _ => Ok(()),
    }
}

/// Where one writing of the checkpoint `dir` puts its files until they are complete:
/// `.NAME.TAG.partial` beside it. The tag is fresh for every writing, so two attempts of a job
/// (or a writer the job outlived) never write into each other's files; every rank of a run
/// over ranks writes into the one its rank 0 made (`join`).
pub struct Staging {
    dir: PathBuf,
    tag: String,
}

impl Staging {
    /// Makes a new, empty staging directory for `dir`.
    pub fn create(dir: &Path) -> Result<Staging, CheckpointError> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| CheckpointError::write(parent, e))?;
        loop {
            let staging = Staging {
                dir: dir.to_path_buf(),
                tag: format!("{:016x}", rand::random::<u64>()),
            };
            match std::fs::create_dir(staging.path()) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CheckpointError::write(&staging.path(), e)),
                Ok(()) => return Ok(staging),
            }
        }
    }

    /// The staging directory of `dir` that another rank created and named `name`; refused
    /// unless `name` is one (never a path elsewhere) and it exists.
    pub fn join(dir: &Path, name: &str) -> Result<Staging, CheckpointError> {
        let prefix = format!(".{}.", dir_name(dir));
        let tag = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".partial"))
            .filter(|tag| !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric()));
        let Some(tag) = tag else {
            return Err(CheckpointError::Format {
                path: dir.to_path_buf(),
                reason: format!("{name:?} is not a staging directory of this checkpoint"),
            });
        };
        let staging = Staging {
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
        };
        if !staging.path().is_dir() {
            return Err(CheckpointError::Io {
                path: staging.path(),
                reason: "the staging directory rank 0 made is not there (is the checkpoint \
                         directory shared by every rank?)"
                    .into(),
            });
        }
        Ok(staging)
    }

    /// The staging directory's own name (what other ranks `join`).
    pub fn name(&self) -> String {
        format!(".{}.{}.partial", dir_name(&self.dir), self.tag)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.with_file_name(self.name())
    }

    /// Writes the manifest (every file staged must be there by now) and puts the staging
    /// directory in place of the checkpoint (replacing an older one of the same name), then
    /// removes what other writings of it, or of an earlier step, left staged. On error the
    /// staging directory is removed and `dir` is untouched.
    pub fn commit(self) -> Result<(), CheckpointError> {
        let path = self.path();
        if let Err(e) = write_manifest(&path).and_then(|_| self.replace(&path)) {
            self.discard();
            return Err(e);
        }
        self.remove_stale();
        Ok(())
    }

    /// Removes the staging directory and whatever is in it.
    pub fn discard(self) {
        if let Err(left) = remove_dir(&self.path()) {
            tracing::warn!(error = %left, "cannot remove a partial checkpoint");
        }
    }

    fn replace(&self, staging: &Path) -> Result<(), CheckpointError> {
        let dir = &self.dir;
        let old = dir.with_file_name(format!(".{}.{}.old", dir_name(dir), self.tag));
        if dir.exists() {
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

    /// Staging left beside the checkpoint by writings that never finished: of this checkpoint
    /// (`.NAME.*.partial`, `.NAME.*.old`) and, for `step-N`, of any step up to N. A writer
    /// still at one of them (an attempt the job has moved past) is one whose writing must not
    /// complete; a later step's staging may be a live writer's and stays. Best effort: what
    /// cannot be removed is only logged.
    fn remove_stale(&self) {
        let Some(parent) = self.dir.parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        let name = dir_name(&self.dir);
        let step_of = |n: &str| n.strip_prefix("step-")?.parse::<u64>().ok();
        let upto = step_of(&name);
        for entry in entries.flatten() {
            let entry_name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = entry_name.strip_prefix('.') else {
                continue;
            };
            let Some((of, _)) = rest
                .strip_suffix(".partial")
                .or_else(|| rest.strip_suffix(".old"))
                .and_then(|r| r.rsplit_once('.'))
            else {
                continue;
            };
            let stale = of == name || upto.zip(step_of(of)).is_some_and(|(n, s)| s <= n);
            if stale && let Err(e) = remove_dir(&entry.path()) {
                tracing::warn!(error = %e, "cannot remove a stale partial checkpoint");
            }
        }
    }
}

/// Runs `write` on a new staging directory, adds the manifest, and puts it in place of `dir`
/// (replacing an older checkpoint of the same name). On any error the staging directory is
/// removed and `dir` is untouched.
pub fn write_checkpoint<E: From<CheckpointError>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let staging = Staging::create(dir)?;
    if let Err(e) = write(&staging.path()) {
        staging.discard();
        return Err(e);
    }
    Ok(staging.commit()?)
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

    #[test]
    fn two_writings_stage_apart_and_a_commit_removes_stale_staging() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-6");
        let (a, b) = (
            Staging::create(&dir).unwrap(),
            Staging::create(&dir).unwrap(),
        );
        assert_ne!(a.path(), b.path(), "each writing stages apart");
        assert!(a.name().starts_with(".step-6.") && a.name().ends_with(".partial"));
        let joined = Staging::join(&dir, &a.name()).unwrap();
        assert_eq!(joined.path(), a.path());
        for bad in [
            "../x",
            ".step-6..partial",
            ".step-4.ab.partial",
            ".step-6.a/b.partial",
        ] {
            assert!(Staging::join(&dir, bad).is_err(), "{bad}");
        }
        // Left by writings that never finished: an earlier step's and a later one's.
        let earlier = Staging::create(&root.path().join("step-4")).unwrap();
        let later = Staging::create(&root.path().join("step-8")).unwrap();
        std::fs::write(b.path().join("model.safetensors"), b"torn").unwrap();
        std::fs::write(a.path().join("model.safetensors"), b"whole").unwrap();
        a.commit().unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            b"whole"
        );
        assert!(verify(&dir, true).is_ok());
        assert!(!b.path().exists() && !earlier.path().exists());
        assert!(
            later.path().exists(),
            "a later step's staging may be a live writer's"
        );
    }
}
