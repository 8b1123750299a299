//! The validator: proves a plan complete and deadlock-free before anything runs.
//!
//! It checks every action's place (the device holds the chunk, the peer is the right device),
//! that every (micro-batch, chunk) has exactly one forward and one backward, each chunk's
//! backwards run in micro-batch order, a dropping forward has exactly one recompute before its
//! backward, groups are on the device when used. Then it runs the programs logically: sends
//! never block, a receive waits for its send; an action whose own-device input is not there
//! yet can never get it (its device is the only producer), so that is an error at once; when
//! every unfinished device waits on a receive, that is a deadlock.
//!
//! Replicas run the same programs, and a reduction `AR<c>` waits only for the same action in
//! the other replicas. So the replicas can run in lockstep, and a plan whose single pipeline
//! finishes with each `AR` taken as local finishes replicated: the logical run checks one
//! replica. It proves each chunk reduced exactly once, after all its backwards and before any
//! step on its device (the first step takes the norm of the reduced gradients).

use std::collections::HashSet;

use super::error::PlanError;
use super::ir::{Action, Group, Plan};

/// Where a group lives during the logical run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Device,
    Host,
}

/// Prints every device's program, the action at (`device`, `index`) marked `>>F1.0<<`.
pub fn grid(plan: &Plan, device: usize, index: usize) -> String {
    let mut out = String::new();
    for (d, program) in plan.programs.iter().enumerate() {
        out.push_str(&format!("device {d}:"));
        for (i, a) in program.iter().enumerate() {
            if d == device && i == index {
                out.push_str(&format!(" >>{a}<<"));
            } else {
                out.push_str(&format!(" {a}"));
            }
        }
        out.push('\n');
    }
    out
}

fn fail(plan: &Plan, device: usize, index: usize, message: impl Into<String>) -> PlanError {
    PlanError::InvalidPlan {
        device,
        index,
        message: message.into(),
        grid: grid(plan, device, index),
    }
}

/// What the logical run knows.
struct State {
    m: usize,
    chunks: usize,
    forward: Vec<bool>,
    dropped: Vec<bool>,
    recomputed: Vec<bool>,
    backward: Vec<bool>,
    /// The output of F(mb, c) is on the device that consumes it (received, or produced there).
    act_sent: HashSet<(u32, u32)>,
    act_here: Vec<bool>,
    grad_sent: HashSet<(u32, u32)>,
    grad_here: Vec<bool>,
    next_backward_mb: Vec<u32>,
    backwards_done: Vec<u32>,
    slices: usize,
    steps_done: Vec<u32>,
    replicas: u32,
    reduced: Vec<bool>,
    stash: Vec<Place>,
    weights: Vec<Place>,
    grads: Vec<Place>,
    optimizer: Vec<Place>,
}

impl State {
    fn at(&self, mb: u32, c: u32) -> usize {
        mb as usize * self.chunks + c as usize
    }
}

/// Where each persistent group starts: on the host when its last move in the program is an
/// offload (programs repeat every step).
fn starting_places(plan: &Plan) -> [Vec<Place>; 3] {
    let n = plan.chunks.len();
    let k = plan.optimizer_slices.max(1) as usize;
    let mut places = [
        vec![Place::Device; n],
        vec![Place::Device; n],
        vec![Place::Device; n * k],
    ];
    for program in &plan.programs {
        for a in program {
            let (g, place) = match *a {
                Action::Offload(g) => (g, Place::Host),
                Action::Prefetch(g) => (g, Place::Device),
                _ => continue,
            };
            let (slot, i) = match g {
                Group::Weights { chunk } => (0, chunk as usize),
                Group::Grads { chunk } => (1, chunk as usize),
                Group::Optimizer { chunk, slice } => (2, chunk as usize * k + slice as usize),
                Group::Stash { .. } => continue,
            };
            if let Some(p) = places[slot].get_mut(i) {
                *p = place;
            }
        }
    }
    places
}

