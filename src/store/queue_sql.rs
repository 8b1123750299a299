//! The job queue's SQL, shared by both databases: locking a job row, sequence-numbered events,
//! checked state transitions, claims, leases and what a running job records.
//! `queue_sql!` expands to inherent methods the `Store` implementation (`sql_store!`) calls.

macro_rules! queue_sql {
    ($store:ty, $db:ty, lock = $lock:literal, skip_locked = $skip:literal, now_ms = $now:literal) => {
        impl $store {
            /// Commits on success; rolls back at once on failure, so no row stays locked until
            /// the connection is next used.
            async fn settle<T>(tx: sqlx::Transaction<'static, $db>, result: StoreResult<T>) -> StoreResult<T> {
                match result {
                    Ok(value) => {
                        tx.commit().await?;
                        Ok(value)
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }

            async fn lock_job(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: &str,
            ) -> StoreResult<JobRow> {
                let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1{}", $lock);
                sqlx::query_as::<_, JobRow>(&sql)
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?
                    .ok_or_else(|| StoreError::JobNotFound(id.to_owned()))
            }

            /// Locks the job row while `lease` holds it: its token is the job's and the job is
            /// on a worker; else `LeaseLost`.
            async fn lock_leased(
                tx: &mut sqlx::Transaction<'static, $db>,
                lease: &Lease,
            ) -> StoreResult<JobRow> {
                let sql = format!("SELECT lease_token FROM jobs WHERE id = $1{}", $lock);
                let token: Option<Option<String>> = sqlx::query_scalar(&sql)
                    .bind(&lease.job_id)
                    .fetch_optional(&mut **tx)
                    .await?;
                let Some(token) = token else {
                    return Err(StoreError::JobNotFound(lease.job_id.clone()));
                };
                let job = Self::lock_job(tx, &lease.job_id).await?;
                if token.as_deref() != Some(lease.token.as_str()) || !job.job_state()?.is_on_worker() {
                    return Err(StoreError::LeaseLost {
                        job: lease.job_id.clone(),
                        worker: lease.worker_id.clone(),
                    });
                }
                Ok(job)
            }

            /// Whether the record `key` of job `id` was written already (its commit landed but
            /// the answer was lost, so the run sent it again).
            async fn recorded(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: &str,
                key: &str,
            ) -> StoreResult<bool> {
                let found: Option<i64> =
                    sqlx::query_scalar("SELECT seq FROM events WHERE job_id = $1 AND record_key = $2")
                        .bind(id)
                        .bind(key)
                        .fetch_optional(&mut **tx)
                        .await?;
                Ok(found.is_some())
            }

            /// Callers hold the job row (`lock_job`) so sequence numbers never race. `key` marks
            /// the event of a run's record (see `recorded`).
            async fn event_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: &str,
                kind: &str,
                data: &str,
                key: Option<&str>,
            ) -> StoreResult<i64> {
                let seq: i64 = sqlx::query_scalar(
                    "INSERT INTO events (job_id, seq, kind, created_at, data, record_key) \
                     SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5 FROM events WHERE job_id = $1 \
                     RETURNING seq",
                )
                .bind(id)
                .bind(kind)
                .bind(now_ms())
                .bind(data)
                .bind(key)
                .fetch_one(&mut **tx)
                .await?;
                Ok(seq)
            }

            async fn transition_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: &str,
                to: JobState,
                change: &TransitionChange,
            ) -> StoreResult<JobRow> {
                if let Some(lease) = &change.lease {
                    Self::lock_leased(tx, lease).await?;
                }
                let job = Self::lock_job(tx, id).await?;
                let from = job.job_state()?;
                let capped;
                let (to, change) = match Self::over_restarts_in(tx, &job, to, change).await? {
                    Some(failed) => {
                        capped = failed;
                        (JobState::Failed, &capped)
                    }
                    None => (to, change),
                };
                from.check(to)?;
                if from.is_on_worker() && !to.is_on_worker() {
                    let reason = change.message.clone().unwrap_or_else(|| format!("the job is {to}"));
                    Self::release_in(tx, id, &reason).await?;
                }
                let now = now_ms();
                sqlx::query(
                    "UPDATE jobs SET state = $2, error = COALESCE($3, error), \
                     restart_count = restart_count + $4, finished_at = COALESCE($5, finished_at), \
                     worker_id = CASE WHEN $6 = 1 THEN worker_id ELSE NULL END, \
                     lease_expires_at = CASE WHEN $6 = 1 THEN lease_expires_at ELSE NULL END, \
                     lease_token = CASE WHEN $6 = 1 THEN lease_token ELSE NULL END, \
                     devices = CASE WHEN $6 = 1 THEN devices ELSE NULL END \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(to.as_str())
                .bind(change.error.as_deref())
                .bind(change.restart as i64)
                .bind(to.is_finished().then_some(now))
                .bind(to.is_on_worker() as i64)
                .execute(&mut **tx)
                .await?;
                let mut event = serde_json::json!({"from": from, "to": to});
                if let Some(message) = &change.message {
                    event["message"] = message.as_str().into();
                }
                if let Some(error) = &change.error {
                    event["error"] = serde_json::from_str(error).unwrap_or_default();
                }
                Self::event_in(tx, id, "state", &event.to_string(), None).await?;
                Self::lock_job(tx, id).await
            }

            /// A requeue past the job's `max_restarts` fails it instead: the change that
            /// does, naming the cause of the last restart. `None` when the requeue may go on.
            async fn over_restarts_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                job: &JobRow,
                to: JobState,
                change: &TransitionChange,
            ) -> StoreResult<Option<TransitionChange>> {
                if to != JobState::Queued || !change.restart {
                    return Ok(None);
                }
                let cap: Option<i64> =
                    sqlx::query_scalar("SELECT max_restarts FROM jobs WHERE id = $1")
                        .bind(&job.id)
                        .fetch_one(&mut **tx)
                        .await?;
                let cap = cap.unwrap_or($crate::store::DEFAULT_MAX_RESTARTS);
                Ok($crate::store::restarts::past_cap(job.restart_count, cap, change))
            }

            async fn find_idempotent(
                &self,
                tenant_id: &str,
                key: &str,
            ) -> StoreResult<Option<JobRow>> {
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2"
                );
                Ok(sqlx::query_as::<_, JobRow>(&sql)
                    .bind(tenant_id)
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            /// A new job goes from `validating` to its planned state inside this one
            /// transaction, so it is written once, already in that state, with its events.
            async fn insert_job_query(&self, job: &NewJob) -> StoreResult<Inserted> {
                if let Some(key) = &job.idempotency_key {
                    if let Some(existing) = self.find_idempotent(&job.tenant_id, key).await? {
                        return Ok(Inserted::Existing(existing));
                    }
                }
                let now = now_ms();
                let FirstStates { state, plan, devices_needed, error, events } = job.first_states()?;
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    let sql = format!(
                        "INSERT INTO jobs (id, tenant_id, state, spec, total_steps, idempotency_key, \
                         request_hash, created_at, plan, plan_svg, plan_summary, devices_needed, error, \
                         finished_at, max_restarts) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                         RETURNING {JOB_COLUMNS}"
                    );
                    let inserted = sqlx::query_as::<_, JobRow>(&sql)
                        .bind(&job.id)
                        .bind(&job.tenant_id)
                        .bind(state.as_str())
                        .bind(&job.spec)
                        .bind(job.total_steps)
                        .bind(job.idempotency_key.as_deref())
                        .bind(job.request_hash.as_deref())
                        .bind(now)
                        .bind(plan.and_then(|p| p.plan.as_deref()))
                        .bind(plan.and_then(|p| p.plan_svg.as_deref()))
                        .bind(plan.and_then(|p| p.plan_summary.as_deref()))
                        .bind(devices_needed)
                        .bind(error)
                        .bind(state.is_finished().then_some(now))
                        .bind(job.max_restarts)
                        .fetch_one(&mut *tx)
                        .await;
                    let row = inserted?;
                    if !job.file_ids.is_empty() {
                        let values: Vec<String> =
                            (0..job.file_ids.len()).map(|i| format!("($1, ${})", i + 2)).collect();
                        let sql = format!(
                            "INSERT INTO job_files (job_id, file_id) VALUES {} ON CONFLICT DO NOTHING",
                            values.join(", ")
                        );
                        let mut query = sqlx::query(&sql).bind(&job.id);
                        for file in &job.file_ids {
                            query = query.bind(file);
                        }
                        query.execute(&mut *tx).await?;
                    }
                    for used in &job.checkpoint_uses {
                        // The checkpoint row, locked until this job holds it: retention
                        // (`delete_checkpoint`) locks it too before it looks for holders, so it
                        // either deletes it first (and this job is refused) or sees this job.
                        let sql = format!(
                            "SELECT step FROM checkpoints WHERE job_id = $1 AND step = $2{}",
                            $lock
                        );
                        let there: Option<i64> = sqlx::query_scalar(&sql)
                            .bind(&used.job_id)
                            .bind(used.step)
                            .fetch_optional(&mut *tx)
                            .await?;
                        if there.is_none() {
                            return Err(StoreError::CheckpointGone {
                                job: used.job_id.clone(),
                                step: used.step,
                            });
                        }
                        sqlx::query(
                            "INSERT INTO job_checkpoints (job_id, source_job_id, step) VALUES ($1, $2, $3) \
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(&job.id)
                        .bind(&used.job_id)
                        .bind(used.step)
                        .execute(&mut *tx)
                        .await?;
                    }
                    let values: Vec<String> = (0..events.len())
                        .map(|i| format!("($1, {}, ${}, $2, ${})", i + 1, 2 * i + 3, 2 * i + 4))
                        .collect();
                    let sql = format!(
                        "INSERT INTO events (job_id, seq, kind, created_at, data) VALUES {}",
                        values.join(", ")
                    );
                    let mut query = sqlx::query(&sql).bind(&job.id).bind(now);
                    for (kind, data) in &events {
                        query = query.bind(*kind).bind(data.as_str());
                    }
                    query.execute(&mut *tx).await?;
                    Ok(Inserted::Created(row))
                }
                .await;
                match (Self::settle(tx, result).await, &job.idempotency_key) {
                    (Err(StoreError::Database(sqlx::Error::Database(e))), Some(key)) if e.is_unique_violation() => {
                        // Another request with the same key won the race.
                        let existing = self.find_idempotent(&job.tenant_id, key).await?;
                        existing.map(Inserted::Existing).ok_or_else(|| StoreError::JobNotFound(job.id.clone()))
                    }
                    (settled, _) => settled,
                }
            }

            async fn transition_query(
                &self,
                id: &str,
                to: JobState,
                change: TransitionChange,
            ) -> StoreResult<JobRow> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    let row = Self::transition_in(&mut tx, id, to, &change).await?;
                    Ok(row)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn claim_job_query(
                &self,
                worker_id: &str,
                free_devices: &[String],
                lease_ms: i64,
            ) -> StoreResult<Option<Claim>> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    let free_devices = &Self::unheld_in(&mut tx, worker_id, free_devices).await?;
                    let id: Option<String> = sqlx::query_scalar(concat!(
                        "SELECT id FROM jobs WHERE state = 'queued' AND devices_needed <= $1 \
                         ORDER BY id LIMIT 1",
                        $skip
                    ))
                    .bind(free_devices.len() as i64)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(id) = id else { return Ok(None) };
                    let job = Self::lock_job(&mut tx, &id).await?;
                    let lease = Lease::mint(&id, worker_id);
                    let needed = (job.devices_needed.max(0) as usize).min(free_devices.len());
                    Self::hold_in(&mut tx, worker_id, &id, &free_devices[..needed]).await?;
                    let devices = serde_json::to_string(&free_devices[..needed])
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    sqlx::query(concat!(
                        "UPDATE jobs SET worker_id = $2, lease_expires_at = ", $now, " + $3, devices = $4, \
                         started_at = COALESCE(started_at, $5), lease_token = $6 WHERE id = $1",
                    ))
                    .bind(&id)
                    .bind(worker_id)
                    .bind(lease_ms)
                    .bind(&devices)
                    .bind(now_ms())
                    .bind(&lease.token)
                    .execute(&mut *tx)
                    .await?;
                    let change = TransitionChange {
                        message: Some(format!("claimed by worker {worker_id} on {devices}")),
                        ..TransitionChange::default()
                    };
                    let job = Self::transition_in(&mut tx, &id, JobState::Running, &change).await?;
                    let resume_from = sqlx::query_as::<_, CheckpointRow>(
                        "SELECT * FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 1",
                    )
                    .bind(&id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    Ok(Some(Claim { job, resume_from, lease }))
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn heartbeat_query(&self, lease: &Lease, lease_ms: i64) -> StoreResult<JobState> {
                let state: Option<String> = sqlx::query_scalar(concat!(
                    "UPDATE jobs SET lease_expires_at = ", $now, " + $3 WHERE id = $1 AND lease_token = $2 \
                     AND state IN ('running', 'pausing', 'cancelling') RETURNING state",
                ))
                .bind(&lease.job_id)
                .bind(&lease.token)
                .bind(lease_ms)
                .fetch_optional(&self.pool)
                .await?;
                let state = state.ok_or_else(|| StoreError::LeaseLost {
                    job: lease.job_id.clone(),
                    worker: lease.worker_id.clone(),
                })?;
                JobState::parse(&state).map_err(|e| StoreError::Corrupt(e.to_string()))
            }

            async fn requeue_expired_query(&self) -> StoreResult<Vec<String>> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    let expired: Vec<(String, String)> = sqlx::query_as(concat!(
                        "SELECT id, state FROM jobs WHERE state IN ('running', 'pausing', 'cancelling') \
                         AND lease_expires_at < ", $now, " ORDER BY id",
                        $skip
                    ))
                    .fetch_all(&mut *tx)
                    .await?;
                    let mut ids = Vec::with_capacity(expired.len());
                    for (id, state) in expired {
                        let to = match state.as_str() {
                            "pausing" => JobState::Paused,
                            "cancelling" => JobState::Cancelled,
                            _ => JobState::Queued,
                        };
                        let change = TransitionChange {
                            restart: to != JobState::Cancelled,
                            message: Some("the worker's lease expired".to_owned()),
                            ..TransitionChange::default()
                        };
                        Self::transition_in(&mut tx, &id, to, &change).await?;
                        ids.push(id);
                    }
                    Ok(ids)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn discard_metrics_after_query(&self, lease: &Lease, step: i64) -> StoreResult<u64> {
                let id = &lease.job_id;
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    Self::lock_leased(&mut tx, lease).await?;
                    let removed = sqlx::query("DELETE FROM metrics WHERE job_id = $1 AND step > $2")
                        .bind(id)
                        .bind(step)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    sqlx::query(
                        "UPDATE jobs SET step = $2, \
                         tokens = COALESCE((SELECT tokens FROM metrics WHERE job_id = $1 AND step = $2), 0), \
                         latest_metrics = (SELECT data FROM metrics WHERE job_id = $1 AND step = $2) \
                         WHERE id = $1",
                    )
                    .bind(id)
                    .bind(step)
                    .execute(&mut *tx)
                    .await?;
                    Ok(removed)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn record_step_query(
                &self,
                lease: &Lease,
                key: &str,
                step: &StepRecord,
            ) -> StoreResult<JobState> {
                let id = &lease.job_id;
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    let job = Self::lock_leased(&mut tx, lease).await?;
                    let state = job.job_state()?;
                    if Self::recorded(&mut tx, id, key).await? {
                        return Ok(state);
                    }
                    sqlx::query(
                        "INSERT INTO metrics (job_id, step, tokens, created_at, data) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (job_id, step) DO UPDATE SET tokens = excluded.tokens, \
                         created_at = excluded.created_at, data = excluded.data",
                    )
                    .bind(id)
                    .bind(step.step)
                    .bind(step.tokens)
                    .bind(now_ms())
                    .bind(&step.data)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        concat!("UPDATE jobs SET step = $2, tokens = $3, latest_metrics = $4, lease_expires_at = ",
                        $now, " + $5 WHERE id = $1"),
                    )
                    .bind(id)
                    .bind(step.step)
                    .bind(step.tokens)
                    .bind(&step.data)
                    .bind(step.lease_ms)
                    .execute(&mut *tx)
                    .await?;
                    Self::event_in(&mut tx, id, "metrics", &step.data, Some(key)).await?;
                    Ok(state)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn record_event_query(&self, lease: &Lease, key: &str, kind: &str, data: &str) -> StoreResult<()> {
                let id = &lease.job_id;
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    Self::lock_leased(&mut tx, lease).await?;
                    if Self::recorded(&mut tx, id, key).await? {
                        return Ok(());
                    }
                    Self::event_in(&mut tx, id, kind, data, Some(key)).await?;
                    Ok(())
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn record_checkpoint_query(&self, lease: &Lease, key: &str, row: &CheckpointRow) -> StoreResult<()> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    if row.job_id != lease.job_id {
                        return Err(StoreError::LeaseLost { job: row.job_id.clone(), worker: lease.worker_id.clone() });
                    }
                    Self::lock_leased(&mut tx, lease).await?;
                    if Self::recorded(&mut tx, &row.job_id, key).await? {
                        return Ok(());
                    }
                    sqlx::query(
                        "INSERT INTO checkpoints (job_id, step, path, files, created_at, val_loss) VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (job_id, step) DO UPDATE SET path = excluded.path, files = excluded.files, \
                         created_at = excluded.created_at, val_loss = excluded.val_loss",
                    )
                    .bind(&row.job_id)
                    .bind(row.step)
                    .bind(&row.path)
                    .bind(&row.files)
                    .bind(row.created_at)
                    .bind(row.val_loss)
                    .execute(&mut *tx)
                    .await?;
                    let files: serde_json::Value = serde_json::from_str(&row.files).unwrap_or_default();
                    let mut event = serde_json::json!({"step": row.step, "files": files});
                    if let Some(val_loss) = row.val_loss {
                        event["val_loss"] = val_loss.into();
                    }
                    Self::event_in(&mut tx, &row.job_id, "checkpoint", &event.to_string(), Some(key)).await?;
                    Ok(())
                }
                .await;
                Self::settle(tx, result).await
            }
        }
    };
}

pub(super) use queue_sql;
