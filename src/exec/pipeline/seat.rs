//! A device thread's place in a data-parallel run: which replica, which of its devices.

/// Where a device thread sits: device `stage` of replica `replica` of `replicas`, whose
/// pipelines have `stages` devices and `microbatches` micro-batches each.
#[derive(Debug, Clone, Copy)]
pub struct Seat {
    pub replica: u32,
    pub replicas: u32,
    pub stage: u32,
    pub stages: u32,
    pub microbatches: u32,
}

impl Seat {
    /// The run-wide index of this replica's device `stage`.
    pub fn device(self, stage: u32) -> u32 {
        self.replica * self.stages + stage
    }

    /// The step-wide index of this replica's micro-batch `mb`: replica `r` runs micro-batches
    /// `r * m .. (r + 1) * m` of the step.
    pub fn microbatch(self, mb: u32) -> usize {
        (self.replica * self.microbatches + mb) as usize
    }
}
