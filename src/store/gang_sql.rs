//! Gang reservations, ranks and rendezvous rows, shared by both databases. A reservation holds
//! every rank's device in one transaction (rows taken in (worker, device) order, each only if
//! free, so two reservations never each hold part of what both need); it ends through
//! `release_in` whenever its job leaves its workers, whatever the reason.

/// `(job_id, attempt, state, start_deadline, reason, layout)` of a reservation.
pub(super) type ReservationHead = (String, i64, String, i64, Option<String>, Option<String>);

/// Checks the placements before any row is touched.
pub(super) fn check_placements(ranks: &[super::RankPlacement]) -> Result<(), super::GangRefusal> {
    use super::GangRefusal;
    if ranks.is_empty() {
        return Err(GangRefusal::NoRanks);
    }
    for (i, rank) in ranks.iter().enumerate() {
        if ranks[..i].contains(rank) {
            return Err(GangRefusal::DeviceTwice {
                worker: rank.worker_id.clone(),
                device: rank.device_id.clone(),
            });
        }
    }
    Ok(())
}

/// Where a job whose attempt ends goes, by the state it is in, and whether that is a restart
/// (ranks had all started).
pub(super) fn after_attempt(state: super::JobState, started: bool) -> (super::JobState, bool) {
    use super::JobState;
    match state {
        JobState::Pausing => (JobState::Paused, started),
        JobState::Cancelling => (JobState::Cancelled, false),
        _ => (JobState::Queued, started),
    }
}

