//! `kill -9` of the shared scamper daemon under load, 20 times: every request ends exactly
//! once (done, or failed with a reason), the daemon is back within seconds, and no zombie or
//! descriptor is left. Alone in its test binary: descriptors and children are counted per
//! process. Needs root (namespaces).

mod common;

use std::{sync::Arc, time::Duration};

use common::{
    backends::lab_daemon,
    lab::{Lab, require_root},
    procs,
    requests::paris_request,
};
use hoptrace_backends::{DaemonOptions, TraceError, Tracer};
use nix::{sys::signal::Signal, unistd::Pid};

/// Deadline of each trace.
const DEADLINE: Duration = Duration::from_secs(30);
const ROUNDS: usize = 20;
const PER_ROUND: u32 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_daemon_under_load_ends_every_request_once_and_leaks_nothing() {
    if !require_root("kill_9_of_the_daemon_under_load_ends_every_request_once_and_leaks_nothing") {
        return;
    }
    let lab = Lab::up();
    let tools = tempfile::tempdir().expect("tempdir");
    let daemon = lab_daemon(
        &lab,
        tools.path(),
        DaemonOptions {
            // Slow enough that traces are in flight when the daemon is killed.
            pps: 500,
            window: 64,
            backoff: (Duration::from_millis(50), Duration::from_millis(400)),
            ..DaemonOptions::default()
        },
    );
    // Warm up: runtime resources created once are not leaks.
    daemon
        .trace(&paris_request(lab.dst_v4(1), DEADLINE))
        .await
        .expect("first trace");
    let fds = procs::open_fds();
    let zombies = procs::zombie_children();

    let (mut done, mut failed) = (0usize, 0usize);
    for round in 0..ROUNDS {
        let traces: Vec<_> = (0..PER_ROUND)
            .map(|i| {
                let daemon = Arc::clone(&daemon);
                let dst = lab.dst_v4((i % 200 + 1) as u8);
                tokio::spawn(async move { daemon.trace(&paris_request(dst, DEADLINE)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let pid = daemon.pid().expect("daemon running");
        nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
        let killed_at = std::time::Instant::now();
        for trace in traces {
            match trace.await.expect("task") {
                Ok(_) => done += 1,
                Err(e @ (TraceError::DaemonUnavailable(_) | TraceError::Output(_))) => {
                    assert!(!e.to_string().is_empty());
                    failed += 1;
                }
                Err(e) => panic!("round {round}: unexpected failure {e}"),
            }
        }
        // Back: a new generation answers on the socket.
        let back = async {
            while daemon.generation() < round as u64 + 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), back)
            .await
            .expect("daemon back within 5 s");
        eprintln!(
            "round {round}: back {:?} after kill -9",
            killed_at.elapsed()
        );
    }
    assert_eq!(
        done + failed,
        ROUNDS * PER_ROUND as usize,
        "every request ended once"
    );
    assert!(failed > 0, "the kills hit traces in flight");
    assert_eq!(daemon.restarts(), ROUNDS as u64);
    eprintln!("{done} done, {failed} failed with a reason over {ROUNDS} kills");

    // A trace after the storm works.
    daemon
        .trace(&paris_request(lab.dst_v4(2), DEADLINE))
        .await
        .expect("trace after restarts");
    assert_eq!(procs::zombie_children(), zombies, "zombies left");
    assert_eq!(procs::open_fds(), fds, "descriptors leaked");
    let last = daemon.pid().expect("running");
    daemon.shutdown().await;
    assert_eq!(
        procs::live_in_group(last),
        0,
        "the daemon's group is gone after shutdown"
    );
}