/// Checks `plan`; `Ok` means every device finishes and every pass ran once.
pub fn validate(plan: &Plan) -> Result<(), PlanError> {
    let (m, chunks, devices) = (
        plan.microbatches as usize,
        plan.chunks.len(),
        plan.programs.len(),
    );
    if chunks == 0 || devices == 0 || m == 0 || plan.optimizer_slices == 0 || plan.replicas == 0 {
        return Err(PlanError::invalid(
            "plan",
            "a plan needs at least one chunk, one device, one micro-batch, one optimizer slice \
             and one replica",
        ));
    }
    for (c, spec) in plan.chunks.iter().enumerate() {
        if spec.device as usize >= devices {
            return Err(PlanError::invalid(
                format!("plan.chunks[{c}].device"),
                format!("device {} does not exist ({devices} devices)", spec.device),
            ));
        }
        if spec.embedding != (c == 0) || spec.head != (c == chunks - 1) {
            return Err(PlanError::invalid(
                format!("plan.chunks[{c}]"),
                "the embedding starts chunk 0 and the head ends the last chunk, nowhere else",
            ));
        }
    }
    // A step waits for every device's gradient norm, so a device without a chunk (which
    // never steps) would keep the others waiting.
    if let Some(d) = (0..devices).find(|&d| plan.chunks.iter().all(|c| c.device as usize != d)) {
        return Err(PlanError::invalid(
            format!("plan.programs[{d}]"),
            format!("device {d} holds no chunk: every device needs at least one"),
        ));
    }
    let [weights, grads, optimizer] = starting_places(plan);
    let mut s = State {
        m,
        chunks,
        forward: vec![false; m * chunks],
        dropped: vec![false; m * chunks],
        recomputed: vec![false; m * chunks],
        backward: vec![false; m * chunks],
        act_sent: HashSet::new(),
        act_here: vec![false; m * chunks],
        grad_sent: HashSet::new(),
        grad_here: vec![false; m * chunks],
        next_backward_mb: vec![0; chunks],
        backwards_done: vec![0; chunks],
        slices: plan.optimizer_slices as usize,
        steps_done: vec![0; chunks * plan.optimizer_slices as usize],
        replicas: plan.replicas,
        reduced: vec![false; chunks],
        stash: vec![Place::Host; m * chunks],
        weights,
        grads,
        optimizer,
    };
    let mut pc = vec![0usize; devices];
    loop {
        let mut progress = false;
        #[allow(clippy::needless_range_loop)] // `d` also names the device to `step`
        for d in 0..devices {
            while pc[d] < plan.programs[d].len() {
                match step(plan, &mut s, d, plan.programs[d][pc[d]]) {
                    Ok(true) => {
                        pc[d] += 1;
                        progress = true;
                    }
                    Ok(false) => break,
                    Err(message) => return Err(fail(plan, d, pc[d], message)),
                }
            }
        }
        if (0..devices).all(|d| pc[d] == plan.programs[d].len()) {
            break;
        }
        if !progress {
            let d = (0..devices)
                .find(|&d| pc[d] < plan.programs[d].len())
                .unwrap_or(0);
            return Err(fail(
                plan,
                d,
                pc[d],
                "deadlock: every unfinished device waits on a receive whose send never comes",
            ));
        }
    }
    for mb in 0..m as u32 {
        for c in 0..chunks as u32 {
            let i = s.at(mb, c);
            if !s.forward[i] || !s.backward[i] {
                let (d, _) = last_place(plan, c);
                let what = if s.forward[i] { "backward" } else { "forward" };
                return Err(fail(
                    plan,
                    d,
                    plan.programs[d].len(),
                    format!("micro-batch {mb} never runs its {what} on chunk {c}"),
                ));
            }
        }
    }
    if let Some(c) = (0..chunks).find(|&c| s.replicas > 1 && !s.reduced[c]) {
        let (d, end) = last_place(plan, c as u32);
        return Err(fail(
            plan,
            d,
            end,
            format!(
                "chunk {c}'s gradients are never reduced across the {} replicas (AR{c})",
                s.replicas
            ),
        ));
    }
    if let Some(i) = s.steps_done.iter().position(|&n| n == 0) {
        let (c, k) = (i / s.slices, i % s.slices);
        let (d, end) = last_place(plan, c as u32);
        return Err(fail(
            plan,
            d,
            end,
            format!("chunk {c}'s optimizer slice {k} is never stepped"),
        ));
    }
    Ok(())
}

fn last_place(plan: &Plan, c: u32) -> (usize, usize) {
    let d = plan.chunks[c as usize].device as usize;
    (d, plan.programs[d].len())
}

