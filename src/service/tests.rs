use clap::Parser;

use super::*;

#[derive(Debug, Parser)]
struct Flags {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn worker(flags: &[&str]) -> WorkerArgs {
    let args = std::iter::once("worker").chain(flags.iter().copied());
    Flags::try_parse_from(args).unwrap().worker
}

#[test]
fn network_flags_left_out_leave_each_figure_to_the_measured_links() {
    assert_eq!(network(&worker(&[])).unwrap(), Configured::default());
    let both = [
        "--network-bandwidth",
        "1250MB",
        "--network-latency-ms",
        "0.2",
    ];
    assert_eq!(
        network(&worker(&both)).unwrap(),
        Configured {
            bytes_per_s: Some(1.25e9),
            latency_s: Some(0.2e-3),
        }
    );
    let latency = network(&worker(&["--network-latency-ms", "0"])).unwrap();
    assert_eq!(
        latency,
        Configured {
            bytes_per_s: None,
            latency_s: Some(0.0),
        }
    );
    let refused = network(&worker(&["--network-latency-ms=-1"])).unwrap_err();
    assert!(
        refused.to_string().contains("--network-latency-ms -1"),
        "{refused}"
    );
    let refused = network(&worker(&["--network-bandwidth", "0"])).unwrap_err();
    assert!(
        refused.to_string().contains("--network-bandwidth \"0\""),
        "{refused}"
    );
}

#[test]
fn a_worker_names_its_machine_or_keeps_the_host_name() {
    assert_eq!(machine(&worker(&[])).unwrap(), None);
    let named = machine(&worker(&["--machine", " rack-2 "])).unwrap();
    assert_eq!(named.as_deref(), Some("rack-2"));
    let refused = machine(&worker(&["--machine", " "])).unwrap_err();
    assert!(refused.to_string().contains("--machine \" \""), "{refused}");
}
