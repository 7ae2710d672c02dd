//! A scamper that hangs is killed as a group at its deadline, reaped, and leaves no zombie and
//! no descriptor behind. Alone in its test binary: descriptors and children are counted per
//! process, and tests running beside it would change the counts.

mod common;

use std::time::Duration;

use common::{
    procs,
    server::{self, assert_accounted, event, fake_scamper},
};
use hoptrace::proto::{self, Disposition};
use tonic::Code;

#[tokio::test]
async fn a_hanging_scamper_is_killed_at_its_deadline_with_no_zombie_left() {
    let tools = tempfile::tempdir().expect("tempdir");
    let hang = fake_scamper("hang", tools.path());
    let mut s = server::start(&[
        "--scamper-bin",
        &hang,
        "--trace-timeout",
        "1s",
        "--allow-private",
    ])
    .await;
    let trace = |address: &str| proto::TraceRequest {
        address: address.into(),
        ..Default::default()
    };
    // A first trace sets up what the runtime creates once (signal driver, blocking threads),
    // so the counts below compare like with like.
    let warm_up = s
        .client
        .trace(trace("10.77.100.8"))
        .await
        .expect_err("times out");
    assert_eq!(
        warm_up.code(),
        Code::DeadlineExceeded,
        "{}",
        warm_up.message()
    );
    let fds_before = procs::open_fds();
    let zombies_before = procs::zombie_children();

    let started = std::time::Instant::now();
    let err = s
        .client
        .trace(trace("10.77.100.9"))
        .await
        .expect_err("times out");
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(took < Duration::from_secs(10), "took {took:?}");

    let pid = procs::read_pid_file(&format!("{hang}.pid"), Duration::from_secs(10)).await;
    // The script and the helper it forked are gone (its group leader's pid is the group id).
    assert_eq!(
        procs::live_in_group(pid),
        0,
        "something of group {pid} still runs"
    );
    assert_eq!(
        procs::zombie_children(),
        zombies_before,
        "a zombie child is left"
    );
    assert_eq!(procs::open_fds(), fds_before, "descriptors leaked");

    // The failure is counted, no file was written, and the destination is not retried at once.
    let status = s.status().await;
    assert_eq!(
        status.failed_by_reason.get("timeout"),
        Some(&2),
        "{status:?}"
    );
    assert!(s.files().iter().all(|f| !f.ends_with(".jsonl")));
    let reply = s
        .client
        .report_close(event("d_1_1", "10.77.100.9"))
        .await
        .expect("reported")
        .into_inner();
    assert_eq!(
        reply.disposition,
        Disposition::RecentlyFailed as i32,
        "{reply:?}"
    );
    assert_accounted(&s.status().await);
    s.stop().await;
}
