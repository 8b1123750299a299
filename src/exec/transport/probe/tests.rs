use std::net::TcpListener;
use std::sync::Mutex;

use super::*;
use crate::exec::transport::{Mesh, RankSpec};

fn names(machines: &[&str]) -> Vec<String> {
    machines.iter().map(|m| m.to_string()).collect()
}

#[test]
fn one_pair_of_ranks_measures_each_pair_of_machines() {
    assert_eq!(pairs(&names(&["a", "a", "b", "b"])), [(0, 2)]);
    assert_eq!(
        pairs(&names(&["a", "b", "a", "c"])),
        [(0, 1), (0, 3), (1, 3)]
    );
    assert_eq!(pairs(&names(&["b", "a", "a", "b"])), [(0, 1)]);
    assert!(pairs(&names(&["a", "a"])).is_empty(), "one machine");
}

/// Free local addresses for `n` ranks.
fn peers(n: usize) -> Vec<String> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

type Reports = Arc<Mutex<Vec<(u32, MeasuredLink)>>>;

/// Connects every rank of `peers` in its own thread, rank `r` on `machines[r]` (no probe when
/// `machines` is `None` for it); each rank's reports land in `reports` tagged with its rank.
fn connect_all(
    peers: &[String],
    machines: &[Option<Vec<String>>],
    reports: &Reports,
) -> Vec<Result<Mesh, TransportError>> {
    let threads: Vec<_> = (0..peers.len())
        .map(|rank| {
            let mut spec =
                RankSpec::parse(rank as u32, &peers.join(","), Duration::from_secs(10)).unwrap();
            let reports = reports.clone();
            spec.probe = machines[rank].clone().map(|machines| LinkProbe {
                machines,
                report: Arc::new(move |link| {
                    reports.lock().unwrap().push((rank as u32, link));
                }),
            });
            std::thread::spawn(move || Mesh::connect(&spec, 3))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn ranks_on_two_machines_measure_the_link_then_talk_as_usual() {
    let peers = peers(3);
    let machines = Some(names(&["x", "x", "y"]));
    let reports = Reports::default();
    let started = Instant::now();
    let meshes = connect_all(
        &peers,
        &[machines.clone(), machines.clone(), machines],
        &reports,
    );
    let took = started.elapsed();
    let meshes: Vec<Mesh> = meshes.into_iter().map(Result::unwrap).collect();
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1, "one pair of machines: {reports:?}");
    let (rank, link) = &reports[0];
    assert_eq!(*rank, 0, "the lower rank of the first pair across measures");
    assert_eq!(link.machines, ("x".to_string(), "y".to_string()));
    assert!(
        link.bytes_per_s > 1e6 && link.bytes_per_s.is_finite(),
        "{link:?}"
    );
    assert!(link.latency_s > 0.0 && link.latency_s < 0.1, "{link:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The links carry frames as before: rank 2 hears rank 1.
    meshes[1].send(2, &Frame::Written { step: 4 }).unwrap();
    let heard = meshes[2].wait(
        |inbox| inbox.written.contains(&(4, 1)).then_some(()),
        &|| false,
    );
    assert_eq!(heard, Ok(Some(())));
    std::thread::scope(|s| {
        let closing: Vec<_> = (meshes.iter())
            .map(|mesh| s.spawn(|| mesh.close(Duration::from_secs(5))))
            .collect();
        for closed in closing {
            closed.join().unwrap().unwrap();
        }
    });
}

#[test]
fn a_rank_that_does_not_measure_is_named_not_waited_for() {
    let peers = peers(2);
    let reports = Reports::default();
    let meshes = connect_all(&peers, &[Some(names(&["x", "y"])), None], &reports);
    let measuring = meshes[0].as_ref().err().expect("rank 0 cannot measure");
    assert!(
        measuring.to_string().contains("while measuring the link"),
        "{measuring}"
    );
    if let Ok(other) = &meshes[1] {
        let failed = other.wait(|_| None::<()>, &|| false).unwrap_err();
        assert!(failed.to_string().contains("lost rank 0"), "{failed}");
    }
    assert!(reports.lock().unwrap().is_empty());
}
