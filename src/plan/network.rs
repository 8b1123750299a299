//! The network between two machines as the planner sees it. Each figure of a link (its
//! bandwidth, its latency) comes from the first of: what the operator configured for the
//! cluster; what the ranks measured on that pair of machines; the median of every measured
//! pair (a pair not measured yet is taken to be like the others); the assumed 10 Gb/s
//! Ethernet with 50 us a message. Devices on one machine talk for free, so only pairs of
//! different machines are looked up. Pure: the measured figures are handed in.

use std::collections::BTreeMap;

use super::machines::{Links, Network};

/// Where one figure of a link came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// The operator's (`worker --network-bandwidth`, `--network-latency-ms`).
    Configured,
    /// Measured between this pair of machines.
    Measured,
    /// The median of every measured pair (this one was not measured).
    MedianMeasured,
    /// Nothing configured or measured: 10 Gb/s Ethernet, 50 us a message.
    Assumed,
}

impl Source {
    pub fn word(self) -> &'static str {
        match self {
            Source::Configured => "configured",
            Source::Measured => "measured",
            Source::MedianMeasured => "median of the measured links",
            Source::Assumed => "assumed",
        }
    }
}

/// The operator's figures for every link of the cluster; an unset one is measured, else
/// assumed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Configured {
    pub bytes_per_s: Option<f64>,
    pub latency_s: Option<f64>,
}

/// A link's figures and where each came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub network: Network,
    pub bandwidth_from: Source,
    pub latency_from: Source,
}

/// Everything known of the cluster's network: the configured figures and the measured pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkFigures {
    configured: Configured,
    /// By machine names, the lesser first.
    measured: BTreeMap<(String, String), Network>,
    /// The median of the measured pairs, figure by figure.
    median: Option<Network>,
}

impl NetworkFigures {
    /// `measured`: `(machine, machine, figures)` of each measured pair, in either order.
    pub fn new(
        configured: Configured,
        measured: impl IntoIterator<Item = (String, String, Network)>,
    ) -> NetworkFigures {
        let measured: BTreeMap<(String, String), Network> = (measured.into_iter())
            .filter(|(a, b, _)| a != b)
            .map(|(a, b, network)| (pair(&a, &b), network))
            .collect();
        let median = (!measured.is_empty()).then(|| Network {
            bytes_per_s: median_of(measured.values().map(|n| n.bytes_per_s)),
            latency_s: median_of(measured.values().map(|n| n.latency_s)),
        });
        NetworkFigures {
            configured,
            measured,
            median,
        }
    }

    /// Only what the operator configured (nothing measured).
    pub fn configured(configured: Configured) -> NetworkFigures {
        NetworkFigures::new(configured, [])
    }

    /// The link between machines `a` and `b`.
    pub fn between(&self, a: &str, b: &str) -> Link {
        let assumed = Network::default();
        let (found, from) = match (self.measured.get(&pair(a, b)), self.median) {
            (Some(measured), _) => (*measured, Source::Measured),
            (None, Some(median)) => (median, Source::MedianMeasured),
            (None, None) => (assumed, Source::Assumed),
        };
        let figure = |configured: Option<f64>, found: f64| match configured {
            Some(value) => (value, Source::Configured),
            None => (found, from),
        };
        let (bytes_per_s, bandwidth_from) = figure(self.configured.bytes_per_s, found.bytes_per_s);
        let (latency_s, latency_from) = figure(self.configured.latency_s, found.latency_s);
        Link {
            network: Network {
                bytes_per_s,
                latency_s,
            },
            bandwidth_from,
            latency_from,
        }
    }

    /// The links between the machines named `machines` (a placement's machine `i` is
    /// `machines[i]`).
    pub fn for_machines(&self, machines: &[String]) -> MachineLinks {
        let mut links = BTreeMap::new();
        for (i, a) in machines.iter().enumerate() {
            for (j, b) in machines.iter().enumerate().skip(i + 1) {
                links.insert((i, j), self.between(a, b));
            }
        }
        MachineLinks {
            machines: machines.to_vec(),
            links,
        }
    }
}

/// The links among one placement's machines, looked up once.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineLinks {
    machines: Vec<String>,
    links: BTreeMap<(usize, usize), Link>,
}

impl MachineLinks {
    pub fn link(&self, a: usize, b: usize) -> Option<&Link> {
        self.links.get(&(a.min(b), a.max(b)))
    }

    /// Each link's figures and where they came from, e.g. `a-b 1.25 GB/s (measured), 0.050
    /// ms (configured)`; `one machine` when there is no link.
    pub fn describe(&self) -> String {
        if self.links.is_empty() {
            return "one machine".to_owned();
        }
        let each: Vec<String> = (self.links.iter())
            .map(|((i, j), link)| {
                format!(
                    "{}-{} {:.3} GB/s ({}), {:.3} ms ({})",
                    self.machines[*i],
                    self.machines[*j],
                    link.network.bytes_per_s / 1e9,
                    link.bandwidth_from.word(),
                    link.network.latency_s * 1e3,
                    link.latency_from.word()
                )
            })
            .collect();
        each.join("; ")
    }
}

impl Links for MachineLinks {
    fn between(&self, a: usize, b: usize) -> Network {
        self.link(a, b)
            .map_or_else(Network::default, |link| link.network)
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

/// The median of `values` (the mean of the middle two when there is an even number).
fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if !n.is_multiple_of(2) => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests;
