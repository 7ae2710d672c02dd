//! The engine's lines against scamper's own output for the same methods: same keys in the same
//! order, same separators, and the same summary when read back.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Clock, TraceLine, trace_output};
use crate::TraceOutput;
use crate::engine::paris::{Answer, StopReason};
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
            let quoted = matches!(kind, Kind::TimeExceeded | Kind::Unreachable { .. });
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
    }
}

/// The output for `line`, after checking its summary is what reading its lines back gives.
fn output(line: &TraceLine<'_>, hostname: &str, stop: Instant) -> TraceOutput {
    let out = trace_output(line, &Clock::now(), hostname, stop);
    let read_back = scamper_json::summarize(out.lines.as_bytes()).expect("summarize");
    assert_eq!(out.summary, read_back, "{}", out.lines);
    out
}

fn lines(flow: &Flow) -> String {
    let start = Instant::now();
    let answers = answers(flow, start);
    let line = TraceLine {
        flow,
        icmp_sum: 48683,
        stop: StopReason::Completed,
        start,
        hop_count: 5,
        attempts: 2,
        wait: Duration::from_secs(5),
        probe_size: 44,
        probe_count: 5,
        answers: &answers,
    };
    output(&line, "vm", start + Duration::from_millis(9)).lines
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
    };
    let text = output(&line, "a \"quoted\" host", start).lines;
    assert!(!text.contains("\"hops\""), "{text}");
    assert!(text.contains(r#""hostname":"a \"quoted\" host""#), "{text}");
    assert!(text.contains(r#""wait":2,"#), "wait rounds up: {text}");
    assert!(text.contains(r#""stop_reason":"GAPLIMIT""#));
    let summary = scamper_json::summarize(text.as_bytes()).expect("summarize");
    assert!(summary.hops.is_empty());
}
