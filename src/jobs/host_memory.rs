//! The host memory budget (`--host-memory`): the pool a run's offloaded tensors live in (and
//! its starting weights, on their way to the devices). The planner plans within it and the
//! executor's host pool is bounded by it.

/// What the service itself needs beside its jobs: the HTTP server, the database pool, the
/// record queues, a data file being tokenized.
pub const SERVICE_RESERVE_BYTES: u64 = 512 << 20;

/// The memory this machine has available now (`MemAvailable`), when it says.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The default budget out of `available` bytes: three quarters of what is left after the CPU
/// devices' budgets (`cpu_device_bytes`: host memory too) and the service's reserve. The last
/// quarter stays for the page cache that data and checkpoints pass through, and for the
/// machine's other processes, so a full host pool does not push the machine into swap.
pub fn default_host_memory(available: u64, cpu_device_bytes: u64) -> u64 {
    let left = available.saturating_sub(cpu_device_bytes + SERVICE_RESERVE_BYTES);
    left / 4 * 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_the_devices_the_service_and_a_quarter() {
        let gib = 1u64 << 30;
        // 8 GiB available: 2 for the devices, 0.5 for the service, 3/4 of the 5.5 left.
        assert_eq!(
            default_host_memory(8 * gib, 2 * gib),
            (11 * gib / 2) / 4 * 3
        );
        // Without CPU devices: 3/4 of the 7.5 left.
        assert_eq!(default_host_memory(8 * gib, 0), (15 * gib / 2) / 4 * 3);
        assert_eq!(default_host_memory(gib, 2 * gib), 0);
    }
}
