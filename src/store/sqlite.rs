//! SQLite: the embedded default. One writer at a time: a process-wide guard queues this
//! process's writers, and every write transaction starts with `BEGIN IMMEDIATE`, which takes
//! SQLite's write lock up front (other processes wait on it), so a claim or transition never
//! reads a state another writer is changing.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::queries::sql_store;
use super::*;

pub struct SqliteStore {
    pool: SqlitePool,
    /// Writers of this process queue here rather than in SQLite's sleeping busy handler.
    write: Arc<Mutex<()>>,
}

impl SqliteStore {
    /// `sqlite://PATH`; the file and its directory are created when missing.
    pub async fn connect(url: &str) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let dir = options.get_filename().parent().map(ToOwned::to_owned);
        if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore {
            pool,
            write: Arc::new(Mutex::new(())),
        })
    }

    async fn writer(
        &self,
    ) -> StoreResult<(
        OwnedMutexGuard<()>,
        sqlx::Transaction<'static, sqlx::Sqlite>,
    )> {
        let guard = self.write.clone().lock_owned().await;
        Ok((guard, self.pool.begin_with("BEGIN IMMEDIATE").await?))
    }
}

sql_store!(
    SqliteStore,
    sqlx::Sqlite,
    lock = "",
    skip_locked = "",
    now_ms = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
);
