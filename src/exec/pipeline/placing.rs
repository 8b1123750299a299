//! Putting a model on a plan's devices: each replica's copy of the parts, each chunk on its
//! device (only the devices this process runs), or left on the host where the program says.

use crate::exec::device::{DeviceError, DeviceSet, PoolRef};
use crate::exec::model::{LlamaConfig, PartId, PartParams};
use crate::exec::optim::OptimizerConfig;
use crate::plan::ir::{Group, Plan};
use crate::plan::residence::StartingPlaces;

use super::PipelineError;
use super::chunk::ChunkState;
use super::engine::Engine;

/// Host copies of `parts`' weights, for another replica.
pub fn copy_parts(
    parts: &[PartParams],
    config: &LlamaConfig,
    host: &PoolRef,
) -> Result<Vec<PartParams>, DeviceError> {
    parts
        .iter()
        .map(|p| {
            let mut copy = PartParams::allocate(host, config, p.id)?;
            copy.copy_weights_from(p);
            Ok(copy)
        })
        .collect()
}

/// One replica's chunks that run in this process (on devices in `local`), each with the
/// run-wide device it goes to (`first_device` is the replica's device 0). Built on the host,
/// then each group goes to the device unless the program leaves it on the host (a program is one step that repeats), so no device ever
/// holds more than it will in a step.
pub fn place_replica<E: Engine>(
    plan: &Plan,
    devices: &DeviceSet,
    engine: &E,
    optimizer: &OptimizerConfig,
    (first_device, local): (u32, &std::ops::Range<u32>),
    parts: Vec<PartParams>,
) -> Result<Vec<(u32, ChunkState<E>)>, PipelineError> {
    let mut placed = Vec::with_capacity(plan.chunks.len());
    let mut parts = parts.into_iter();
    let starting = StartingPlaces::of(plan);
    for (index, spec) in plan.chunks.iter().enumerate() {
        let count = spec.layers() as usize + usize::from(spec.embedding) + usize::from(spec.head);
        let device = first_device + spec.device;
        if !local.contains(&device) {
            parts.by_ref().take(count).for_each(drop);
            continue;
        }
        let pool = &devices.devices[device as usize];
        let chunk_parts = parts
            .by_ref()
            .take(count)
            .map(|part| engine.adopt(part, &devices.host))
            .collect::<Result<Vec<_>, _>>()?;
        let chunk = index as u32;
        let replica = first_device / plan.devices().max(1) as u32;
        let sharded = plan.sharded(chunk).then_some((replica, plan.replicas));
        let mut state = ChunkState::new_on_host(
            engine,
            chunk,
            chunk_parts,
            optimizer,
            (plan.optimizer_slices, sharded),
            &devices.host,
        )?;
        let groups = [Group::Weights { chunk }, Group::Grads { chunk }]
            .into_iter()
            .chain((0..plan.optimizer_slices).map(|slice| Group::Optimizer { chunk, slice }));
        for group in groups {
            if !starting.on_host(group) {
                state.place(engine, device, group, pool, false)?;
            }
        }
        placed.push((device, state));
    }
    Ok(placed)
}

/// Every part of a model in forward order, allocated in `pool` and initialised from `seed`.
pub fn seeded_parts(
    config: &LlamaConfig,
    pool: &PoolRef,
    seed: u64,
) -> Result<Vec<PartParams>, DeviceError> {
    PartId::all(config.dims.layers)
        .into_iter()
        .map(|id| {
            let mut p = PartParams::allocate(pool, config, id)?;
            p.init_from_seed(seed);
            Ok(p)
        })
        .collect()
}
