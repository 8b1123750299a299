//! Which of the placed plans of a job's degree pairs it runs: the least simulated step time
//! plus what a step spends on the network between workers, so a plan a little faster in
//! simulation that sends much over a slow network loses to one that keeps its traffic on one
//! machine. Ties go to fewer devices, then to the faster in simulation (the planner's own
//! choice), then to the pair planned first. What it was chosen over is kept, to be said.

use super::{ClusterPlan, GangLayout};

/// A plan that lost, as it is said: where it would run, and its times.
#[derive(Debug, Clone, PartialEq)]
pub struct Rival {
    pub layout: GangLayout,
    pub step_time_s: f64,
    pub network_s: f64,
}

impl Rival {
    fn of(plan: &ClusterPlan) -> Rival {
        Rival {
            layout: plan.layout.clone(),
            step_time_s: plan.outcome.summary.step_time_s,
            network_s: plan.network_s,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}: {} + {}",
            self.layout.said(),
            milliseconds(self.step_time_s),
            milliseconds(self.network_s)
        )
    }
}

/// What a chosen plan was compared with.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Compared {
    /// Degree pairs planned and placed (the chosen one among them).
    pub pairs: usize,
    /// The best of the others.
    pub next: Option<Rival>,
    /// The fastest in simulation alone, when it is neither the chosen plan nor `next`: what a
    /// choice blind to the network would have taken.
    pub fastest_simulated: Option<Rival>,
}

impl Compared {
    pub fn describe(&self) -> String {
        let Some(next) = &self.next else {
            return "the only degree pair that fits".into();
        };
        let mut said = format!(
            "of {} degree pairs, the next best {}",
            self.pairs,
            next.describe()
        );
        if let Some(fastest) = &self.fastest_simulated {
            said += &format!("; the fastest in simulation {}", fastest.describe());
        }
        said
    }
}

/// Simulated step time plus network time per step.
fn per_step(plan: &ClusterPlan) -> f64 {
    plan.outcome.summary.step_time_s + plan.network_s
}

fn simulated(plan: &ClusterPlan) -> f64 {
    plan.outcome.summary.step_time_s
}

/// The plan to run among `placed` (in the order their pairs were planned), with what it was
/// compared with; `None` when there is none.
pub fn choose(mut placed: Vec<ClusterPlan>) -> Option<ClusterPlan> {
    let pairs = placed.len();
    // Stable: equal keys keep the planning order.
    placed.sort_by(|a, b| {
        (per_step(a).total_cmp(&per_step(b)))
            .then(a.ranks.len().cmp(&b.ranks.len()))
            .then(simulated(a).total_cmp(&simulated(b)))
    });
    let fastest = (placed.iter().enumerate())
        .min_by(|(_, a), (_, b)| simulated(a).total_cmp(&simulated(b)))
        .map(|(i, _)| i);
    let fastest_simulated = fastest.filter(|&i| i > 1).map(|i| Rival::of(&placed[i]));
    let next = placed.get(1).map(Rival::of);
    let mut chosen = placed.into_iter().next()?;
    chosen.compared = Compared {
        pairs,
        next,
        fastest_simulated,
    };
    Some(chosen)
}

/// `12.345 ms`.
pub fn milliseconds(seconds: f64) -> String {
    // `+ 0.0` says an empty sum (-0.0) as 0.
    format!("{:.3} ms", seconds * 1e3 + 0.0)
}
