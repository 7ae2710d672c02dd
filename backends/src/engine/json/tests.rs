//! The engine's lines against scamper's own output for the same methods: same keys in the same
//! order, same separators, and the same summary when read back.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Clock, HostName, TraceLine, TracelbLine, trace_output, tracelb_output};
use crate::TraceOutput;
use crate::engine::mda::{Confidence, FlowIx, MdaConfig, MdaTrace};
use crate::engine::paris::{Answer, Extensions, StopReason};
use crate::engine::{Flow, Kind, ProbeId, Reply, ReplyPacket};
use crate::{Probe, ReplyKind, scamper_json};

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/scamper-20211212/",
            $name
        ))
    };
}

/// A 5-hop answer list like the lab's: routers 1..=4 time exceeded, the destination at 5.
fn answers(flow: &Flow, start: Instant) -> Vec<Answer> {
    let v4 = flow.dst.is_ipv4();
    (1..=5u8)
        .map(|ttl| {
            let at_dst = ttl == 5;
            let from: IpAddr = if at_dst {
                flow.dst
            } else if v4 {
                format!("10.77.{ttl}.2").parse().expect("addr")
            } else {
                format!("fd77:{ttl}::2").parse().expect("addr")
            };
            let (kind, icmp, tcp_flags) = match (at_dst, flow.probe, v4) {
                (false, _, true) => (Kind::TimeExceeded, Some((11, 0)), None),
                (false, _, false) => (Kind::TimeExceeded, Some((3, 0)), None),
                (true, Probe::Icmp, true) => (Kind::EchoReply, Some((0, 0)), None),
                (true, Probe::Icmp, false) => (Kind::EchoReply, Some((129, 0)), None),
                (true, Probe::Udp, true) => (Kind::Unreachable { code: 3 }, Some((3, 3)), None),
                (true, Probe::Udp, false) => (Kind::Unreachable { code: 4 }, Some((1, 4)), None),
                (true, Probe::Tcp, _) => (Kind::TcpReset, None, Some(20)),
            };
            let quoted = kind.is_icmp_error();
            let tx = start + Duration::from_millis(u64::from(ttl));
            Answer {
                reply: Reply {
                    from,
                    kind,
                    flow_dst: flow.dst,
                    sport: flow.sport,
                    dport: flow.dport,
                    probe: flow.probe,
                    id: ProbeId { ttl, attempt: 0 },
                    reply_ttl: 65 - ttl,
                    quoted_ttl: quoted.then_some(1),
                    packet: ReplyPacket {
                        size: 72,
                        tos: 192,
                        ipid: 1234,
                        icmp,
                        tcp_flags,
                        quoted_len: if quoted { 44 } else { 0 },
                        quoted_tos: 0,
                    },
                },
                tx,
                rx: tx + Duration::from_micros(41),
            }
        })
        .collect()
}

fn flow(probe: Probe, v4: bool) -> Flow {
    let (src, dst): (IpAddr, IpAddr) = if v4 {
        (
            "10.77.1.1".parse().expect("addr"),
            "10.77.100.5".parse().expect("addr"),
        )
    } else {
        (
            "fd77:1::1".parse().expect("addr"),
            "fd77:100::5".parse().expect("addr"),
        )
    };
    Flow {
        src,
        dst,
        probe,
        sport: 46171,
        dport: if probe == Probe::Icmp { 0 } else { 443 },
        salt: 0,
    }
}

/// The output for `line`, after checking its summary is what reading its lines back gives.
fn output(line: &TraceLine<'_>, hostname: &str, stop: Instant) -> TraceOutput {
    let out = trace_output(line, &Clock::now(), &HostName::new(hostname), stop);
    let read_back = scamper_json::summarize(out.lines.as_bytes()).expect("summarize");
    assert_eq!(out.summary, read_back, "{}", out.lines);
    out
}

/// No ICMP extensions.
static NO_EXTENSIONS: Extensions = Extensions::new();

/// The line of a completed 5-hop trace of `flow` with `answers`.
fn completed<'a>(flow: &'a Flow, start: Instant, answers: &'a [Answer]) -> TraceLine<'a> {
    TraceLine {
        flow,
        icmp_sum: 48683,
        stop: StopReason::Completed,
        start,
        hop_count: 5,
        attempts: 2,
        wait: Duration::from_secs(5),
        probe_size: 44,
        probe_count: 5,
        answers,
        extensions: &NO_EXTENSIONS,
    }
}

