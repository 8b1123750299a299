//! Ranks of one attempt meet through the store: each publishes what the others need to reach
//! it (its host:port for the ranks' TCP mesh, over which GPU ranks then share NCCL ids) and
//! waits for what it needs, until a deadline. Rows are keyed by attempt, so a restarted job
//! never meets a rank of an earlier attempt; a rank that waits past the deadline releases the
//! reservation (its devices freed, the job queued for its next attempt) and says which ranks
//! were missing.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{Backoff, ClusterError, Reservation, Store, StoreError};

/// A rank's `host:port` for tensors over TCP between CPU devices of different processes.
pub const TCP_ADDRESS: &str = "tcp_address";
/// The machine a rank runs on (its worker's `--machine`): ranks on different machines measure
/// the link between them.
pub const MACHINE: &str = "machine";

/// How often a waiting rank reads the rows again.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error(
        "rank {rank} of job {job} (attempt {attempt}) waited {waited_ms} ms for {key:?} from \
         rank(s) {missing:?}, past the rendezvous deadline; the reservation is released and the \
         job goes back to the queue"
    )]
    Deadline {
        job: String,
        attempt: i64,
        rank: i64,
        key: String,
        missing: Vec<i64>,
        waited_ms: u128,
    },
    #[error("attempt {attempt} of job {job} ended while rank {rank} waited for {key:?}")]
    AttemptOver {
        job: String,
        attempt: i64,
        rank: i64,
        key: String,
    },
    #[error("rank {rank} is not a rank of job {job} (attempt {attempt} has {world})")]
    NoSuchRank {
        job: String,
        attempt: i64,
        rank: i64,
        world: i64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One rank's side of an attempt's rendezvous.
pub struct Rendezvous {
    store: Arc<dyn Store>,
    job_id: String,
    attempt: i64,
    rank: i64,
    world: i64,
    started: Instant,
    deadline: Instant,
}

impl Rendezvous {
    /// Rank `rank` of `reservation`, giving up `within` from now.
    pub fn new(
        store: Arc<dyn Store>,
        reservation: &Reservation,
        rank: i64,
        within: Duration,
    ) -> Result<Rendezvous, RendezvousError> {
        let world = reservation.ranks.len() as i64;
        if !(0..world).contains(&rank) {
            return Err(RendezvousError::NoSuchRank {
                job: reservation.job_id.clone(),
                attempt: reservation.attempt,
                rank,
                world,
            });
        }
        let started = Instant::now();
        Ok(Rendezvous {
            store,
            job_id: reservation.job_id.clone(),
            attempt: reservation.attempt,
            rank,
            world,
            started,
            deadline: started + within,
        })
    }

    fn over(&self, key: &str) -> RendezvousError {
        RendezvousError::AttemptOver {
            job: self.job_id.clone(),
            attempt: self.attempt,
            rank: self.rank,
            key: key.to_owned(),
        }
    }

    /// Says `key` = `value` for this rank.
    pub async fn publish(&self, key: &str, value: &[u8]) -> Result<(), RendezvousError> {
        let mut backoff = Backoff::default();
        loop {
            let published = self
                .store
                .publish_rendezvous(&self.job_id, self.attempt, self.rank, key, value)
                .await;
            match published {
                Ok(()) => return Ok(()),
                Err(StoreError::Cluster(ClusterError::AttemptOver { .. })) => {
                    return Err(self.over(key));
                }
                Err(e) if e.is_transient() && Instant::now() < self.deadline => {
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// What rank `from` said under `key` (rank 0's NCCL unique id, say).
    pub async fn wait_for_rank(&self, key: &str, from: i64) -> Result<Vec<u8>, RendezvousError> {
        let mut said = self.wait(key, &[from]).await?;
        Ok(said.pop().map(|(_, value)| value).unwrap_or_default())
    }

    /// What every rank said under `key`, in rank order (each rank's host:port, say).
    pub async fn wait_for_all(&self, key: &str) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let ranks: Vec<i64> = (0..self.world).collect();
        let said = self.wait(key, &ranks).await?;
        Ok(said.into_iter().map(|(_, value)| value).collect())
    }

    /// Reads until every rank of `needed` has said `key`; past the deadline, releases the
    /// reservation.
    async fn wait(
        &self,
        key: &str,
        needed: &[i64],
    ) -> Result<Vec<(i64, Vec<u8>)>, RendezvousError> {
        let mut missing = needed.to_vec();
        loop {
            match self
                .store
                .read_rendezvous(&self.job_id, self.attempt, key)
                .await
            {
                Ok(rows) => {
                    let said: Vec<(i64, Vec<u8>)> = rows
                        .into_iter()
                        .filter(|(rank, _)| needed.contains(rank))
                        .collect();
                    missing.retain(|rank| !said.iter().any(|(r, _)| r == rank));
                    if missing.is_empty() {
                        return Ok(said);
                    }
                }
                Err(StoreError::Cluster(ClusterError::AttemptOver { .. })) => {
                    return Err(self.over(key));
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "database unavailable during a rendezvous");
                }
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= self.deadline {
                return Err(self.give_up(key, missing).await);
            }
            tokio::time::sleep(POLL.min(self.deadline - Instant::now())).await;
        }
    }

    async fn give_up(&self, key: &str, missing: Vec<i64>) -> RendezvousError {
        let waited_ms = self.started.elapsed().as_millis();
        let reason = format!(
            "rank {} gave up waiting for {key:?} from rank(s) {missing:?} after {waited_ms} ms",
            self.rank
        );
        tracing::warn!(job = %self.job_id, attempt = self.attempt, "{reason}");
        if let Err(e) = self
            .store
            .release_reservation(&self.job_id, self.attempt, &reason)
            .await
        {
            // The ranks' leases run out instead, and the reservation goes then.
            tracing::warn!(job = %self.job_id, error = %e, "cannot release the reservation");
        }
        RendezvousError::Deadline {
            job: self.job_id.clone(),
            attempt: self.attempt,
            rank: self.rank,
            key: key.to_owned(),
            missing,
            waited_ms,
        }
    }
}
