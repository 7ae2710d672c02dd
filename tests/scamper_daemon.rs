//! The shared scamper daemon backend against the real Debian scamper in a namespace lab.
//! Needs root (namespaces); fails in CI when it cannot run.

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    backends::lab_daemon,
    lab::{Lab, require_root},
    requests::paris_request,
};
use hoptrace_backends::{DaemonOptions, Tracer};

/// Deadline of each trace.
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_traces_to_200_destinations_finish_with_no_timeout() {
    if !require_root("a_thousand_concurrent_traces_to_200_destinations_finish_with_no_timeout") {
        return;
    }
    let lab = Lab::up();
    let tools = tempfile::tempdir().expect("tempdir");
    let daemon = lab_daemon(
        &lab,
        tools.path(),
        DaemonOptions {
            pps: 10_000,
            window: 128,
            ..DaemonOptions::default()
        },
    );
    let started = std::time::Instant::now();
    let traces: Vec<_> = (0..1000u32)
        .map(|i| {
            let daemon = Arc::clone(&daemon);
            // 200 destinations, five traces each, several to one destination at once.
            let dst = lab.dst_v4((i % 200 + 1) as u8);
            tokio::spawn(async move { (dst, daemon.trace(&paris_request(dst, DEADLINE)).await) })
        })
        .collect();
    let mut failures = Vec::new();
    for trace in traces {
        let (dst, result) = trace.await.expect("task");
        match result {
            Ok(output) => {
                assert_eq!(
                    output.summary.dst, dst,
                    "a result was matched to the wrong request"
                );
                assert_eq!(output.lines.lines().count(), 3);
                let last = output.summary.hops.last().expect("hops");
                assert_eq!(last.addr, dst, "reached the destination");
            }
            Err(e) => failures.push(format!("{dst}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    eprintln!("1000 traces through the daemon in {:?}", started.elapsed());
    assert_eq!(daemon.restarts(), 0);
    daemon.shutdown().await;
    let after = daemon.trace(&paris_request(lab.dst_v4(1), DEADLINE)).await;
    assert!(after.is_err(), "no trace after shutdown");
}

/// A daemon whose socket file disappears while scamper still runs (a temporary-file cleaner,
/// a second instance on the same path) is replaced when a trace finds nothing there: the
/// trace waits for the new one and succeeds, rather than every trace timing out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_socket_vanished_is_replaced() {
    if !require_root("a_daemon_whose_socket_vanished_is_replaced") {
        return;
    }
    let lab = Lab::up();
    let tools = tempfile::tempdir().expect("tempdir");
    let socket = tools.path().join("control.sock");
    let daemon = lab_daemon(
        &lab,
        tools.path(),
        DaemonOptions {
            socket: Some(socket.clone()),
            backoff: (Duration::from_millis(50), Duration::from_millis(400)),
            ..DaemonOptions::default()
        },
    );
    let dst = lab.dst_v4(7);
    daemon
        .trace(&paris_request(dst, DEADLINE))
        .await
        .expect("first trace");
    let first = daemon.pid().expect("running");
    std::fs::remove_file(&socket).expect("remove the control socket");
    let out = daemon
        .trace(&paris_request(dst, DEADLINE))
        .await
        .expect("traced by the replacement");
    assert!(out.summary.hops.iter().any(|h| h.addr == dst));
    assert_eq!(daemon.restarts(), 1);
    assert_ne!(daemon.pid(), Some(first), "a new scamper");
    daemon.shutdown().await;
}
