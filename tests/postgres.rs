//! The test suite reaches a real PostgreSQL server through `DATABASE_URL` (set by
//! `scripts/test`, which starts the server when needed).

use sqlx::{Connection, PgConnection, Row};

#[tokio::test]
async fn postgres_answers_a_query_through_database_url() {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at PostgreSQL; run the suite through scripts/test");
    assert!(
        url.starts_with("postgres"),
        "DATABASE_URL is not PostgreSQL: {url}"
    );
    let mut conn = PgConnection::connect(&url).await.expect("connects");
    let row = sqlx::query("SELECT 40 + 2 AS answer, version() AS version")
        .fetch_one(&mut conn)
        .await
        .expect("query runs");
    assert_eq!(row.get::<i32, _>("answer"), 42);
    assert!(row.get::<String, _>("version").starts_with("PostgreSQL"));
}
