//! Which database errors are an outage that passes (a connection reset or refused, the server
//! shutting down or restarting, a pool timeout, a serialization failure, SQLite busy or
//! locked) rather than a fault, and a bounded exponential backoff to wait them out.

use std::time::Duration;

use super::StoreError;

impl StoreError {
    /// Worth trying again once the database is back.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => transient_sqlx(e),
            _ => false,
        }
    }
}

/// PostgreSQL SQLSTATEs of an outage: class 08 (connection exception), admin/crash shutdown,
/// cannot connect now, too many connections, serialization failure and deadlock.
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
        )
}

/// SQLite's primary result codes SQLITE_BUSY (5) and SQLITE_LOCKED (6), extended codes
/// included (their low byte is the primary code).
fn transient_sqlite(code: &str) -> bool {
    code.parse::<i64>()
        .is_ok_and(|code| matches!(code & 0xff, 5 | 6))
}

fn transient_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                transient_sqlite(&code)
            } else {
                transient_sqlstate(&code)
            }
        }),
        _ => false,
    }
}

/// Waits that double from `first` up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff { next: first, cap }
    }

    /// The wait before the next try.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.cap);
        wait
    }
}

impl Default for Backoff {
    /// 50 ms, doubling up to 5 s: a restart is noticed within seconds, an outage costs a few
    /// tries a minute.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// Runs `op` until it succeeds, fails for good, or transient failures have lasted `patience`.
pub async fn retry_transient<T, F, Fut>(patience: Duration, mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Err(e) if e.is_transient() && started.elapsed() < patience => {
                tracing::warn!(error = %e, "database unavailable; trying again");
                tokio::time::sleep(backoff.next_wait()).await;
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_and_faults_are_not() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(StoreError::Database(sqlx::Error::Io(reset)).is_transient());
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_transient());
        assert!(!StoreError::Corrupt("x".into()).is_transient());
        for code in ["57P01", "08006", "40001", "40P01", "57P03"] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_BUSY_SNAPSHOT (517), not SQLITE_CONSTRAINT (19).
        for (code, transient) in [("5", true), ("6", true), ("517", true), ("19", false)] {
            assert_eq!(transient_sqlite(code), transient, "{code}");
        }
    }

    #[test]
    fn the_backoff_doubles_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<_> = (0..4).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
    }
}
