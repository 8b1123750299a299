//! The cap on requeues: a job whose runs keep being lost (its worker or a rank died, the
//! database stayed away) goes back to the queue at most `max_restarts` times; the next loss
//! fails it, naming the cause.

use super::TransitionChange;

/// The cap a job gets when it is created without one (`serve --max-restarts`).
pub const DEFAULT_MAX_RESTARTS: i64 = 20;

/// The change that fails a job requeued once more after `restarts` restarts, when that is past
/// `cap`; `None` while it may go back to the queue.
pub fn past_cap(restarts: i64, cap: i64, requeue: &TransitionChange) -> Option<TransitionChange> {
    if restarts < cap {
        return None;
    }
    let cause = requeue.message.as_deref().unwrap_or("its run was lost");
    let message = format!(
        "the job was requeued {restarts} times (max_restarts {cap}) and was lost again: {cause}"
    );
    let error = serde_json::json!({
        "fault": "service",
        "code": "too_many_restarts",
        "message": message,
    });
    Some(TransitionChange {
        error: Some(error.to_string()),
        restart: false,
        lease: requeue.lease.clone(),
        message: Some(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_requeue_after_the_cap_fails_naming_the_cause() {
        let requeue = TransitionChange {
            restart: true,
            message: Some("rank 2 of attempt 3 (worker w) lost its lease".into()),
            ..TransitionChange::default()
        };
        assert!(past_cap(0, 2, &requeue).is_none());
        assert!(past_cap(1, 2, &requeue).is_none());
        let failed = past_cap(2, 2, &requeue).unwrap();
        assert!(!failed.restart);
        let error: serde_json::Value = serde_json::from_str(&failed.error.unwrap()).unwrap();
        assert_eq!(error["code"], "too_many_restarts");
        assert_eq!(error["fault"], "service");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("requeued 2 times (max_restarts 2)"),
            "{message}"
        );
        assert!(message.contains("rank 2 of attempt 3"), "{message}");
        assert!(
            past_cap(0, 0, &requeue).is_some(),
            "a cap of 0 never requeues"
        );
    }
}
