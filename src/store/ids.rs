//! Identifiers and clocks. Ids sort by creation (milliseconds, then a process counter), so
//! listing newest-first and claiming oldest-first are `ORDER BY id`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `prefix_` + 12 hex digits of time + 4 of counter + 8 random, e.g. `job_0193...`.
pub fn new_id(prefix: &str) -> String {
    let count = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff;
    let random: u32 = rand::thread_rng().r#gen();
    format!("{prefix}_{:012x}{count:04x}{random:08x}", now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_keep_their_prefix() {
        let a = new_id("job");
        let b = new_id("job");
        assert!(a.starts_with("job_") && a.len() == 4 + 24);
        assert!(b > a, "{b} <= {a}");
    }
}