macro_rules! gang_sql {
    ($store:ty, $db:ty, now_ms = $now:literal) => {
        impl $store {
            /// Checks each worker is live and runs ranks, then takes each device if free.
            async fn hold_gang_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: &str,
                attempt: i64,
                ranks: &[RankPlacement],
            ) -> StoreResult<Result<(), GangRefusal>> {
                let mut workers: Vec<&str> = ranks.iter().map(|r| r.worker_id.as_str()).collect();
                workers.sort();
                workers.dedup();
                for worker in workers {
                    let found: Option<(i64, i64)> = sqlx::query_as(concat!(
                        "SELECT runs_ranks, CAST(CASE WHEN lease_expires_at >= ", $now,
                        " THEN 1 ELSE 0 END AS BIGINT) FROM workers WHERE id = $1"
                    ))
                    .bind(worker)
                    .fetch_optional(&mut **tx)
                    .await?;
                    match found {
                        Some((_, 0)) | None => {
                            return Ok(Err(GangRefusal::WorkerNotLive { worker: worker.to_owned() }));
                        }
                        Some((0, _)) => {
                            return Ok(Err(GangRefusal::RanksUnsupported { worker: worker.to_owned() }));
                        }
                        Some(_) => {}
                    }
                }
                let mut order: Vec<(usize, &RankPlacement)> = ranks.iter().enumerate().collect();
                order.sort_by(|a, b| (&a.1.worker_id, &a.1.device_id).cmp(&(&b.1.worker_id, &b.1.device_id)));
                for (rank, place) in order {
                    let taken = sqlx::query(
                        "UPDATE worker_devices SET job_id = $3, attempt = $4, rank = $5 \
                         WHERE worker_id = $1 AND device_id = $2 AND job_id IS NULL",
                    )
                    .bind(&place.worker_id)
                    .bind(&place.device_id)
                    .bind(job_id)
                    .bind(attempt)
                    .bind(rank as i64)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                    if taken == 0 {
                        let worker = place.worker_id.clone();
                        let device = place.device_id.clone();
                        return Ok(Err(match Self::holder_in(tx, &worker, &device).await? {
                            Some(Some(job)) => GangRefusal::DeviceHeld { worker, device, job },
                            _ => GangRefusal::UnknownDevice { worker, device },
                        }));
                    }
                }
                Ok(Ok(()))
            }

            async fn reserve_gang_query(
                &self,
                job_id: &str,
                ranks: &[RankPlacement],
                start_timeout_ms: i64,
                layout: Option<&str>,
            ) -> StoreResult<GangOutcome> {
                if let Err(refusal) = $crate::store::gang_sql::check_placements(ranks) {
                    return Ok(GangOutcome::Refused(refusal));
                }
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<Result<i64, GangRefusal>> = async {
                    let job = Self::lock_job(&mut tx, job_id).await?;
                    job.job_state()?.check(JobState::Running)?;
                    let attempt: i64 = sqlx::query_scalar(
                        "SELECT CAST(COALESCE(MAX(attempt), 0) + 1 AS BIGINT) FROM job_reservations WHERE job_id = $1",
                    )
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    if let Err(refusal) = Self::hold_gang_in(&mut tx, job_id, attempt, ranks).await? {
                        return Ok(Err(refusal));
                    }
                    sqlx::query(concat!(
                        "INSERT INTO job_reservations (job_id, attempt, state, created_at, start_deadline, layout) \
                         VALUES ($1, $2, 'reserved', $3, ", $now, " + $4, $5)"
                    ))
                    .bind(job_id)
                    .bind(attempt)
                    .bind(now_ms())
                    .bind(start_timeout_ms)
                    .bind(layout)
                    .execute(&mut *tx)
                    .await?;
                    // Every rank's claim token, rank 0's included: it is the job's lease token.
                    let leases: Vec<Lease> =
                        ranks.iter().map(|r| Lease::mint(job_id, &r.worker_id)).collect();
                    for (rank, (place, lease)) in ranks.iter().zip(&leases).enumerate() {
                        sqlx::query(
                            "INSERT INTO job_ranks (job_id, attempt, rank, worker_id, device_id, state, lease_token) \
                             VALUES ($1, $2, $3, $4, $5, 'reserved', $6)",
                        )
                        .bind(job_id)
                        .bind(attempt)
                        .bind(rank as i64)
                        .bind(&place.worker_id)
                        .bind(&place.device_id)
                        .bind(&lease.token)
                        .execute(&mut *tx)
                        .await?;
                    }
                    let placed: Vec<String> =
                        ranks.iter().map(|r| format!("{}/{}", r.worker_id, r.device_id)).collect();
                    let devices = serde_json::to_string(&placed)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    // Rank 0's worker records the job's steps under rank 0's token; the ranks'
                    // own leases say whether the attempt lives (the job's lease runs from rank
                    // 0's first renewal).
                    sqlx::query(
                        "UPDATE jobs SET worker_id = $2, lease_expires_at = NULL, devices = $3, \
                         started_at = COALESCE(started_at, $4), lease_token = $5 WHERE id = $1",
                    )
                    .bind(job_id)
                    .bind(&ranks[0].worker_id)
                    .bind(&devices)
                    .bind(now_ms())
                    .bind(&leases[0].token)
                    .execute(&mut *tx)
                    .await?;
                    let change = TransitionChange {
                        message: Some(format!("reserved as attempt {attempt} on {devices}")),
                        ..TransitionChange::default()
                    };
                    Self::transition_in(&mut tx, job_id, JobState::Running, &change).await?;
                    Ok(Ok(attempt))
                }
                .await;
                let reserved = match result {
                    Ok(Err(refusal)) => {
                        tx.rollback().await?;
                        return Ok(GangOutcome::Refused(refusal));
                    }
                    result => Self::settle(tx, result).await?,
                };
                let attempt = match reserved {
                    Ok(attempt) => attempt,
                    Err(refusal) => return Ok(GangOutcome::Refused(refusal)),
                };
                let reservation = self.reservation_query(job_id, attempt).await?;
                reservation
                    .map(GangOutcome::Reserved)
                    .ok_or_else(|| StoreError::JobNotFound(job_id.to_owned()))
            }

            async fn queued_jobs_over_query(&self, devices: i64) -> StoreResult<Vec<(String, i64)>> {
                Ok(sqlx::query_as(
                    "SELECT id, devices_needed FROM jobs WHERE state = 'queued' AND devices_needed > $1 \
                     ORDER BY id",
                )
                .bind(devices)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn ranks_query(&self, job_id: &str, attempt: i64) -> StoreResult<Vec<RankRow>> {
                Ok(sqlx::query_as::<_, RankRow>(
                    "SELECT job_id, attempt, rank, worker_id, device_id, state, lease_expires_at, lease_token \
                     FROM job_ranks WHERE job_id = $1 AND attempt = $2 ORDER BY rank",
                )
                .bind(job_id)
                .bind(attempt)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn reservation_from(&self, head: Option<$crate::store::gang_sql::ReservationHead>) -> StoreResult<Option<Reservation>> {
                let Some((job_id, attempt, state, start_deadline, reason, layout)) = head else {
                    return Ok(None);
                };
                let ranks = self.ranks_query(&job_id, attempt).await?;
                Ok(Some(Reservation { job_id, attempt, state, start_deadline, reason, layout, ranks }))
            }

            async fn reservation_query(&self, job_id: &str, attempt: i64) -> StoreResult<Option<Reservation>> {
                let head = sqlx::query_as(
                    "SELECT job_id, attempt, state, start_deadline, reason, layout FROM job_reservations \
                     WHERE job_id = $1 AND attempt = $2",
                )
                .bind(job_id)
                .bind(attempt)
                .fetch_optional(&self.pool)
                .await?;
                self.reservation_from(head).await
            }

            async fn latest_reservation_query(&self, job_id: &str) -> StoreResult<Option<Reservation>> {
                let head = sqlx::query_as(
                    "SELECT job_id, attempt, state, start_deadline, reason, layout FROM job_reservations \
                     WHERE job_id = $1 ORDER BY attempt DESC LIMIT 1",
                )
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await?;
                self.reservation_from(head).await
            }

            async fn worker_ranks_query(&self, worker_id: &str) -> StoreResult<Vec<RankRow>> {
                Ok(sqlx::query_as::<_, RankRow>(
                    "SELECT job_id, attempt, rank, worker_id, device_id, state, lease_expires_at, lease_token \
                     FROM job_ranks WHERE worker_id = $1 AND state <> 'released' \
                     ORDER BY job_id, attempt, rank",
                )
                .bind(worker_id)
                .fetch_all(&self.pool)
                .await?)
            }

            /// The attempt's state while it is not over, else `AttemptOver`.
            async fn active_attempt_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: &str,
                attempt: i64,
            ) -> StoreResult<String> {
                let state: Option<String> = sqlx::query_scalar(
                    "SELECT state FROM job_reservations WHERE job_id = $1 AND attempt = $2 \
                     AND state <> 'released'",
                )
                .bind(job_id)
                .bind(attempt)
                .fetch_optional(&mut **tx)
                .await?;
                state.ok_or_else(|| ClusterError::AttemptOver { job: job_id.to_owned(), attempt }.into())
            }

            async fn claim_rank_query(
                &self,
                job_id: &str,
                attempt: i64,
                rank: i64,
                worker_id: &str,
                lease_ms: i64,
            ) -> StoreResult<RankRow> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    Self::lock_job(&mut tx, job_id).await?;
                    Self::active_attempt_in(&mut tx, job_id, attempt).await?;
                    let lost = || ClusterError::RankLost {
                        job: job_id.to_owned(),
                        attempt,
                        rank,
                        worker: worker_id.to_owned(),
                    };
                    let row = sqlx::query_as::<_, RankRow>(concat!(
                        "UPDATE job_ranks SET state = 'running', lease_expires_at = ", $now, " + $5 \
                         WHERE job_id = $1 AND attempt = $2 AND rank = $3 AND worker_id = $4 \
                         AND state <> 'released' \
                         RETURNING job_id, attempt, rank, worker_id, device_id, state, lease_expires_at, lease_token"
                    ))
                    .bind(job_id)
                    .bind(attempt)
                    .bind(rank)
                    .bind(worker_id)
                    .bind(lease_ms)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(lost)?;
                    sqlx::query(
                        "UPDATE job_reservations SET state = 'running' WHERE job_id = $1 AND attempt = $2 \
                         AND state = 'reserved' AND NOT EXISTS (SELECT 1 FROM job_ranks k \
                         WHERE k.job_id = $1 AND k.attempt = $2 AND k.state = 'reserved')",
                    )
                    .bind(job_id)
                    .bind(attempt)
                    .execute(&mut *tx)
                    .await?;
                    Ok(row)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn heartbeat_rank_query(
                &self,
                job_id: &str,
                attempt: i64,
                rank: i64,
                worker_id: &str,
                lease_ms: i64,
            ) -> StoreResult<JobState> {
                let state: Option<String> = sqlx::query_scalar(concat!(
                    "UPDATE job_ranks SET lease_expires_at = ", $now, " + $5 \
                     WHERE job_id = $1 AND attempt = $2 AND rank = $3 AND worker_id = $4 \
                     AND state = 'running' \
                     RETURNING (SELECT state FROM jobs WHERE id = $1)"
                ))
                .bind(job_id)
                .bind(attempt)
                .bind(rank)
                .bind(worker_id)
                .bind(lease_ms)
                .fetch_optional(&self.pool)
                .await?;
                let state = state.ok_or_else(|| ClusterError::RankLost {
                    job: job_id.to_owned(),
                    attempt,
                    rank,
                    worker: worker_id.to_owned(),
                })?;
                JobState::parse(&state).map_err(|e| StoreError::Corrupt(e.to_string()))
            }

            /// Ends attempt `attempt` of a locked job: the job leaves its workers, which
            /// releases everything the attempt held.
            async fn end_attempt_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: &str,
                attempt: i64,
                reason: String,
            ) -> StoreResult<bool> {
                let job = Self::lock_job(tx, job_id).await?;
                let active = match Self::active_attempt_in(tx, job_id, attempt).await {
                    Ok(active) => active,
                    Err(StoreError::Cluster(ClusterError::AttemptOver { .. })) => return Ok(false),
                    Err(e) => return Err(e),
                };
                let state = job.job_state()?;
                if !state.is_on_worker() {
                    Self::release_in(tx, job_id, &reason).await?;
                    return Ok(true);
                }
                let (to, restart) = $crate::store::gang_sql::after_attempt(state, active == "running");
                let change = TransitionChange {
                    restart,
                    message: Some(reason),
                    ..TransitionChange::default()
                };
                Self::transition_in(tx, job_id, to, &change).await?;
                Ok(true)
            }

            async fn expire_reservations_query(&self) -> StoreResult<Vec<(String, i64)>> {
                // Every worker asks on every beat; without a reservation nothing is written.
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM job_reservations WHERE state <> 'released'",
                )
                .fetch_one(&self.pool)
                .await?;
                if active == 0 {
                    return Ok(Vec::new());
                }
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    let late: Vec<(String, i64)> = sqlx::query_as(concat!(
                        "SELECT job_id, attempt FROM job_reservations \
                         WHERE state = 'reserved' AND start_deadline < ", $now, " ORDER BY job_id"
                    ))
                    .fetch_all(&mut *tx)
                    .await?;
                    let lost: Vec<(String, i64, i64, String)> = sqlx::query_as(concat!(
                        "SELECT k.job_id, k.attempt, k.rank, k.worker_id FROM job_ranks k \
                         JOIN job_reservations r ON r.job_id = k.job_id AND r.attempt = k.attempt \
                         WHERE r.state <> 'released' AND k.state = 'running' \
                         AND k.lease_expires_at < ", $now, " ORDER BY k.job_id, k.rank"
                    ))
                    .fetch_all(&mut *tx)
                    .await?;
                    let mut ended = Vec::new();
                    // Jobs are locked in id order, as every other writer of several jobs does.
                    let mut reasons: Vec<(String, i64, String)> = late
                        .into_iter()
                        .map(|(job, attempt)| {
                            let why = format!("the ranks of attempt {attempt} did not all start before its deadline");
                            (job, attempt, why)
                        })
                        .chain(lost.into_iter().map(|(job, attempt, rank, worker)| {
                            let why = format!("rank {rank} of attempt {attempt} (worker {worker}) lost its lease");
                            (job, attempt, why)
                        }))
                        .collect();
                    reasons.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
                    for (job, attempt, why) in reasons {
                        if Self::end_attempt_in(&mut tx, &job, attempt, why).await? {
                            ended.push((job, attempt));
                        }
                    }
                    Ok(ended)
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn release_reservation_query(
                &self,
                job_id: &str,
                attempt: i64,
                reason: &str,
            ) -> StoreResult<bool> {
                let (_write, mut tx) = self.writer().await?;
                let result = Self::end_attempt_in(&mut tx, job_id, attempt, reason.to_owned()).await;
                Self::settle(tx, result).await
            }

            async fn publish_rendezvous_query(
                &self,
                job_id: &str,
                attempt: i64,
                rank: i64,
                key: &str,
                value: &[u8],
            ) -> StoreResult<()> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    // Under the job's lock, so a release cannot pass between the check and the
                    // write and leave a row of an attempt that is over.
                    Self::lock_job(&mut tx, job_id).await?;
                    Self::active_attempt_in(&mut tx, job_id, attempt).await?;
                    sqlx::query(
                        "INSERT INTO rendezvous (job_id, attempt, rank, key, value, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, attempt, rank, key) \
                         DO UPDATE SET value = excluded.value, created_at = excluded.created_at",
                    )
                    .bind(job_id)
                    .bind(attempt)
                    .bind(rank)
                    .bind(key)
                    .bind(value)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
                    Ok(())
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn read_rendezvous_query(
                &self,
                job_id: &str,
                attempt: i64,
                key: &str,
            ) -> StoreResult<Vec<(i64, Vec<u8>)>> {
                let active: Option<String> = sqlx::query_scalar(
                    "SELECT state FROM job_reservations WHERE job_id = $1 AND attempt = $2 \
                     AND state <> 'released'",
                )
                .bind(job_id)
                .bind(attempt)
                .fetch_optional(&self.pool)
                .await?;
                if active.is_none() {
                    return Err(ClusterError::AttemptOver { job: job_id.to_owned(), attempt }.into());
                }
                Ok(sqlx::query_as(
                    "SELECT rank, value FROM rendezvous WHERE job_id = $1 AND attempt = $2 AND key = $3 \
                     ORDER BY rank",
                )
                .bind(job_id)
                .bind(attempt)
                .bind(key)
                .fetch_all(&self.pool)
                .await?)
            }
        }
    };
}

pub(super) use gang_sql;
