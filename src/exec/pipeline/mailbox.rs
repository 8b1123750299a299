//! Point-to-point messages between device threads. A send never blocks; a receive blocks until
//! its message is there or the step is aborted because another device failed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// The output of a chunk's forward.
    Activation,
    /// The gradient of a chunk's input, made by its backward.
    Gradient,
}

/// A message is named by what it is, the micro-batch and the chunk that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageKey {
    pub kind: MessageKind,
    pub mb: u32,
    pub chunk: u32,
}

/// A tensor in flight: its bytes belong to no device until it is received.
#[derive(Debug)]
pub struct Message {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One device's inbox.
#[derive(Debug, Default)]
pub struct Mailbox {
    messages: Mutex<HashMap<MessageKey, Message>>,
    arrived: Condvar,
}

/// Raised in every waiting device when one device fails, so no thread waits forever.
#[derive(Debug, Default)]
pub struct Abort {
    raised: AtomicBool,
}

impl Abort {
    pub fn raise(&self, mailboxes: &[Mailbox]) {
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

impl Mailbox {
    pub fn post(&self, key: MessageKey, message: Message) {
        let mut messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        messages.insert(key, message);
        self.arrived.notify_all();
    }

    /// Waits for `key`; `None` when the step was aborted.
    pub fn take(&self, key: MessageKey, abort: &Abort) -> Option<Message> {
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
