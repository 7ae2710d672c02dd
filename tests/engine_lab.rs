//! The in-process engine's raw sockets against the namespace lab: sockets opened inside the lab's
//! client namespace (checked before the first socket exists), Paris UDP traces over IPv4 and
//! IPv6, and
//! the namespace check refusing a thread in the wrong namespace. Needs root (namespaces, raw
//! sockets); fails in CI when it cannot run.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::lab::{Lab, ns_id_of_pid, require_root};
use hoptrace_backends::engine::{
    EngineError, Flow, Kind, ProbeKey, ProbeSockets, ensure_thread_in, thread_ns_id, trace_paris,
};
use hoptrace_backends::{NetNs, Probe};

/// Longest one trace waits for its replies (the lab answers in well under a millisecond).
const WAIT: Duration = Duration::from_secs(3);

/// Refuses any address outside the lab's 10.77.0.0/16 and fd77::/16.
fn assert_lab(addr: IpAddr) {
    let inside = match addr {
        IpAddr::V4(v4) => v4.octets()[..2] == [10, 77],
        IpAddr::V6(v6) => v6.segments()[0] == 0xfd77,
    };
    assert!(inside, "{addr} is not a lab address");
}

/// Opens probe sockets in the client namespace of a fresh lab, after asserting it is not this
/// process's namespace.
fn lab_sockets(lab: &Lab) -> ProbeSockets {
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
    ProbeSockets::open_in(&client).expect("open probe sockets in the lab")
}

/// Traces `flow` three times with the same sockets and key: each time TTL 1..=4 are the lab's
/// routers (`hops`) and TTL 5 the destination's port unreachable (`unreachable_code`).
fn trace_three_times(
    sockets: &ProbeSockets,
    flow: Flow,
    hops: &[Vec<IpAddr>],
    unreachable_code: u8,
) {
    assert_lab(flow.src);
    assert_lab(flow.dst);
    let key = ProbeKey::random();
    for round in 1..=3 {
        let trace = trace_paris(sockets, &flow, &key, 8, WAIT).expect("trace");
        eprintln!(
            "{} round {round}: sent {}, stale {}, strays {}, replies:",
            flow.dst, trace.sent, trace.stale, trace.strays
        );
        for r in &trace.replies {
            eprintln!(
                "  ttl {} from {} {:?} reply_ttl {} quoted_ttl {:?}",
                r.id.ttl, r.from, r.kind, r.reply_ttl, r.quoted_ttl
            );
        }
        assert_eq!(trace.sent, 8, "round {round}");
        let ttls: Vec<u8> = trace.replies.iter().map(|r| r.id.ttl).collect();
        assert_eq!(ttls, [1, 2, 3, 4, 5], "round {round}: {trace:?}");
        for (reply, alternatives) in trace.replies.iter().zip(hops) {
            assert!(
                alternatives.contains(&reply.from),
                "round {round}: ttl {} answered by {}, expected one of {alternatives:?}",
                reply.id.ttl,
                reply.from
            );
            assert_eq!(reply.kind, Kind::TimeExceeded, "round {round}: {reply:?}");
        }
        let last = &trace.replies[4];
        assert_eq!(last.from, flow.dst, "round {round}: {last:?}");
        assert_eq!(
            last.kind,
            Kind::Unreachable {
                code: unreachable_code
            },
            "round {round}: port unreachable expected, got {last:?}"
        );
        for r in &trace.replies {
            assert_eq!(
                (r.flow_dst, r.probe, r.sport, r.dport, r.id.attempt),
                (flow.dst, flow.probe, flow.sport, flow.dport, 0),
                "round {round}: {r:?}"
            );
        }
    }
}

#[test]
fn paris_udp_v4_trace_through_the_lab() {
    if !require_root("paris_udp_v4_trace_through_the_lab") {
        return;
    }
    let lab = Lab::up();
    let sockets = lab_sockets(&lab);
    let flow = Flow {
        src: IpAddr::V4(Ipv4Addr::new(10, 77, 1, 1)),
        dst: lab.dst_v4(5),
        probe: Probe::Udp,
        sport: 40000,
        dport: 33435,
    };
    // IPv4 port unreachable is code 3.
    trace_three_times(&sockets, flow, &lab.hops_v4(), 3);
}

#[test]
fn paris_udp_v6_trace_through_the_lab() {
    if !require_root("paris_udp_v6_trace_through_the_lab") {
        return;
    }
    let lab = Lab::up();
    let sockets = lab_sockets(&lab);
    let flow = Flow {
        src: IpAddr::V6(Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1)),
        dst: lab.dst_v6(5),
        probe: Probe::Udp,
        sport: 40000,
        dport: 33435,
    };
    // ICMPv6 port unreachable is code 4.
    trace_three_times(&sockets, flow, &lab.hops_v6(), 4);
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
