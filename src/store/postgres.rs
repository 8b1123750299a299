//! PostgreSQL: the queue for several worker machines. Writers lock the job row they change
//! (`FOR UPDATE`); the claim skips rows other workers hold (`FOR UPDATE SKIP LOCKED`).

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::queries::sql_store;
use super::*;

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str) -> StoreResult<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // While the database is away a request fails fast (503) rather than hang.
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool })
    }

    /// Row locks order PostgreSQL's writers; no process-wide guard is needed.
    async fn writer(&self) -> StoreResult<((), sqlx::Transaction<'static, sqlx::Postgres>)> {
        Ok(((), self.pool.begin().await?))
    }
}

sql_store!(
    PgStore,
    sqlx::Postgres,
    lock = " FOR UPDATE",
    skip_locked = " FOR UPDATE SKIP LOCKED",
    now_ms = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
);
