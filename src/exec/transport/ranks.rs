//! Which process runs which devices: `--rank R --peers A,B,...` names every rank's address;
//! rank `R` of `K` runs the run-wide devices `R * N / K .. (R + 1) * N / K` of a plan on `N`
//! devices (replica by replica, stage by stage), so two ranks of a 2-stage plan are one stage
//! each and two ranks of a dp 2 x pp 1 plan are one replica each.

use std::ops::Range;
use std::time::Duration;

use super::TransportError;
use super::probe::LinkProbe;

/// This process's rank and every rank's address (`host:port`), in rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSpec {
    pub rank: u32,
    pub peers: Vec<String>,
    /// How long to keep trying to reach the other ranks before giving up.
    pub connect_timeout: Duration,
    /// This rank's socket, bound before its address was published (a port the OS chose, as
    /// a worker's rank does); without it the rank binds its own address from `peers`.
    pub listener: Option<Bound>,
    /// Where each rank runs, when the links between machines are to be measured as the mesh
    /// connects (`probe`); `None` measures nothing.
    pub probe: Option<LinkProbe>,
}

/// A listening socket bound ahead of the mesh; two are equal when bound to one address.
#[derive(Debug, Clone)]
pub struct Bound(pub std::sync::Arc<std::net::TcpListener>);

impl PartialEq for Bound {
    fn eq(&self, other: &Self) -> bool {
        self.0.local_addr().ok() == other.0.local_addr().ok()
    }
}

impl Eq for Bound {}

impl RankSpec {
    /// `peers` is a comma-separated list of `host:port`, one per rank.
    pub fn parse(
        rank: u32,
        peers: &str,
        connect_timeout: Duration,
    ) -> Result<Self, TransportError> {
        let peers: Vec<String> = peers.split(',').map(|p| p.trim().to_string()).collect();
        if let Some(bad) = peers.iter().find(|p| {
            p.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            return Err(TransportError::Peers(format!(
                "{bad:?} is not HOST:PORT (e.g. 127.0.0.1:7101)"
            )));
        }
        if peers.len() < 2 {
            return Err(TransportError::Peers(
                "name every rank's address, at least two (one rank runs without --rank)".into(),
            ));
        }
        if rank as usize >= peers.len() {
            return Err(TransportError::Peers(format!(
                "rank {rank} is not one of the {} ranks listed (0..{})",
                peers.len(),
                peers.len() - 1
            )));
        }
        Ok(RankSpec {
            rank,
            peers,
            connect_timeout,
            listener: None,
            probe: None,
        })
    }

    pub fn ranks(&self) -> u32 {
        self.peers.len() as u32
    }

    /// The run-wide devices of rank `rank` in a plan of `devices` devices.
    pub fn devices_of(&self, rank: u32, devices: u32) -> Range<u32> {
        let per = devices / self.ranks();
        rank * per..(rank + 1) * per
    }

    /// The rank running run-wide device `device`.
    pub fn rank_of(&self, device: u32, devices: u32) -> u32 {
        device / (devices / self.ranks()).max(1)
    }

    /// Refused by name unless the ranks split the plan's devices into equal blocks.
    pub fn check_divides(&self, devices: u32) -> Result<(), TransportError> {
        let ranks = self.ranks();
        if devices.is_multiple_of(ranks) {
            return Ok(());
        }
        let fits: Vec<String> = (2..=devices)
            .filter(|k| devices.is_multiple_of(*k))
            .map(|k| k.to_string())
            .collect();
        Err(TransportError::Peers(format!(
            "{ranks} ranks do not split the plan's {devices} devices equally; list {} peers",
            if fits.is_empty() {
                "no more than 1 (run without --rank)".to_string()
            } else {
                fits.join(" or ")
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: u32, peers: &str) -> Result<RankSpec, TransportError> {
        RankSpec::parse(rank, peers, Duration::from_secs(1))
    }

    #[test]
    fn ranks_take_equal_contiguous_blocks_of_devices() {
        let two = spec(1, "127.0.0.1:7000,127.0.0.1:7001").unwrap();
        assert_eq!(two.devices_of(0, 4), 0..2);
        assert_eq!(two.devices_of(1, 4), 2..4);
        assert_eq!(two.rank_of(3, 4), 1);
        assert_eq!(two.rank_of(1, 4), 0);
        assert_eq!(two.devices_of(1, 2), 1..2);
        two.check_divides(4).unwrap();
        let err = spec(0, "a:1,b:2,c:3")
            .unwrap()
            .check_divides(4)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("3 ranks do not split the plan's 4 devices equally; list 2 or 4 peers"),
            "{err}"
        );
    }

    #[test]
    fn bad_peer_lists_are_refused_by_flag() {
        for (rank, peers, says) in [
            (0, "127.0.0.1:7000", "at least two"),
            (2, "a:1,b:2", "rank 2 is not one of the 2 ranks"),
            (0, "a:1,nowhere", "\"nowhere\" is not HOST:PORT"),
            (0, "a:1,b:99999", "\"b:99999\" is not HOST:PORT"),
        ] {
            let err = spec(rank, peers).unwrap_err().to_string();
            assert!(
                err.starts_with("--peers / --rank") && err.contains(says),
                "{err}"
            );
        }
    }
}