fn lines(flow: &Flow) -> String {
    let start = Instant::now();
    let answers = answers(flow, start);
    let line = completed(flow, start, &answers);
    output(&line, "vm", start + Duration::from_millis(9)).lines
}

/// The lines of [`lines`]'s trace at a fixed wall clock.
fn fixed_lines(flow: &Flow) -> String {
    let start = Instant::now();
    let clock = fixed_clock(start);
    let answers = answers(flow, start);
    let line = completed(flow, start, &answers);
    let stop = start + Duration::from_millis(9);
    trace_output(&line, &clock, &HostName::new("vm \"lab\""), stop).lines
}

/// Every byte of the simulated diamond's `tracelb` lines at a fixed clock, as
/// [`a_fixed_trace_prints_the_same_bytes`] does for `trace`.
#[test]
fn a_fixed_tracelb_prints_the_same_bytes() {
    for (probe, v4, name) in [(Probe::Udp, true, "udp4"), (Probe::Tcp, false, "tcp6")] {
        let start = Instant::now();
        let (out, ..) = lab_tracelb_at(v4, probe, 3, &fixed_clock(start), start);
        same_as_fixture(&out.lines, &format!("tracelb-{name}"));
    }
}

/// Every byte of one trace per family and transport at a fixed clock, against files the writer
/// wrote once its keys, order and units were checked against scamper's (the tests above): a
/// change to the writer shows here byte by byte. `HOPTRACE_BLESS=1` rewrites the files.
#[test]
fn a_fixed_trace_prints_the_same_bytes() {
    for (probe, v4, name) in [
        (Probe::Udp, true, "udp4"),
        (Probe::Icmp, true, "icmp4"),
        (Probe::Tcp, true, "tcp4"),
        (Probe::Udp, false, "udp6"),
        (Probe::Icmp, false, "icmp6"),
        (Probe::Tcp, false, "tcp6"),
    ] {
        same_as_fixture(&fixed_lines(&flow(probe, v4)), &format!("trace-{name}"));
    }
}

/// A wall clock fixed at 2023-11-14 22:13:20.123456 UTC for the instant `start`.
fn fixed_clock(start: Instant) -> Clock {
    Clock {
        wall: std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
        mono: start,
    }
}

/// Compares `text` with `tests/fixtures/engine/NAME.jsonl` (`HOPTRACE_BLESS=1` rewrites it).
fn same_as_fixture(text: &str, name: &str) {
    let path = format!(
        "{}/tests/fixtures/engine/{name}.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    if std::env::var_os("HOPTRACE_BLESS").is_some() {
        std::fs::write(&path, text).expect("bless");
    }
    let expected = std::fs::read_to_string(&path).expect("fixture");
    assert_eq!(text, expected, "{name}");
}

