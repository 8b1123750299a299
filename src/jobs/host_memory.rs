//! The host memory budget (`--host-memory`): the pool a run's offloaded tensors live in (and
//! its starting weights, on their way to the devices). The planner plans within it and the
//! executor's host pool is bounded by it.

use super::devices::DeviceInfo;

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
/// devices' budgets (host memory too) and the service's reserve. The last quarter stays for
/// the page cache that data and checkpoints pass through, and for the machine's other
/// processes, so a full host pool does not push the machine into swap.
pub fn default_host_memory(available: u64, devices: &[DeviceInfo]) -> u64 {
    let cpu: u64 = (devices.iter())
        .filter(|d| d.kind == "cpu")
        .map(|d| d.memory_bytes)
        .sum();
    let left = available.saturating_sub(cpu + SERVICE_RESERVE_BYTES);
    left / 4 * 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::parse_devices;

    #[test]
    fn the_default_leaves_the_devices_the_service_and_a_quarter() {
        let gib = 1u64 << 30;
        let cpus = parse_devices("cpu:2x1GiB").unwrap();
        // 8 GiB available: 2 for the devices, 0.5 for the service, 3/4 of the 5.5 left.
        assert_eq!(default_host_memory(8 * gib, &cpus), (11 * gib / 2) / 4 * 3);
        // GPUs' memory is their own, not the host's.
        let gpus = parse_devices("cuda:0@40GiB").unwrap();
        assert_eq!(default_host_memory(8 * gib, &gpus), (15 * gib / 2) / 4 * 3);
        assert_eq!(default_host_memory(gib, &cpus), 0);
    }
}
