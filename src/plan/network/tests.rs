use super::*;

fn net(gb_per_s: f64, us: f64) -> Network {
    Network {
        bytes_per_s: gb_per_s * 1e9,
        latency_s: us / 1e6,
    }
}

fn measured() -> Vec<(String, String, Network)> {
    vec![
        ("b".into(), "a".into(), net(1.0, 100.0)),
        ("a".into(), "c".into(), net(3.0, 300.0)),
        ("b".into(), "c".into(), net(8.0, 200.0)),
    ]
}

#[test]
fn nothing_known_is_the_assumed_ethernet() {
    let link = NetworkFigures::default().between("a", "b");
    assert_eq!(link.network, Network::default());
    assert_eq!(link.network, net(1.25, 50.0));
    assert_eq!(
        (link.bandwidth_from, link.latency_from),
        (Source::Assumed, Source::Assumed)
    );
}

#[test]
fn a_measured_pair_is_its_own_figures_in_either_order() {
    let figures = NetworkFigures::new(Configured::default(), measured());
    for (a, b) in [("a", "b"), ("b", "a")] {
        let link = figures.between(a, b);
        assert_eq!(link.network, net(1.0, 100.0), "{a}-{b}");
        assert_eq!(link.bandwidth_from, Source::Measured);
        assert_eq!(link.latency_from, Source::Measured);
    }
    assert_eq!(figures.between("c", "b").network, net(8.0, 200.0));
}

#[test]
fn an_unmeasured_pair_is_the_median_of_the_measured_ones() {
    let figures = NetworkFigures::new(Configured::default(), measured());
    let link = figures.between("a", "d");
    // Bandwidths 1, 3, 8 GB/s; latencies 100, 200, 300 us: each figure's own median.
    assert_eq!(link.network, net(3.0, 200.0));
    assert_eq!(link.bandwidth_from, Source::MedianMeasured);
    // Two measured pairs: the mean of the middle two.
    let two = NetworkFigures::new(Configured::default(), measured().into_iter().take(2));
    assert_eq!(two.between("x", "y").network.bytes_per_s, 2.0e9);
}

#[test]
fn configured_figures_win_each_on_its_own() {
    let bandwidth_only = Configured {
        bytes_per_s: Some(5e8),
        latency_s: None,
    };
    let figures = NetworkFigures::new(bandwidth_only, measured());
    let link = figures.between("a", "b");
    assert_eq!(
        link.network,
        Network {
            bytes_per_s: 5e8,
            latency_s: 100e-6
        }
    );
    assert_eq!(
        (link.bandwidth_from, link.latency_from),
        (Source::Configured, Source::Measured)
    );
    let nothing_measured = NetworkFigures::configured(Configured {
        bytes_per_s: None,
        latency_s: Some(1e-3),
    });
    let link = nothing_measured.between("a", "b");
    assert_eq!(
        link.network,
        Network {
            bytes_per_s: 1.25e9,
            latency_s: 1e-3
        }
    );
    assert_eq!(
        (link.bandwidth_from, link.latency_from),
        (Source::Assumed, Source::Configured)
    );
}

#[test]
fn a_placement_looks_each_pair_up_and_says_where_from() {
    let figures = NetworkFigures::new(Configured::default(), measured());
    let names = ["a".to_string(), "b".to_string(), "d".to_string()];
    let links = figures.for_machines(&names);
    assert_eq!(links.between(0, 1), net(1.0, 100.0));
    assert_eq!(links.between(1, 0), net(1.0, 100.0));
    assert_eq!(links.between(0, 2), net(3.0, 200.0));
    let said = links.describe();
    assert!(
        said.starts_with("a-b 1.000 GB/s (measured), 0.100 ms (measured); "),
        "{said}"
    );
    assert!(
        said.contains("b-d 3.000 GB/s (median of the measured links)"),
        "{said}"
    );
    let one = figures.for_machines(&names[..1]);
    assert_eq!(one.describe(), "one machine");
}
