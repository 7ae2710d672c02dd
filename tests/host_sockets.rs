//! The host socket watcher: real TCP connections opened and closed in the namespace probes
//! leave from (the lab's client) become traces; loopback ones never do. Needs root.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use common::{
    lab::{Lab, require_root},
    server::{assert_accounted, lab_server, outcomes},
};
use hoptrace_backends::NetNs;

const LIMIT: Duration = Duration::from_secs(60);

/// Opens a connection from `client` to `listener`, exchanges a byte and closes both ends.
fn connect_and_close(client: &NetNs, listener: TcpListener) {
    let addr = listener.local_addr().expect("listener address");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).expect("read");
    });
    let mut conn = client
        .run_inside(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .expect("enter client namespace")
        .expect("connect");
    conn.write_all(b"x").expect("write");
    // Live across several 10 ms dumps, so the polling mode can see it (it cannot see a
    // connection that opens and closes between two dumps; the destroy groups can).
    std::thread::sleep(Duration::from_millis(50));
    server.join().expect("peer");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_reach_the_pipeline_from_the_destroy_groups() {
    if !require_root("closes_reach_the_pipeline_from_the_destroy_groups") {
        return;
    }
    watcher_traces_closes_in_the_lab(&["--watch-host-sockets", "true"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_reach_the_pipeline_from_periodic_dumps() {
    if !require_root("closes_reach_the_pipeline_from_periodic_dumps") {
        return;
    }
    watcher_traces_closes_in_the_lab(&["--watch-host-sockets", "true", "--watch-poll-only"]).await;
}

/// A connection to a peer in the lab becomes a trace; a loopback one does not.
async fn watcher_traces_closes_in_the_lab(flags: &[&str]) {
    let lab = Lab::up();
    let (mut s, _tools) = lab_server(&lab, flags).await;
    // In poll mode the first dump is the baseline: let it happen before any connection.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let client = NetNs::open(&lab.client_ns()).expect("client namespace");
    let dst_ns = NetNs::open(&lab.ns("dst")).expect("dst namespace");
    let peer = lab.dst_v4(40);

    // A connection to a peer in the lab: the watcher sees the client end close.
    let listener = dst_ns
        .run_inside(|| TcpListener::bind((peer, 8080)))
        .expect("enter dst namespace")
        .expect("listen in dst");
    connect_and_close(&client, listener);
    // A loopback connection inside the watched namespace: refused, never traced.
    let local = client
        .run_inside(|| TcpListener::bind("127.0.0.1:0"))
        .expect("enter client namespace")
        .expect("listen on loopback");
    connect_and_close(&client, local);

    let status = s
        .wait_status(LIMIT, |st| {
            outcomes(st).traced == 1 && st.refused_by_reason.get("loopback") == Some(&2)
        })
        .await;
    assert_eq!(
        status.events_by_source.get("host_sockets"),
        Some(&3),
        "{status:?}"
    );
    assert_accounted(&status);
    let files = s.files();
    assert_eq!(files.len(), 1, "{files:?}");
    // The id has tcp-info's shape: <hostname>_<boot time>_<cookie %016X>.
    let shape =
        regex::Regex::new(r"_([A-Za-z0-9.-]+)_(\d{9,})_([0-9A-F]{16})\.jsonl$").expect("re");
    let name = &files[0];
    let caps = shape
        .captures(name)
        .unwrap_or_else(|| panic!("{name} is not tcp-info shaped"));
    let uuid = format!("{}_{}_{}", &caps[1], &caps[2], &caps[3]);
    let record = s.get(&uuid).await;
    assert_eq!(record.destination, peer.to_string());
    s.stop().await;
}
