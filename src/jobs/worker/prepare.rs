//! The run of a job, as the worker prepares it for a claim or a rank: its body parsed, its
//! files resolved, its plan, and the checkpoint it resumes from.

use super::Worker;
use super::finish::store_failure;
use crate::jobs::resolve::{ResolveError, resolve_files};
use crate::jobs::resume::complete_checkpoint;
use crate::jobs::runner::{RunFailure, RunRequest};
use crate::spec::JobSpec;
use crate::store::{JobRow, Lease};

impl Worker {
    /// The run of `job`: its files resolved, resuming from its last complete checkpoint when
    /// `resuming`. With the `records` lease, the metrics of steps after that checkpoint go
    /// (they are trained again).
    pub(super) async fn prepare_job(
        &self,
        job: &JobRow,
        resuming: bool,
        records: Option<&Lease>,
    ) -> Result<RunRequest, RunFailure> {
        let spec: JobSpec = serde_json::from_str(&job.spec).map_err(|e| {
            RunFailure::service(
                "corrupt_job",
                format!("stored job body does not parse: {e}"),
            )
        })?;
        let resolved = match resolve_files(self.store.as_ref(), &job.tenant_id, &spec).await {
            Ok(resolved) => resolved,
            Err(ResolveError::Invalid(invalid)) => {
                let first = invalid.first();
                // A starting checkpoint gone since the job was made is not a missing file.
                let code = match spec.model.init.source_job() {
                    Some(_) if first.param == "model.init.from" => "checkpoint_unavailable",
                    _ => "file_not_found",
                };
                return Err(RunFailure::user(
                    code,
                    first.message.clone(),
                    Some(&first.param),
                ));
            }
            Err(ResolveError::Store(e)) => {
                return Err(store_failure(e));
            }
        };
        let store_err = store_failure;
        let plan_row = self
            .store
            .get_plan(&job.tenant_id, &job.id)
            .await
            .map_err(store_err)?;
        let plan = plan_row
            .and_then(|p| p.plan)
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(serde_json::Value::Null);
        let resume_from = match resuming {
            true => complete_checkpoint(self.store.as_ref(), &job.id)
                .await
                .map_err(store_err)?,
            false => None,
        };
        // Steps after the checkpoint are trained again; their earlier metrics go.
        if let Some(lease) = records {
            let kept = resume_from.as_ref().map_or(0, |r| r.step as i64);
            self.store
                .discard_metrics_after(lease, kept)
                .await
                .map_err(store_err)?;
        }
        let device_ids: Vec<String> =
            serde_json::from_str(job.devices.as_deref().unwrap_or("[]")).unwrap_or_default();
        let devices = device_ids
            .iter()
            .filter_map(|d| {
                self.config
                    .devices
                    .iter()
                    .find(|info| &info.id == d)
                    .cloned()
            })
            .collect();
        Ok(RunRequest {
            job_id: job.id.clone(),
            spec: resolved.spec,
            plan,
            devices,
            host_memory_bytes: self.config.host_memory_bytes,
            checkpoint_root: self
                .config
                .data_dir
                .join("jobs")
                .join(&job.id)
                .join("checkpoints"),
            resume_from,
        })
    }
}
