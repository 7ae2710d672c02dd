//! The in-process engine against the namespace lab, as a [`Tracer`]: sockets opened inside the
//! lab's client namespace (checked before the first socket exists); Paris UDP, ICMP echo and
//! TCP SYN traces over IPv4 and IPv6 whose hops equal the lab's ground truth and scamper's for
//! the same flow; many concurrent traces sharing the engine; the namespace check refusing a
//! thread in the wrong namespace. Needs root (namespaces, raw sockets); fails in CI when it
//! cannot run.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::lab::{Lab, ns_id_of_pid, require_root};
use common::requests::paris_request;
use common::server::lab_guarded_scamper;
use hoptrace_backends::engine::{
    Engine, EngineError, EngineOptions, ensure_thread_in, thread_ns_id,
};
use hoptrace_backends::{
    Method, NetNs, Probe, ReplyKind, ScamperOptions, ScamperProcess, TraceOutput, TraceRequest,
    Tracer,
};

/// Bound on one trace (the lab answers in well under a millisecond).
const DEADLINE: Duration = Duration::from_secs(20);

/// Refuses any address outside the lab's 10.77.0.0/16 and fd77::/16.
fn assert_lab(addr: IpAddr) {
    let inside = match addr {
        IpAddr::V4(v4) => v4.octets()[..2] == [10, 77],
        IpAddr::V6(v6) => v6.segments()[0] == 0xfd77,
    };
    assert!(inside, "{addr} is not a lab address");
}

/// An engine whose sockets live in the client namespace of `lab`, after asserting that is not
/// this process's namespace.
fn lab_engine(lab: &Lab) -> Engine {
    let client = NetNs::open(&lab.client_ns()).expect("open the lab client namespace");
    assert_ne!(
        Lab::ns_id(&lab.client_ns()),
        ns_id_of_pid(std::process::id()),
        "lab client namespace is the test's own namespace"
    );
    assert_eq!(
        client.id().expect("namespace id"),
        Lab::ns_id(&lab.client_ns())
    );
    let options = EngineOptions {
        pps: 0,
        ..EngineOptions::default()
    };
    Engine::open(Some(&client), options).expect("open the engine in the lab")
}

fn request(dst: IpAddr, probe: Probe) -> TraceRequest {
    assert_lab(dst);
    TraceRequest {
        method: Method::Paris(probe),
        source_port: Some(40000),
        ..paris_request(dst, DEADLINE)
    }
}

/// (ttl, address) of every hop.
fn hops(out: &TraceOutput) -> Vec<(u8, IpAddr)> {
    out.summary.hops.iter().map(|h| (h.ttl, h.addr)).collect()
}

/// The trace of `dst` is the lab's path: TTL 1..=4 its routers (one of the alternatives at
/// each), TTL 5 the destination answering as `probe` makes it answer, and nothing else.
fn assert_lab_path(out: &TraceOutput, dst: IpAddr, probe: Probe, alternatives: &[Vec<IpAddr>]) {
    let summary = &out.summary;
    assert_eq!(
        summary.stop_reason.as_deref(),
        Some("COMPLETED"),
        "{}",
        out.lines
    );
    assert_eq!(summary.dst, dst);
    let ttls: Vec<u8> = summary.hops.iter().map(|h| h.ttl).collect();
    assert_eq!(ttls, [1, 2, 3, 4, 5], "{}", out.lines);
    for (hop, choices) in summary.hops.iter().zip(alternatives) {
        assert!(
            choices.contains(&hop.addr),
            "ttl {}: {} not in {choices:?}",
            hop.ttl,
            hop.addr
        );
        assert_eq!(hop.kind, ReplyKind::TimeExceeded, "{}", out.lines);
    }
    let last = &summary.hops[4];
    assert_eq!(last.addr, dst);
    let kind = match probe {
        Probe::Udp => ReplyKind::Unreachable,
        Probe::Icmp => ReplyKind::EchoReply,
        Probe::Tcp => ReplyKind::Tcp,
    };
    assert_eq!(last.kind, kind, "{}", out.lines);
}

