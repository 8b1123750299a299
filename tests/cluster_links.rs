//! The links between machines in the store, on SQLite and PostgreSQL: what ranks measured
//! between two machines is kept once per pair (named in either order, replaced when measured
//! again, with when), figures that are not a link are refused by name, and `GET /v1/devices`
//! lists them.

mod common;

use std::sync::Arc;

use chronospipe::store::{ClusterError, Store, StoreError, connect, now_ms};

async fn links(url: &str) {
    let store: Arc<dyn Store> = connect(url).await.unwrap();
    assert!(store.network_links().await.unwrap().is_empty());
    let before = now_ms();
    store.record_link("m-b", "m-a", 1.0e9, 60e-6).await.unwrap();
    store.record_link("m-a", "m-c", 5.0e8, 1e-3).await.unwrap();
    let links = store.network_links().await.unwrap();
    let pairs: Vec<(&str, &str)> = (links.iter())
        .map(|l| (l.machine_a.as_str(), l.machine_b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [("m-a", "m-b"), ("m-a", "m-c")],
        "the lesser name first"
    );
    assert_eq!((links[0].bytes_per_s, links[0].latency_s), (1.0e9, 60e-6));
    assert_eq!((links[1].bytes_per_s, links[1].latency_s), (5.0e8, 1e-3));
    assert!(
        links
            .iter()
            .all(|l| l.measured_at >= before && l.measured_at <= now_ms())
    );

    // Measured again, named the other way round: the pair's figures are replaced.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.record_link("m-a", "m-b", 2.0e9, 40e-6).await.unwrap();
    let again = store.network_links().await.unwrap();
    assert_eq!(again.len(), 2, "{again:?}");
    assert_eq!((again[0].bytes_per_s, again[0].latency_s), (2.0e9, 40e-6));
    assert!(again[0].measured_at > links[0].measured_at);
    assert_eq!(again[1], links[1], "the other pair is untouched");

    // Not a link between two machines: refused, nothing written.
    for (a, b, bytes_per_s, latency_s) in [
        ("m-a", "m-a", 1e9, 1e-4),
        ("m-a", "m-b", 0.0, 1e-4),
        ("m-a", "m-b", f64::NAN, 1e-4),
        ("m-a", "m-b", 1e9, -1.0),
        ("m-a", "m-b", 1e9, f64::INFINITY),
    ] {
        let refused = store.record_link(a, b, bytes_per_s, latency_s).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::Cluster(ClusterError::BadLink { .. }))
            ),
            "{a}-{b} {bytes_per_s} {latency_s}: {refused:?}"
        );
    }
    assert_eq!(store.network_links().await.unwrap(), again);

    // The API lists them with the cluster's devices.
    let server = common::TestServer::start(url).await;
    let devices = server.get_json("/v1/devices").await;
    let listed = devices["links"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{devices}");
    assert_eq!(listed[0]["machines"], serde_json::json!(["m-a", "m-b"]));
    assert_eq!(listed[0]["bytes_per_s"], 2.0e9);
    assert_eq!(listed[0]["latency_s"], 40e-6);
    assert_eq!(listed[0]["measured_at"], again[0].measured_at / 1000);
    assert_eq!(listed[1]["machines"], serde_json::json!(["m-a", "m-c"]));
    server.stop().await;
}
both_databases!(link_tests, super::links);
