//! The links a rank measured between machines, recorded in the store: the mesh measures them
//! as it connects (`exec::transport::probe`) and hands each to the probe's report, which this
//! rank forwards to a task that writes it (`Store::record_link`), so the blocking run never
//! waits on the database. A link that cannot be written is logged and measured again by the
//! next job across it; the planner then falls back to the median of the other links, or the
//! assumed figures.

use std::sync::Arc;

use super::Worker;
use crate::exec::transport::{LinkProbe, MeasuredLink};
use crate::store::Store;

impl Worker {
    /// The probe of a rank whose ranks run on `machines` (in rank order).
    pub(super) fn link_probe(&self, machines: Vec<String>) -> LinkProbe {
        let (measured, mut to_record) = tokio::sync::mpsc::unbounded_channel::<MeasuredLink>();
        let store = self.store.clone();
        tokio::spawn(async move {
            while let Some(link) = to_record.recv().await {
                record(store.as_ref(), &link).await;
            }
        });
        LinkProbe {
            machines,
            report: Arc::new(move |link| {
                let _ = measured.send(link);
            }),
        }
    }
}

async fn record(store: &dyn Store, link: &MeasuredLink) {
    let (a, b) = (&link.machines.0, &link.machines.1);
    let written = store
        .record_link(a, b, link.bytes_per_s, link.latency_s)
        .await;
    match written {
        Ok(()) => tracing::info!(
            "measured the link between machines {a} and {b}: {:.1} MB/s, {:.1} us",
            link.bytes_per_s / 1e6,
            link.latency_s * 1e6
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot record the link measured between machines {a} and {b}"
        ),
    }
}
