//! Where a step starts each chunk's weights, gradients and optimizer slices. A program is one
//! training step and repeats, so a group starts where its holder's program leaves it: on the
//! host when the last `OFF`/`PRE` of it in that program is an `OFF`, on the device otherwise.
//! The validator, the simulator and the runtime all place groups by this one reading.

use std::collections::HashMap;

use super::ir::{Action, Group, Plan};

/// The groups of a plan that start a step on the host.
#[derive(Debug, Clone, Default)]
pub struct StartingPlaces {
    last_move_offloads: HashMap<Group, bool>,
}

impl StartingPlaces {
    /// Reads every program once. Moves of a group on a device that does not hold its chunk
    /// are not the group's (the validator refuses them).
    pub fn of(plan: &Plan) -> Self {
        let mut last_move_offloads = HashMap::new();
        for (d, program) in plan.programs.iter().enumerate() {
            for a in program {
                let (g, offload) = match *a {
                    Action::Offload(g) => (g, true),
                    Action::Prefetch(g) => (g, false),
                    _ => continue,
                };
                let held_here = plan.device_of(g.chunk()) == Some(d as u32);
                if held_here && !matches!(g, Group::Stash { .. }) {
                    last_move_offloads.insert(g, offload);
                }
            }
        }
        StartingPlaces { last_move_offloads }
    }

    /// Whether `group` starts the step on the host (never for a stash: it starts nowhere).
    pub fn on_host(&self, group: Group) -> bool {
        self.last_move_offloads
            .get(&group)
            .copied()
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_starts_where_its_holders_program_leaves_it() {
        let plan: Plan = "microbatches 1\nchunk 0 device 0 embedding layers 0..1\nchunk 1 device 1 layers 1..2 head\n\
            device 0: PRE:O0 F0.0 SA0.0>1 RG0.1<1 B0.0 STEP0 OFF:O0 OFF:W0\n\
            device 1: RA0.0<0 F0.1 B0.1 SG0.1>0 OFF:O1 PRE:O1 STEP1\n"
            .parse()
            .unwrap();
        let places = StartingPlaces::of(&plan);
        assert!(places.on_host(Group::Optimizer { chunk: 0, slice: 0 }));
        assert!(places.on_host(Group::Weights { chunk: 0 }));
        assert!(!places.on_host(Group::Grads { chunk: 0 }));
        assert!(!places.on_host(Group::Optimizer { chunk: 1, slice: 0 }));
        assert!(!places.on_host(Group::Stash { mb: 0, chunk: 0 }));
    }
}
