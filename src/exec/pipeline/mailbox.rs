//! Point-to-point messages between device threads. A send never blocks; a receive blocks until
//! its message is there or the step is aborted because another device failed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::exec::transport::MessageKey;

/// One device's inbox of `M`s (the engine's tensors in flight).
#[derive(Debug)]
pub struct Mailbox<M> {
    messages: Mutex<HashMap<MessageKey, M>>,
    arrived: Condvar,
}

impl<M> Default for Mailbox<M> {
    fn default() -> Self {
        Mailbox {
            messages: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
        }
    }
}

/// Raised in every waiting device when one device fails, so no thread waits forever.
#[derive(Debug, Default)]
pub struct Abort {
    raised: AtomicBool,
}

impl Abort {
    pub fn raise<M>(&self, mailboxes: &[Mailbox<M>]) {
        self.raised.store(true, Ordering::SeqCst);
        for m in mailboxes {
            // Take the lock so a receiver between its check and its wait sees the flag.
            let _guard = m.messages.lock().unwrap_or_else(|e| e.into_inner());
            m.arrived.notify_all();
        }
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }
}

impl<M> Mailbox<M> {
    pub fn post(&self, key: MessageKey, message: M) {
        let mut messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        messages.insert(key, message);
        self.arrived.notify_all();
    }

    /// Waits for `key`; `None` when the step was aborted.
    pub fn take(&self, key: MessageKey, abort: &Abort) -> Option<M> {
        let mut messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(m) = messages.remove(&key) {
                return Some(m);
            }
            if abort.is_raised() {
                return None;
            }
            messages = self
                .arrived
                .wait(messages)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}
