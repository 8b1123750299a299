//! The SQL both databases share, written once. `sql_store!` expands to a `Store`
//! implementation for a store type with a `pool` field and a `writer()` method that returns a
//! write guard and a write transaction; `lock` is appended to a select that locks the job row it reads and
//! `skip_locked` to the claim's select.

macro_rules! sql_store {
    ($store:ty, $db:ty, lock = $lock:literal, skip_locked = $skip:literal, now_ms = $now:literal) => {
        $crate::store::queue_sql::queue_sql!($store, $db, lock = $lock, skip_locked = $skip, now_ms = $now);
        $crate::store::cluster_sql::cluster_sql!($store, $db, now_ms = $now);
        $crate::store::gang_sql::gang_sql!($store, $db, now_ms = $now);

        #[async_trait::async_trait]
        impl Store for $store {
            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn create_tenant(&self, name: &str) -> StoreResult<TenantRow> {
                let row = TenantRow { id: new_id("tenant"), name: name.to_owned(), created_at: now_ms() };
                sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
                    .bind(&row.id)
                    .bind(&row.name)
                    .bind(row.created_at)
                    .execute(&self.pool)
                    .await?;
                Ok(row)
            }

            async fn create_api_key(
                &self,
                tenant_id: &str,
                name: &str,
                key_hash: &str,
            ) -> StoreResult<ApiKeyRow> {
                let row = ApiKeyRow {
                    id: new_id("key"),
                    tenant_id: tenant_id.to_owned(),
                    name: name.to_owned(),
                    key_hash: key_hash.to_owned(),
                    created_at: now_ms(),
                };
                sqlx::query(
                    "INSERT INTO api_keys (id, tenant_id, name, key_hash, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&row.id)
                .bind(&row.tenant_id)
                .bind(&row.name)
                .bind(&row.key_hash)
                .bind(row.created_at)
                .execute(&self.pool)
                .await?;
                Ok(row)
            }

            async fn tenant_for_key(&self, key_hash: &str) -> StoreResult<Option<String>> {
                Ok(sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE key_hash = $1")
                    .bind(key_hash)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn count_api_keys(&self) -> StoreResult<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn insert_file(&self, file: &FileRow) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO files (id, tenant_id, purpose, filename, bytes, sha256, path, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&file.id)
                .bind(&file.tenant_id)
                .bind(&file.purpose)
                .bind(&file.filename)
                .bind(file.bytes)
                .bind(&file.sha256)
                .bind(&file.path)
                .bind(file.created_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn get_file(&self, tenant_id: &str, id: &str) -> StoreResult<Option<FileRow>> {
                Ok(sqlx::query_as::<_, FileRow>(
                    "SELECT * FROM files WHERE tenant_id = $1 AND id = $2",
                )
                .bind(tenant_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_files(
                &self,
                tenant_id: &str,
                before: Option<&str>,
                limit: i64,
            ) -> StoreResult<Vec<FileRow>> {
                Ok(sqlx::query_as::<_, FileRow>(
                    "SELECT * FROM files WHERE tenant_id = $1 AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3",
                )
                .bind(tenant_id)
                .bind(before.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn delete_file(&self, tenant_id: &str, id: &str) -> StoreResult<Option<FileRow>> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    let file = sqlx::query_as::<_, FileRow>(
                        "SELECT * FROM files WHERE tenant_id = $1 AND id = $2",
                    )
                    .bind(tenant_id)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(file) = file else { return Ok(None) };
                    let user: Option<String> = sqlx::query_scalar(
                        "SELECT j.id FROM job_files f JOIN jobs j ON j.id = f.job_id \
                         WHERE f.file_id = $1 AND j.state NOT IN ('succeeded', 'failed', 'cancelled') \
                         ORDER BY j.id LIMIT 1",
                    )
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(job) = user {
                        return Err(StoreError::FileInUse { file: id.to_owned(), job });
                    }
                    sqlx::query("DELETE FROM files WHERE id = $1").bind(id).execute(&mut *tx).await?;
                    Ok(Some(file))
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn get_job(&self, tenant_id: &str, id: &str) -> StoreResult<Option<JobRow>> {
                let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND id = $2");
                Ok(sqlx::query_as::<_, JobRow>(&sql)
                    .bind(tenant_id)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn get_job_any(&self, id: &str) -> StoreResult<Option<JobRow>> {
                let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
                Ok(sqlx::query_as::<_, JobRow>(&sql).bind(id).fetch_optional(&self.pool).await?)
            }

            async fn list_jobs(
                &self,
                tenant_id: &str,
                before: Option<&str>,
                state: Option<JobState>,
                limit: i64,
            ) -> StoreResult<Vec<JobRow>> {
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND ($2 = '' OR id < $2) \
                     AND ($3 = '' OR state = $3) ORDER BY id DESC LIMIT $4"
                );
                Ok(sqlx::query_as::<_, JobRow>(&sql)
                    .bind(tenant_id)
                    .bind(before.unwrap_or(""))
                    .bind(state.map(JobState::as_str).unwrap_or(""))
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn get_plan(&self, tenant_id: &str, id: &str) -> StoreResult<Option<PlanRow>> {
                Ok(sqlx::query_as::<_, PlanRow>(
                    "SELECT plan, plan_svg, plan_summary FROM jobs WHERE tenant_id = $1 AND id = $2",
                )
                .bind(tenant_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn set_plan(&self, id: &str, plan: &PlanRow, devices_needed: i64) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE jobs SET plan = $2, plan_svg = $3, plan_summary = $4, devices_needed = $5 \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(plan.plan.as_deref())
                .bind(plan.plan_svg.as_deref())
                .bind(plan.plan_summary.as_deref())
                .bind(devices_needed)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn queue_position(&self, id: &str) -> StoreResult<i64> {
                // Counting is linear in the jobs ahead, so it stops past QUEUE_POSITION_CAP. The
                // ORDER BY makes the planner walk the `jobs_queue` index in order and stop at
                // the limit (a bitmap scan would visit every queued job first).
                Ok(sqlx::query_scalar(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state = 'queued' AND id <= $1 ORDER BY id LIMIT $2) AS ahead",
                )
                .bind(id)
                .bind(QUEUE_POSITION_CAP + 1)
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn queue_positions(&self, ids: &[&str]) -> StoreResult<Vec<i64>> {
                // One walk of the first QUEUE_POSITION_CAP + 1 queued ids serves every job asked
                // about; a job not among them is further back.
                let order: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT $1",
                )
                .bind(QUEUE_POSITION_CAP + 1)
                .fetch_all(&self.pool)
                .await?;
                Ok(ids
                    .iter()
                    .map(|id| {
                        order
                            .iter()
                            .position(|q| q == id)
                            .map_or(QUEUE_POSITION_CAP + 1, |i| i as i64 + 1)
                    })
                    .collect())
            }

            async fn queued_jobs(&self, limit: i64) -> StoreResult<Vec<JobRow>> {
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY id LIMIT $1"
                );
                Ok(sqlx::query_as::<_, JobRow>(&sql).bind(limit).fetch_all(&self.pool).await?)
            }

            async fn latest_checkpoint(&self, id: &str) -> StoreResult<Option<CheckpointRow>> {
                Ok(sqlx::query_as::<_, CheckpointRow>(
                    "SELECT * FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 1",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn list_checkpoints(&self, id: &str) -> StoreResult<Vec<CheckpointRow>> {
                Ok(sqlx::query_as::<_, CheckpointRow>(
                    "SELECT * FROM checkpoints WHERE job_id = $1 ORDER BY step",
                )
                .bind(id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn checkpoints_in_use(&self, id: &str) -> StoreResult<Vec<(i64, String)>> {
                Ok(sqlx::query_as::<_, (i64, String)>(
                    "SELECT c.step, j.id FROM job_checkpoints c JOIN jobs j ON j.id = c.job_id \
                     WHERE c.source_job_id = $1 AND j.state NOT IN ('succeeded', 'failed', 'cancelled') \
                     ORDER BY c.step, j.id",
                )
                .bind(id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn delete_checkpoint(&self, lease: &Lease, step: i64) -> StoreResult<bool> {
                let (_write, mut tx) = self.writer().await?;
                let id = lease.job_id.as_str();
                let result: StoreResult<_> = async {
                    Self::lock_leased(&mut tx, lease).await?;
                    // Locked before the holders are looked for, as `insert_job` locks it
                    // before it holds it: a job being created with it is seen, or refused.
                    let sql = format!(
                        "SELECT step FROM checkpoints WHERE job_id = $1 AND step = $2{}",
                        $lock
                    );
                    sqlx::query_scalar::<_, i64>(&sql)
                        .bind(id)
                        .bind(step)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let deleted = sqlx::query(
                        "DELETE FROM checkpoints WHERE job_id = $1 AND step = $2 AND NOT EXISTS (\
                         SELECT 1 FROM job_checkpoints c JOIN jobs j ON j.id = c.job_id \
                         WHERE c.source_job_id = $1 AND c.step = $2 \
                         AND j.state NOT IN ('succeeded', 'failed', 'cancelled'))",
                    )
                    .bind(id)
                    .bind(step)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if deleted > 0 {
                        let event = serde_json::json!({"step": step, "reason": "training.keep_checkpoints"});
                        Self::event_in(&mut tx, id, "checkpoint_deleted", &event.to_string(), None).await?;
                    }
                    Ok(deleted > 0)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn record_stopped_early(&self, lease: &Lease, key: &str, data: &str) -> StoreResult<()> {
                let (_write, mut tx) = self.writer().await?;
                let id = lease.job_id.as_str();
                let result: StoreResult<_> = async {
                    Self::lock_leased(&mut tx, lease).await?;
                    if Self::recorded(&mut tx, id, key).await? {
                        return Ok(());
                    }
                    sqlx::query("UPDATE jobs SET stopped_early = TRUE WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    Self::event_in(&mut tx, id, "stopped_early", data, Some(key)).await?;
                    Ok(())
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn get_checkpoint(&self, id: &str, step: i64) -> StoreResult<Option<CheckpointRow>> {
                Ok(sqlx::query_as::<_, CheckpointRow>(
                    "SELECT * FROM checkpoints WHERE job_id = $1 AND step = $2",
                )
                .bind(id)
                .bind(step)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn append_event(&self, id: &str, kind: &str, data: &str) -> StoreResult<i64> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    Self::lock_job(&mut tx, id).await?;
                    let seq = Self::event_in(&mut tx, id, kind, data, None).await?;
                    Ok(seq)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn list_events(&self, id: &str, after: i64, limit: i64) -> StoreResult<Vec<EventRow>> {
                Ok(sqlx::query_as::<_, EventRow>(
                    "SELECT * FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(id)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn list_metrics(
                &self,
                id: &str,
                after_step: i64,
                limit: i64,
            ) -> StoreResult<Vec<MetricRow>> {
                Ok(sqlx::query_as::<_, MetricRow>(
                    "SELECT job_id, step, created_at, data FROM metrics \
                     WHERE job_id = $1 AND step > $2 ORDER BY step LIMIT $3",
                )
                .bind(id)
                .bind(after_step)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn devices_in_use(&self, worker_id: &str) -> StoreResult<Vec<(String, String)>> {
                let rows: Vec<(String, Option<String>)> = sqlx::query_as(
                    "SELECT id, devices FROM jobs WHERE worker_id = $1 \
                     AND state IN ('running', 'pausing', 'cancelling')",
                )
                .bind(worker_id)
                .fetch_all(&self.pool)
                .await?;
                let mut used = Vec::new();
                for (job, devices) in rows {
                    let devices: Vec<String> = serde_json::from_str(devices.as_deref().unwrap_or("[]"))
                        .map_err(|e| StoreError::Corrupt(format!("job {job} devices: {e}")))?;
                    used.extend(devices.into_iter().map(|d| (d, job.clone())));
                }
                Ok(used)
            }

            async fn job_totals(&self) -> StoreResult<JobTotals> {
                let by_state: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state")
                        .fetch_all(&self.pool)
                        .await?;
                let (steps, tokens): (i64, i64) = sqlx::query_as(
                    "SELECT CAST(COALESCE(SUM(step), 0) AS BIGINT), CAST(COALESCE(SUM(tokens), 0) AS BIGINT) FROM jobs",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(JobTotals { by_state, steps, tokens })
            }
            async fn insert_job(&self, job: &NewJob) -> StoreResult<Inserted> {
                self.insert_job_query(job).await
            }

            async fn transition(
                &self,
                id: &str,
                to: JobState,
                change: TransitionChange,
            ) -> StoreResult<JobRow> {
                self.transition_query(id, to, change).await
            }

            async fn claim_job(
                &self,
                worker_id: &str,
                free_devices: &[String],
                lease_ms: i64,
            ) -> StoreResult<Option<Claim>> {
                self.claim_job_query(worker_id, free_devices, lease_ms).await
            }

            async fn heartbeat(&self, lease: &Lease, lease_ms: i64) -> StoreResult<JobState> {
                self.heartbeat_query(lease, lease_ms).await
            }

            async fn requeue_expired(&self) -> StoreResult<Vec<String>> {
                self.requeue_expired_query().await
            }

            async fn discard_metrics_after(&self, lease: &Lease, step: i64) -> StoreResult<u64> {
                self.discard_metrics_after_query(lease, step).await
            }

            async fn record_step(&self, lease: &Lease, key: &str, step: &StepRecord) -> StoreResult<JobState> {
                self.record_step_query(lease, key, step).await
            }

            async fn record_checkpoint(&self, lease: &Lease, key: &str, row: &CheckpointRow) -> StoreResult<()> {
                self.record_checkpoint_query(lease, key, row).await
            }

            async fn record_event(&self, lease: &Lease, key: &str, kind: &str, data: &str) -> StoreResult<()> {
                self.record_event_query(lease, key, kind, data).await
            }
        }
    };
}

pub(super) use sql_store;
