//! The cluster's SQL shared by both databases: workers and their devices, which job holds each
//! device (`hold_in` when a job is claimed, `release_in` when it leaves its workers), and the
//! measured links between machines, and the `ClusterStore` implementation, whose gang and
//! rendezvous queries are in `gang_sql.rs`.

/// A worker dead this long (and holding nothing) is forgotten when another registers.
pub(super) const FORGET_WORKERS_AFTER_MS: i64 = 24 * 3600 * 1000;

macro_rules! cluster_sql {
    ($store:ty, $db:ty, now_ms = $now:literal) => {
        impl $store {
            /// The devices of `free` that no job holds (a device of an unregistered worker is
            /// not recorded, so it counts as free).
            async fn unheld_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                worker_id: &str,
                free: &[String],
            ) -> StoreResult<Vec<String>> {
                let held: Vec<String> = sqlx::query_scalar(
                    "SELECT device_id FROM worker_devices WHERE worker_id = $1 AND job_id IS NOT NULL",
                )
                .bind(worker_id)
                .fetch_all(&mut **tx)
                .await?;
                Ok(free.iter().filter(|d| !held.contains(d)).cloned().collect())
            }

            /// The job holding a device: `None` when the worker has no such device.
            async fn holder_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                worker_id: &str,
                device_id: &str,
            ) -> StoreResult<Option<Option<String>>> {
                Ok(sqlx::query_scalar(
                    "SELECT job_id FROM worker_devices WHERE worker_id = $1 AND device_id = $2",
                )
                .bind(worker_id)
                .bind(device_id)
                .fetch_optional(&mut **tx)
                .await?)
            }

            /// Holds `devices` of `worker_id` for a job one worker runs. Rows are taken in
            /// device order (as a gang takes them) so two writers never wait on each other in
            /// a circle; a device another job took meanwhile fails the claim.
            async fn hold_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                worker_id: &str,
                job_id: &str,
                devices: &[String],
            ) -> StoreResult<()> {
                let mut sorted = devices.to_vec();
                sorted.sort();
                for device in &sorted {
                    let taken = sqlx::query(
                        "UPDATE worker_devices SET job_id = $3, attempt = NULL, rank = NULL \
                         WHERE worker_id = $1 AND device_id = $2 AND job_id IS NULL",
                    )
                    .bind(worker_id)
                    .bind(device)
                    .bind(job_id)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                    if taken == 0 {
                        if let Some(Some(job)) = Self::holder_in(tx, worker_id, device).await? {
                            return Err(ClusterError::DeviceHeld {
                                worker: worker_id.to_owned(),
                                device: device.clone(),
                                job,
                            }
                            .into());
                        }
                    }
                }
                Ok(())
            }

            /// The job left its workers: its devices are free, its reservation (if any) and
            /// ranks are over, and its rendezvous rows go.
            async fn release_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                job_id: &str,
                reason: &str,
            ) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE worker_devices SET job_id = NULL, attempt = NULL, rank = NULL WHERE job_id = $1",
                )
                .bind(job_id)
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "UPDATE job_ranks SET state = 'released', lease_expires_at = NULL \
                     WHERE job_id = $1 AND state <> 'released'",
                )
                .bind(job_id)
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "UPDATE job_reservations SET state = 'released', released_at = $2, \
                     reason = COALESCE(reason, $3) WHERE job_id = $1 AND state <> 'released'",
                )
                .bind(job_id)
                .bind(now_ms())
                .bind(reason)
                .execute(&mut **tx)
                .await?;
                sqlx::query("DELETE FROM rendezvous WHERE job_id = $1")
                    .bind(job_id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            async fn register_worker_query(
                &self,
                worker: &WorkerRegistration,
                lease_ms: i64,
            ) -> StoreResult<()> {
                let (_write, mut tx) = self.writer().await?;
                let result: StoreResult<_> = async {
                    sqlx::query(concat!(
                        "DELETE FROM workers WHERE lease_expires_at < ", $now, " - $1 \
                         AND NOT EXISTS (SELECT 1 FROM worker_devices d \
                         WHERE d.worker_id = workers.id AND d.job_id IS NOT NULL)"
                    ))
                    .bind($crate::store::cluster_sql::FORGET_WORKERS_AFTER_MS)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(concat!(
                        "INSERT INTO workers (id, host, runs_ranks, registered_at, lease_expires_at, \
                         host_memory_bytes) VALUES ($1, $2, $3, $4, ", $now, " + $5, $6) \
                         ON CONFLICT (id) DO UPDATE SET host = excluded.host, \
                         runs_ranks = excluded.runs_ranks, lease_expires_at = excluded.lease_expires_at, \
                         host_memory_bytes = excluded.host_memory_bytes"
                    ))
                    .bind(&worker.worker_id)
                    .bind(&worker.host)
                    .bind(worker.runs_ranks as i64)
                    .bind(now_ms())
                    .bind(lease_ms)
                    .bind(worker.host_memory_bytes)
                    .execute(&mut *tx)
                    .await?;
                    for (position, device) in worker.devices.iter().enumerate() {
                        sqlx::query(
                            "INSERT INTO worker_devices (worker_id, device_id, position, kind, memory_bytes) \
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (worker_id, device_id) DO UPDATE \
                             SET position = excluded.position, kind = excluded.kind, \
                             memory_bytes = excluded.memory_bytes",
                        )
                        .bind(&worker.worker_id)
                        .bind(&device.device_id)
                        .bind(position as i64)
                        .bind(&device.kind)
                        .bind(device.memory_bytes)
                        .execute(&mut *tx)
                        .await?;
                    }
                    let known: Vec<String> = sqlx::query_scalar(
                        "SELECT device_id FROM worker_devices WHERE worker_id = $1 AND job_id IS NULL",
                    )
                    .bind(&worker.worker_id)
                    .fetch_all(&mut *tx)
                    .await?;
                    for gone in known.iter().filter(|d| !worker.devices.iter().any(|w| &w.device_id == *d)) {
                        sqlx::query("DELETE FROM worker_devices WHERE worker_id = $1 AND device_id = $2")
                            .bind(&worker.worker_id)
                            .bind(gone)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Ok(())
                }
                .await;
                Self::settle(tx, result).await
            }

            async fn worker_heartbeat_query(&self, worker_id: &str, lease_ms: i64) -> StoreResult<()> {
                let renewed = sqlx::query(concat!(
                    "UPDATE workers SET lease_expires_at = ", $now, " + $2 WHERE id = $1"
                ))
                .bind(worker_id)
                .bind(lease_ms)
                .execute(&self.pool)
                .await?
                .rows_affected();
                if renewed == 0 {
                    return Err(ClusterError::WorkerUnknown(worker_id.to_owned()).into());
                }
                Ok(())
            }

            async fn deregister_worker_query(&self, worker_id: &str) -> StoreResult<()> {
                sqlx::query(concat!(
                    "UPDATE workers SET lease_expires_at = ", $now, " - 1 WHERE id = $1"
                ))
                .bind(worker_id)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn record_link_query(
                &self,
                a: &str,
                b: &str,
                bytes_per_s: f64,
                latency_s: f64,
            ) -> StoreResult<()> {
                let bad = |why: &str| ClusterError::BadLink {
                    a: a.to_owned(),
                    b: b.to_owned(),
                    why: why.to_owned(),
                };
                if a == b {
                    return Err(bad("one machine").into());
                }
                let positive = |v: f64| v.is_finite() && v > 0.0;
                if !(positive(bytes_per_s) && positive(latency_s)) {
                    return Err(bad(&format!("{bytes_per_s} bytes/s, {latency_s} s")).into());
                }
                let (a, b) = if a < b { (a, b) } else { (b, a) };
                sqlx::query(
                    "INSERT INTO network_links (machine_a, machine_b, bytes_per_s, latency_s, measured_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (machine_a, machine_b) DO UPDATE \
                     SET bytes_per_s = excluded.bytes_per_s, latency_s = excluded.latency_s, \
                     measured_at = excluded.measured_at",
                )
                .bind(a)
                .bind(b)
                .bind(bytes_per_s)
                .bind(latency_s)
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn network_links_query(&self) -> StoreResult<Vec<LinkRow>> {
                Ok(sqlx::query_as::<_, LinkRow>(
                    "SELECT machine_a, machine_b, bytes_per_s, latency_s, measured_at \
                     FROM network_links ORDER BY machine_a, machine_b",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn cluster_devices_query(&self) -> StoreResult<Vec<ClusterDeviceRow>> {
                Ok(sqlx::query_as::<_, ClusterDeviceRow>(concat!(
                    "SELECT d.worker_id, w.host, w.host_memory_bytes, d.device_id, d.kind, \
                     d.memory_bytes, d.job_id, d.attempt, d.rank FROM worker_devices d JOIN workers w ON w.id = d.worker_id \
                     WHERE w.lease_expires_at >= ", $now, " ORDER BY d.worker_id, d.position"
                ))
                .fetch_all(&self.pool)
                .await?)
            }
        }

        #[async_trait::async_trait]
        impl ClusterStore for $store {
            async fn register_worker(
                &self,
                worker: &WorkerRegistration,
                lease_ms: i64,
            ) -> StoreResult<()> {
                self.register_worker_query(worker, lease_ms).await
            }

            async fn worker_heartbeat(&self, worker_id: &str, lease_ms: i64) -> StoreResult<()> {
                self.worker_heartbeat_query(worker_id, lease_ms).await
            }

            async fn deregister_worker(&self, worker_id: &str) -> StoreResult<()> {
                self.deregister_worker_query(worker_id).await
            }

            async fn cluster_devices(&self) -> StoreResult<Vec<ClusterDeviceRow>> {
                self.cluster_devices_query().await
            }

            async fn reserve_gang_laid_out(
                &self,
                job_id: &str,
                ranks: &[RankPlacement],
                start_timeout_ms: i64,
                layout: Option<&str>,
            ) -> StoreResult<GangOutcome> {
                self.reserve_gang_query(job_id, ranks, start_timeout_ms, layout).await
            }

            async fn queued_jobs_over(&self, devices: i64) -> StoreResult<Vec<(String, i64)>> {
                self.queued_jobs_over_query(devices).await
            }

            async fn worker_ranks(&self, worker_id: &str) -> StoreResult<Vec<RankRow>> {
                self.worker_ranks_query(worker_id).await
            }

            async fn claim_rank(
                &self,
                job_id: &str,
                attempt: i64,
                rank: i64,
                worker_id: &str,
                lease_ms: i64,
            ) -> StoreResult<RankRow> {
                self.claim_rank_query(job_id, attempt, rank, worker_id, lease_ms).await
            }

            async fn heartbeat_rank(
                &self,
                job_id: &str,
                attempt: i64,
                rank: i64,
                worker_id: &str,
                lease_ms: i64,
            ) -> StoreResult<JobState> {
                self.heartbeat_rank_query(job_id, attempt, rank, worker_id, lease_ms).await
            }

            async fn expire_reservations(&self) -> StoreResult<Vec<(String, i64)>> {
                self.expire_reservations_query().await
            }

            async fn release_reservation(
                &self,
                job_id: &str,
                attempt: i64,
                reason: &str,
            ) -> StoreResult<bool> {
                self.release_reservation_query(job_id, attempt, reason).await
            }

            async fn latest_reservation(&self, job_id: &str) -> StoreResult<Option<Reservation>> {
                self.latest_reservation_query(job_id).await
            }

            async fn publish_rendezvous(
                &self,
                job_id: &str,
                attempt: i64,
                rank: i64,
                key: &str,
                value: &[u8],
            ) -> StoreResult<()> {
                self.publish_rendezvous_query(job_id, attempt, rank, key, value).await
            }

            async fn read_rendezvous(
                &self,
                job_id: &str,
                attempt: i64,
                key: &str,
            ) -> StoreResult<Vec<(i64, Vec<u8>)>> {
                self.read_rendezvous_query(job_id, attempt, key).await
            }

            async fn record_link(
                &self,
                a: &str,
                b: &str,
                bytes_per_s: f64,
                latency_s: f64,
            ) -> StoreResult<()> {
                self.record_link_query(a, b, bytes_per_s, latency_s).await
            }

            async fn network_links(&self) -> StoreResult<Vec<LinkRow>> {
                self.network_links_query().await
            }
        }
    };
}

pub(super) use cluster_sql;