/// Every probe kind to one destination: the engine's hops are the lab's and scamper's for the
/// same flow (same destination, same ports).
async fn engine_matches_lab_and_scamper(lab: &Lab, dst: IpAddr, alternatives: Vec<Vec<IpAddr>>) {
    let engine = lab_engine(lab);
    let tools = tempfile::tempdir().expect("tempdir");
    let netns = Arc::new(NetNs::open(&lab.client_ns()).expect("lab namespace"));
    let scamper = ScamperProcess::new(
        ScamperOptions {
            binary: lab_guarded_scamper(lab, tools.path()).into(),
            pps: None,
        },
        Some(netns),
    );
    for probe in [Probe::Udp, Probe::Icmp, Probe::Tcp] {
        let request = request(dst, probe);
        let ours = engine.trace(&request).await.expect("engine trace");
        eprintln!("{}", ours.lines);
        assert_lab_path(&ours, dst, probe, &alternatives);
        // The summary built with the lines is what reading the lines back gives.
        let read_back = hoptrace_backends::scamper_json::summarize(ours.lines.as_bytes());
        assert_eq!(read_back.expect("summarize"), ours.summary);
        assert_eq!(ours.summary.method, scamper_method(probe));
        let theirs = scamper.trace(&request).await.expect("scamper trace");
        assert_eq!(
            hops(&ours),
            hops(&theirs),
            "{probe:?}\nours {}\ntheirs {}",
            ours.lines,
            theirs.lines
        );
        // A second engine trace of the same flow takes the same path (Paris).
        let again = engine.trace(&request).await.expect("engine trace");
        assert_eq!(hops(&again), hops(&ours));
    }
    let stats = engine.stats();
    assert_eq!(stats.kernel_drops, 0, "{stats:?}");
    assert_eq!(stats.overflow, 0, "{stats:?}");
    engine.shutdown().await;
}

fn scamper_method(probe: Probe) -> &'static str {
    match probe {
        Probe::Udp => "udp-paris",
        Probe::Icmp => "icmp-echo-paris",
        Probe::Tcp => "tcp",
    }
}

#[tokio::test]
async fn engine_v4_traces_equal_the_lab_and_scamper() {
    if !require_root("engine_v4_traces_equal_the_lab_and_scamper") {
        return;
    }
    let lab = Lab::up();
    let dst = lab.dst_v4(5);
    engine_matches_lab_and_scamper(&lab, dst, lab.hops_v4()).await;
}

#[tokio::test]
async fn engine_v6_traces_equal_the_lab_and_scamper() {
    if !require_root("engine_v6_traces_equal_the_lab_and_scamper") {
        return;
    }
    let lab = Lab::up();
    let dst = lab.dst_v6(5);
    engine_matches_lab_and_scamper(&lab, dst, lab.hops_v6()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_traces_share_one_engine() {
    if !require_root("concurrent_traces_share_one_engine") {
        return;
    }
    let lab = Lab::up();
    let engine = Arc::new(lab_engine(&lab));
    let mut tasks = tokio::task::JoinSet::new();
    // 400 traces at once: 200 IPv4 and 200 IPv6 destinations, mixed probe kinds, ports chosen
    // by the engine.
    for n in 1..=200u8 {
        for (dst, alternatives) in [
            (lab.dst_v4(n), lab.hops_v4()),
            (lab.dst_v6(u16::from(n)), lab.hops_v6()),
        ] {
            let probe = [Probe::Udp, Probe::Icmp, Probe::Tcp][usize::from(n) % 3];
            let engine = Arc::clone(&engine);
            let request = TraceRequest {
                source_port: None,
                ..request(dst, probe)
            };
            tasks.spawn(async move {
                let out = engine.trace(&request).await.expect("trace");
                assert_lab_path(&out, dst, probe, &alternatives);
            });
        }
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        result.expect("trace task");
        done += 1;
    }
    assert_eq!(done, 400);
    let stats = engine.stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.kernel_drops, 0, "{stats:?}");
    assert_eq!(stats.overflow, 0, "{stats:?}");
    assert_eq!(engine.running(), 0);
}

#[test]
fn sockets_are_refused_in_the_wrong_namespace() {
    if !require_root("sockets_are_refused_in_the_wrong_namespace") {
        return;
    }
    let lab = Lab::up();
    let client = NetNs::open(&lab.client_ns()).expect("open the lab client namespace");
    let r1 = NetNs::open(&lab.ns("r1")).expect("open the lab r1 namespace");

    // This thread is in the test's own namespace, not the lab's.
    let err = ensure_thread_in(&client).expect_err("test thread is not in the lab");
    assert!(matches!(err, EngineError::WrongNamespace { .. }), "{err}");
    // A thread in r1 is not in client, and the reverse.
    let err = r1
        .run_inside(|| ensure_thread_in(&client))
        .expect("enter r1")
        .expect_err("r1 is not client");
    assert!(matches!(err, EngineError::WrongNamespace { .. }), "{err}");
    assert!(err.to_string().contains(&lab.client_ns()), "{err}");
    // A thread inside the namespace passes, and sees the namespace's id.
    client
        .run_inside(|| ensure_thread_in(&client))
        .expect("enter client")
        .expect("a thread in client is in client");
    let inside = client
        .run_inside(thread_ns_id)
        .expect("enter client")
        .expect("thread namespace id");
    assert_eq!(inside, Lab::ns_id(&lab.client_ns()));
    assert_ne!(inside, ns_id_of_pid(std::process::id()));
}