/// Every key path in a JSON value, in document order (arrays contribute their first element,
/// hops of different shapes their union in order).
fn key_order(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = format!("{prefix}.{k}");
                if !out.contains(&path) {
                    out.push(path.clone());
                }
                key_order(v, &path, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                key_order(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// The keys of each line of `text`, in order (serde_json keeps a map sorted, so the order
/// is compared on the raw text instead, below).
fn keys(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| {
            let mut out = Vec::new();
            key_order(&serde_json::from_str(l).expect("json"), "", &mut out);
            out
        })
        .collect()
}

/// The keys as they appear in the raw text, in order: `"name":`.
fn raw_key_sequence(text: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(end) = rest.find("\":") {
        let start = rest[..end].rfind('"').map_or(0, |i| i + 1);
        keys.push(rest[start..end].to_owned());
        rest = &rest[end + 2..];
    }
    keys
}

#[test]
fn same_keys_in_the_same_order_as_scamper() {
    for (probe, v4, fixture) in [
        (Probe::Icmp, true, fixture!("trace-icmp-paris.json")),
        (Probe::Icmp, false, fixture!("trace6-icmp-paris.json")),
        (Probe::Tcp, true, fixture!("trace-tcp.json")),
        (Probe::Tcp, false, fixture!("trace6-tcp.json")),
    ] {
        let ours = lines(&flow(probe, v4));
        assert_eq!(keys(&ours), keys(fixture), "{probe:?} v4={v4}:\n{ours}");
        assert_eq!(
            raw_key_sequence(&ours),
            raw_key_sequence(fixture),
            "{probe:?} v4={v4}:\n{ours}"
        );
        // Separators too: scamper writes `", "` between keys except right after "type".
        let trace_line = ours.lines().nth(1).expect("trace line");
        assert!(trace_line.starts_with(r#"{"type":"trace","version":"0.1", "userid":0, "#));
    }
}

#[test]
fn lines_read_back_to_the_hops_written() {
    for probe in [Probe::Udp, Probe::Icmp, Probe::Tcp] {
        for v4 in [true, false] {
            let flow = flow(probe, v4);
            let text = lines(&flow);
            assert_eq!(text.lines().count(), 3);
            assert!(text.ends_with('\n'));
            let summary = scamper_json::summarize(text.as_bytes()).expect("summarize");
            assert!(summary.start_time > 0);
            assert_eq!(summary.hops.len(), 5, "{text}");
            let last = &summary.hops[4];
            assert_eq!(last.addr, flow.dst);
            assert_eq!(last.ttl, 5);
            let expected = match probe {
                Probe::Icmp => ReplyKind::EchoReply,
                Probe::Udp => ReplyKind::Unreachable,
                Probe::Tcp => ReplyKind::Tcp,
            };
            assert_eq!(last.kind, expected, "{text}");
            assert!(
                summary.hops[..4]
                    .iter()
                    .all(|h| h.kind == ReplyKind::TimeExceeded)
            );
            assert_eq!(summary.hops[0].rtts_ms, [0.041]);
        }
    }
}

#[test]
fn icmp_extensions_print_as_scamper_prints_them_and_read_back() {
    use crate::engine::icmpext::tests::structure;
    let flow = flow(Probe::Udp, true);
    let start = Instant::now();
    let answers = answers(&flow, start);
    // TTL 2 came with a label stack (label 16, then 0xABCDE with exp 5 at the bottom) and an
    // interface object; TTL 3 with only an unreadable object, which prints nothing.
    let labels = [0x00, 0x01, 0x00, 0x01, 0xAB, 0xCD, 0xEB, 0xFE];
    let mut extensions = Extensions::new();
    extensions.add(
        answers[1].reply.id,
        &structure(&[(1, 1, &labels), (2, 0x0C, &[0; 8])]),
    );
    extensions.add(answers[2].reply.id, &structure(&[(3, 1, &[1])]));
    let line = TraceLine {
        extensions: &extensions,
        ..completed(&flow, start, &answers)
    };
    let text = output(&line, "vm", start + Duration::from_millis(9)).lines;
    let hops: Vec<&str> = text.split(r#"{"addr":"#).skip(1).collect();
    assert_eq!(hops.len(), 5, "{text}");
    assert!(
        hops[1].ends_with(
            r#", "icmpext":[{"ie_cn":1,"ie_ct":1,"ie_dl":8,"mpls_labels":[{"mpls_ttl":1,"mpls_s":0,"mpls_exp":0,"mpls_label":16},{"mpls_ttl":254,"mpls_s":1,"mpls_exp":5,"mpls_label":703710}]},{"ie_cn":2,"ie_ct":12,"ie_dl":8}]},"#
        ),
        "{}",
        hops[1]
    );
    assert!(!hops[2].contains("icmpext"), "{}", hops[2]);
    assert_eq!(text.matches("icmpext").count(), 1);
    // The summary has the labels, as reading the lines back gives them.
    let summary = scamper_json::summarize(text.as_bytes()).expect("summarize");
    let labels: Vec<(u32, bool)> = (summary.hops[1].mpls_labels.iter())
        .map(|l| (l.label, l.bottom))
        .collect();
    assert_eq!(labels, [(16, false), (0xABCDE, true)]);
    assert!(summary.hops[2].mpls_labels.is_empty());
    // Valid JSON whose hops read back as without extensions.
    let trace: Value =
        serde_json::from_str(text.lines().nth(1).expect("trace line")).expect("json");
    assert_eq!(
        trace["hops"][1]["icmpext"][0]["mpls_labels"][1]["mpls_label"],
        0xABCDE
    );
}

#[test]
fn an_unanswered_trace_has_no_hops_key_and_a_quoted_hostname() {
    let flow = flow(Probe::Udp, true);
    let start = Instant::now();
    let line = TraceLine {
        flow: &flow,
        icmp_sum: 0,
        stop: StopReason::GapLimit,
        start,
        hop_count: 5,
        attempts: 2,
        wait: Duration::from_millis(1500),
        probe_size: 36,
        probe_count: 10,
        answers: &[],
        extensions: &NO_EXTENSIONS,
    };
    let text = output(&line, "a \"quoted\" host", start).lines;
    assert!(!text.contains("\"hops\""), "{text}");
    assert!(text.contains(r#""hostname":"a \"quoted\" host""#), "{text}");
    assert!(text.contains(r#""wait":2,"#), "wait rounds up: {text}");
    assert!(text.contains(r#""stop_reason":"GAPLIMIT""#));
    let summary = scamper_json::summarize(text.as_bytes()).expect("summarize");
    assert!(summary.hops.is_empty());
}

/// A multipath trace over the lab's diamond (r1, r2, r3a | r3b, r4 by the in-interface, the
/// destination), answered with the ICMP types and header fields the lab's routers send.
fn lab_tracelb(v4: bool, probe: Probe, salt: u32) -> (TraceOutput, MdaTrace, Flow) {
    let start = Instant::now();
    lab_tracelb_at(v4, probe, salt, &Clock::now(), start)
}

/// [`lab_tracelb`] with the trace's simulated time from `start`, written with `clock`.
fn lab_tracelb_at(
    v4: bool,
    probe: Probe,
    salt: u32,
    clock: &Clock,
    start: Instant,
) -> (TraceOutput, MdaTrace, Flow) {
    let flow = flow(probe, v4);
    let node = |n: u8| -> IpAddr {
        if v4 {
            format!("10.77.{n}.2").parse().expect("addr")
        } else {
            format!("fd77:{n}::2").parse().expect("addr")
        }
    };
    let respond = |f: FlowIx, id: ProbeId| {
        let a = crate::engine::mda::tests::branch(f, salt, 2) == 0;
        let from = match (id.ttl, a) {
            (1, _) => node(1),
            (2, _) => node(2),
            (3, true) => node(3),
            (3, false) => node(4),
            (4, true) => node(5),
            (4, false) => node(6),
            _ => flow.dst,
        };
        let at_dst = from == flow.dst;
        let (kind, icmp) = match (at_dst, v4) {
            (false, true) => (Kind::TimeExceeded, (11, 0)),
            (false, false) => (Kind::TimeExceeded, (3, 0)),
            (true, true) => (Kind::Unreachable { code: 3 }, (3, 3)),
            (true, false) => (Kind::Unreachable { code: 4 }, (1, 4)),
        };
        Some(Reply {
            from,
            kind,
            flow_dst: flow.dst,
            sport: 40000 + f,
            dport: flow.dport,
            probe,
            id,
            reply_ttl: 65 - id.ttl,
            quoted_ttl: Some(1),
            packet: ReplyPacket {
                size: 56,
                tos: 0,
                ipid: if v4 { 4242 } else { 0 },
                icmp: Some(icmp),
                tcp_flags: None,
                quoted_len: 36,
                quoted_tos: 0,
            },
        })
    };
    let mut trace = MdaTrace::new(MdaConfig {
        confidence: Confidence::P95,
        max_ttl: 30,
        attempts: 2,
        wait: Duration::from_secs(1),
        gap_limit: 3,
        max_probes: 3000,
    });
    let (_, took) = crate::engine::mda::tests::run_from(&mut trace, start, respond);
    let flow_ids: Vec<u16> = (0..trace.flows()).map(|f| 40000 + f).collect();
    let line = TracelbLine {
        flow: &flow,
        flow_ids: &flow_ids,
        start,
        probe_size: if v4 { 44 } else { 60 },
        gap_limit: 3,
    };
    let out = tracelb_output(&line, &trace, clock, &HostName::new("vm"), start + took)
        .expect("our tracelb line reads back");
    (out, trace, flow)
}

/// Key names in the order they first appear in the raw text.
fn first_appearances(text: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for key in raw_key_sequence(text) {
        if !seen.contains(&key) {
            seen.push(key);
        }
    }
    seen
}

#[test]
fn tracelb_has_scampers_keys_in_scampers_order() {
    for (v4, fixture) in [
        (true, fixture!("tracelb-udp-dport.json")),
        (false, fixture!("tracelb6-udp-dport.json")),
    ] {
        let (out, _, _) = lab_tracelb(v4, Probe::Udp, 1);
        assert_eq!(keys(&out.lines), keys(fixture), "v4={v4}:\n{}", out.lines);
        assert_eq!(
            first_appearances(&out.lines),
            first_appearances(fixture),
            "v4={v4}:\n{}",
            out.lines
        );
        let line = out.lines.lines().nth(1).expect("tracelb line");
        assert!(
            line.starts_with(
                r#"{"type":"tracelb", "version":"0.1", "userid":0, "method":"udp-sport", "src":"#
            ),
            "{line}"
        );
    }
}

#[test]
fn tracelb_reads_back_to_the_links_found() {
    for v4 in [true, false] {
        for probe in [Probe::Udp, Probe::Icmp] {
            let (out, trace, flow) = lab_tracelb(v4, probe, 2);
            let written: std::collections::BTreeSet<(Option<IpAddr>, Option<IpAddr>)> =
                out.summary.links.iter().map(|l| (l.from, l.to)).collect();
            let found: std::collections::BTreeSet<_> =
                trace.links().iter().map(|l| (Some(l.from), l.to)).collect();
            assert_eq!(written, found, "{}", out.lines);
            assert_eq!(out.summary.kind, crate::TraceKind::Multipath);
            assert_eq!(out.summary.dst, flow.dst);
            // Every router and the destination, at its TTL.
            let mut hops: Vec<(u8, IpAddr)> =
                out.summary.hops.iter().map(|h| (h.ttl, h.addr)).collect();
            hops.sort();
            hops.dedup();
            assert_eq!(hops.len(), 7, "{hops:?}");
            assert!(hops.contains(&(5, flow.dst)));
            let v: Value =
                serde_json::from_str(out.lines.lines().nth(1).expect("line")).expect("json");
            assert_eq!(v["probec"], trace.probes_sent());
            assert_eq!(v["nodec"], 7);
            assert_eq!(v["linkc"], 7);
            assert_eq!(v.get("sport").is_some(), probe != Probe::Icmp);
        }
    }
}

#[test]
fn a_branch_lost_to_the_gap_limit_is_written_as_stars() {
    let flow = flow(Probe::Udp, true);
    let r = |n: u8| -> IpAddr { format!("10.77.{n}.2").parse().expect("addr") };
    let mut trace = MdaTrace::new(MdaConfig {
        confidence: Confidence::P95,
        max_ttl: 30,
        attempts: 1,
        wait: Duration::from_secs(1),
        gap_limit: 2,
        max_probes: 3000,
    });
    crate::engine::mda::tests::run(&mut trace, |_, id| {
        (id.ttl == 1).then(|| Reply {
            from: r(1),
            kind: Kind::TimeExceeded,
            flow_dst: flow.dst,
            sport: flow.sport,
            dport: flow.dport,
            probe: Probe::Udp,
            id,
            reply_ttl: 64,
            quoted_ttl: Some(1),
            packet: ReplyPacket::default(),
        })
    });
    let line = TracelbLine {
        flow: &flow,
        flow_ids: &[40000; 8],
        start: Instant::now(),
        probe_size: 44,
        gap_limit: 2,
    };
    let out = tracelb_output(
        &line,
        &trace,
        &Clock::now(),
        &HostName::new("vm"),
        Instant::now(),
    )
    .expect("read back");
    assert!(
        out.lines.contains(
            r#"{"addr":"10.77.1.2", "q_ttl":1, "linkc":1, "links":[[{"addr":"*"}],[{"addr":"*"}]]}"#
        ),
        "{}",
        out.lines
    );
}

#[test]
fn rtts_print_as_scamper_and_read_back_to_the_same_number() {
    use super::Rtt;
    use super::text::Append;
    let printed = |rtt: Rtt| String::new().millis(rtt.micros).clone();
    for (micros, text) in [
        (0, "0.000"),
        (41, "0.041"),
        (1_000, "1.000"),
        (1_234_567, "1234.567"),
    ] {
        let rtt = Rtt { micros };
        assert_eq!(printed(rtt), text);
    }
    for micros in (0..200_000u64).step_by(7) {
        let rtt = Rtt { micros };
        assert_eq!(printed(rtt).parse::<f64>().ok(), Some(rtt.ms()), "{micros}");
    }
    // Rounded to the nearest microsecond, as scamper's timevals are.
    let start = Instant::now();
    let flow = flow(Probe::Udp, true);
    let mut answer = answers(&flow, start)[0];
    answer.rx = answer.tx + Duration::from_nanos(40_500);
    assert_eq!(Rtt::of(&answer).micros, 41);
    answer.rx = answer.tx + Duration::from_nanos(40_499);
    assert_eq!(Rtt::of(&answer).micros, 40);
}