/// Runs one action if it can. `Ok(false)`: waiting on another device.
fn step(plan: &Plan, s: &mut State, d: usize, a: Action) -> Result<bool, String> {
    let dev = |c: u32| plan.chunks.get(c as usize).map(|spec| spec.device as usize);
    let last = s.chunks as u32 - 1;
    let check_mc = |mb: u32, c: u32| -> Result<usize, String> {
        if mb as usize >= s.m {
            return Err(format!(
                "micro-batch {mb} does not exist ({} micro-batches)",
                s.m
            ));
        }
        if c as usize >= s.chunks {
            return Err(format!("chunk {c} does not exist ({} chunks)", s.chunks));
        }
        Ok(s.at(mb, c))
    };
    let holds = |c: u32| -> Result<(), String> {
        if dev(c) == Some(d) {
            Ok(())
        } else {
            Err(format!(
                "chunk {c} is on device {}, not this one",
                dev(c).unwrap_or(usize::MAX)
            ))
        }
    };
    let resident = |place: &[Place], c: u32, what: &str| -> Result<(), String> {
        if place[c as usize] == Place::Device {
            Ok(())
        } else {
            Err(format!(
                "{what} of chunk {c} are on the host here; prefetch them first"
            ))
        }
    };
    match a {
        Action::Forward {
            mb,
            chunk: c,
            drop_stash,
        } => {
            let i = check_mc(mb, c)?;
            holds(c)?;
            resident(&s.weights, c, "the weights")?;
            if s.forward[i] {
                return Err(format!("second forward of ({mb}, {c})"));
            }
            if c > 0 && !s.act_here[s.at(mb, c - 1)] {
                if dev(c - 1) == Some(d) {
                    return Err(format!("its input, from F{mb}.{}, is not made yet", c - 1));
                }
                return Err(format!(
                    "its input is never received: RA{mb}.{}<{} must come first",
                    c - 1,
                    dev(c - 1).unwrap_or(0)
                ));
            }
            s.forward[i] = true;
            s.dropped[i] = drop_stash;
            s.stash[i] = Place::Device;
            // Handing over to the next chunk on this device needs no transfer.
            if c < last && dev(c + 1) == Some(d) {
                s.act_here[i] = true;
            }
        }
        Action::Recompute { mb, chunk: c } => {
            let i = check_mc(mb, c)?;
            holds(c)?;
            resident(&s.weights, c, "the weights")?;
            if !s.forward[i] || !s.dropped[i] {
                return Err(format!(
                    "recompute of ({mb}, {c}) needs an earlier FD{mb}.{c}"
                ));
            }
            if s.recomputed[i] || s.backward[i] {
                return Err(format!("recompute of ({mb}, {c}) comes too late or twice"));
            }
            if s.stash[i] != Place::Device {
                return Err(format!("the kept input of ({mb}, {c}) is on the host"));
            }
            s.recomputed[i] = true;
        }
        Action::Backward { mb, chunk: c } => {
            let i = check_mc(mb, c)?;
            holds(c)?;
            resident(&s.weights, c, "the weights")?;
            resident(&s.grads, c, "the gradients")?;
            if !s.forward[i] {
                return Err(format!("backward before forward of ({mb}, {c})"));
            }
            if s.backward[i] {
                return Err(format!("second backward of ({mb}, {c})"));
            }
            if s.dropped[i] && !s.recomputed[i] {
                return Err(format!(
                    "the stash of ({mb}, {c}) was dropped; R{mb}.{c} first"
                ));
            }
            if s.stash[i] != Place::Device {
                return Err(format!(
                    "the stash of ({mb}, {c}) is on the host; PRE:S{mb}.{c} first"
                ));
            }
            if s.next_backward_mb[c as usize] != mb {
                return Err(format!(
                    "chunk {c}'s backwards must run in micro-batch order; expected {}",
                    s.next_backward_mb[c as usize]
                ));
            }
            if c < last && !s.grad_here[s.at(mb, c + 1)] {
                if dev(c + 1) == Some(d) {
                    return Err(format!(
                        "its gradient, from B{mb}.{}, is not made yet",
                        c + 1
                    ));
                }
                return Err(format!(
                    "its gradient is never received: RG{mb}.{}<{} must come first",
                    c + 1,
                    dev(c + 1).unwrap_or(0)
                ));
            }
            s.backward[i] = true;
            s.next_backward_mb[c as usize] += 1;
            s.backwards_done[c as usize] += 1;
            if c > 0 && dev(c - 1) == Some(d) {
                s.grad_here[i] = true;
            }
        }
        Action::SendAct { mb, chunk: c, peer } => {
            let i = check_mc(mb, c)?;
            holds(c)?;
            if c == last || dev(c + 1) != Some(peer as usize) {
                return Err(format!(
                    "the output of chunk {c} does not go to device {peer}"
                ));
            }
            if !s.forward[i] {
                return Err(format!("sends the output of F{mb}.{c} before making it"));
            }
            if !s.act_sent.insert((mb, c)) {
                return Err("sent twice".into());
            }
        }
        Action::RecvAct { mb, chunk: c, peer } => {
            let i = check_mc(mb, c)?;
            if c == last || dev(c + 1) != Some(d) || dev(c) != Some(peer as usize) {
                return Err(format!(
                    "the output of chunk {c} comes from device {} to the holder of chunk {}",
                    dev(c).unwrap_or(0),
                    c + 1
                ));
            }
            if !s.act_sent.contains(&(mb, c)) {
                return Ok(false);
            }
            s.act_here[i] = true;
        }
        Action::SendGrad { mb, chunk: c, peer } => {
            let i = check_mc(mb, c)?;
            holds(c)?;
            if c == 0 || dev(c - 1) != Some(peer as usize) {
                return Err(format!(
                    "the input gradient of chunk {c} does not go to device {peer}"
                ));
            }
            if !s.backward[i] {
                return Err(format!("sends the gradient of B{mb}.{c} before making it"));
            }
            if !s.grad_sent.insert((mb, c)) {
                return Err("sent twice".into());
            }
        }
        Action::RecvGrad { mb, chunk: c, peer } => {
            let i = check_mc(mb, c)?;
            if c == 0 || dev(c - 1) != Some(d) || dev(c) != Some(peer as usize) {
                return Err(format!(
                    "the input gradient of chunk {c} comes from device {} to the holder of chunk {}",
                    dev(c).unwrap_or(0),
                    c.saturating_sub(1)
                ));
            }
            if !s.grad_sent.contains(&(mb, c)) {
                return Ok(false);
            }
            s.grad_here[i] = true;
        }
        Action::Offload(g) | Action::Prefetch(g) => {
            let to = if matches!(a, Action::Offload(_)) {
                Place::Host
            } else {
                Place::Device
            };
            let c = g.chunk();
            if c as usize >= s.chunks {
                return Err(format!("chunk {c} does not exist"));
            }
            holds(c)?;
            let place = match g {
                Group::Stash { mb, chunk } => {
                    let i = check_mc(mb, chunk)?;
                    if !s.forward[i] || s.backward[i] {
                        return Err(format!(
                            "the stash of ({mb}, {chunk}) exists only between its forward and backward"
                        ));
                    }
                    &mut s.stash[i]
                }
                Group::Weights { chunk } => &mut s.weights[chunk as usize],
                Group::Grads { chunk } => &mut s.grads[chunk as usize],
                Group::Optimizer { chunk, slice } => {
                    if slice as usize >= s.slices {
                        return Err(format!("optimizer slice {slice} does not exist"));
                    }
                    &mut s.optimizer[chunk as usize * s.slices + slice as usize]
                }
            };
            if *place == to {
                return Err(format!("{g} is already there"));
            }
            *place = to;
        }
        Action::Step { chunk: c, slice } => {
            if c as usize >= s.chunks || slice as usize >= s.slices {
                return Err(format!("chunk {c}, optimizer slice {slice} does not exist"));
            }
            holds(c)?;
            resident(&s.weights, c, "the weights")?;
            resident(&s.grads, c, "the gradients")?;
            let i = c as usize * s.slices + slice as usize;
            if s.optimizer[i] != Place::Device {
                return Err(format!(
                    "optimizer state slice {slice} of chunk {c} is on the host; prefetch it first"
                ));
            }
            if s.steps_done[i] > 0 {
                return Err(format!("second step of chunk {c} slice {slice}"));
            }
            s.steps_done[i] += 1;
            if s.backwards_done[c as usize] as usize != s.m {
                return Err(format!(
                    "optimizer step of chunk {c} before all its {} backwards",
                    s.m
                ));
            }
            // The device's first step takes the norm of all of its chunks' gradients.
            let unfinished = (0..s.chunks).find(|&other| {
                dev(other as u32) == Some(d) && s.backwards_done[other] as usize != s.m
            });
            if let Some(other) = unfinished {
                return Err(format!(
                    "optimizer step of chunk {c} before all {} backwards of chunk {other} on the \
                     same device (a device's steps clip by the gradient norm of all its chunks)",
                    s.m
                ));
            }
            let unreduced = (0..s.chunks)
                .find(|&other| s.replicas > 1 && dev(other as u32) == Some(d) && !s.reduced[other]);
            if let Some(other) = unreduced {
                return Err(format!(
                    "optimizer step of chunk {c} before AR{other}: a device steps on the \
                     gradients summed over the replicas, all of its chunks'"
                ));
            }
        }
        Action::Reduce { chunk: c } => reduction(s, c, dev(c) == Some(d))?,
    }
    Ok(true)
}

/// Checks `AR<c>` on a device (`here`: it holds the chunk) and records it.
fn reduction(s: &mut State, c: u32, here: bool) -> Result<(), String> {
    if c as usize >= s.chunks {
        return Err(format!("chunk {c} does not exist ({} chunks)", s.chunks));
    }
    if !here {
        return Err(format!("chunk {c} is not on this device"));
    }
    if s.replicas < 2 {
        return Err("a plan with one replica has no gradients to reduce".into());
    }
    if s.grads[c as usize] != Place::Device {
        return Err(format!(
            "the gradients of chunk {c} are on the host here; prefetch them first"
        ));
    }
    if s.backwards_done[c as usize] as usize != s.m {
        return Err(format!(
            "reduction of chunk {c} before all its {} backwards",
            s.m
        ));
    }
    if std::mem::replace(&mut s.reduced[c as usize], true) {
        return Err(format!("second reduction of chunk {c}"));
    }
    Ok(())
}
