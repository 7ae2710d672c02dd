//! Tests of reading scamper JSON: every fixture, every error, and inputs that must not panic.
use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/scamper-20211212/",
            $name
        ))
        .as_slice()
    };
}

const TRACE_ICMP: &[u8] = fixture!("trace-icmp-paris.json");
const TRACE_TCP: &[u8] = fixture!("trace-tcp.json");
const TRACE6_ICMP: &[u8] = fixture!("trace6-icmp-paris.json");
const TRACE6_TCP: &[u8] = fixture!("trace6-tcp.json");
const LB_ICMP: &[u8] = fixture!("tracelb-icmp-echo.json");
const LB_UDP: &[u8] = fixture!("tracelb-udp-dport.json");
const LB6_ICMP: &[u8] = fixture!("tracelb6-icmp-echo.json");
const LB6_BLACKHOLE: &[u8] = fixture!("tracelb6-udp-blackhole-r3b.json");
const LB6_UDP: &[u8] = fixture!("tracelb6-udp-dport.json");

const ALL: [(&str, &[u8]); 9] = [
    ("trace-icmp-paris", TRACE_ICMP),
    ("trace-tcp", TRACE_TCP),
    ("trace6-icmp-paris", TRACE6_ICMP),
    ("trace6-tcp", TRACE6_TCP),
    ("tracelb-icmp-echo", LB_ICMP),
    ("tracelb-udp-dport", LB_UDP),
    ("tracelb6-icmp-echo", LB6_ICMP),
    ("tracelb6-udp-blackhole-r3b", LB6_BLACKHOLE),
    ("tracelb6-udp-dport", LB6_UDP),
];

use ReplyKind::{EchoReply, Other, Tcp, TimeExceeded, Unreachable};

fn ip(text: &str) -> IpAddr {
    match text.parse() {
        Ok(a) => a,
        Err(e) => panic!("bad test address {text}: {e}"),
    }
}

fn ok(input: &[u8]) -> TraceSummary {
    match summarize(input) {
        Ok(s) => s,
        Err(e) => panic!("summarize failed: {e}"),
    }
}

fn err(input: &[u8]) -> ScamperJsonError {
    match summarize(input) {
        Ok(s) => panic!("expected an error, got {s:?}"),
        Err(e) => e,
    }
}

/// (ttl, addr, kind, number of RTTs) for every hop, in order.
fn hop_shape(s: &TraceSummary) -> Vec<(u8, IpAddr, ReplyKind, usize)> {
    s.hops
        .iter()
        .map(|h| (h.ttl, h.addr, h.kind, h.rtts_ms.len()))
        .collect()
}

fn expect_hops(s: &TraceSummary, want: &[(u8, &str, ReplyKind, usize)]) {
    let want: Vec<_> = want.iter().map(|&(t, a, k, n)| (t, ip(a), k, n)).collect();
    assert_eq!(hop_shape(s), want);
}

fn expect_links(s: &TraceSummary, want: &[(&str, &str)]) {
    let addr = |t: &str| if t == "*" { None } else { Some(ip(t)) };
    let want: Vec<Link> = want
        .iter()
        .map(|&(f, t)| Link {
            from: addr(f),
            to: addr(t),
        })
        .collect();
    assert_eq!(s.links, want);
}

fn replace(input: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(input);
    assert!(text.contains(from), "{from:?} not in input");
    text.replacen(from, to, 1).into_bytes()
}

/// The TTL at which each lab address sits (see the fixtures' README): r4 answers from its
/// interface towards whichever r3 the probe came through.
fn lab_ttl(addr: IpAddr) -> Option<u8> {
    let table = [
        ("10.77.1.2", 1),
        ("10.77.2.2", 2),
        ("10.77.3.2", 3),
        ("10.77.4.2", 3),
        ("10.77.5.2", 4),
        ("10.77.6.2", 4),
        ("10.77.100.5", 5),
        ("fd77:1::2", 1),
        ("fd77:2::2", 2),
        ("fd77:3::2", 3),
        ("fd77:4::2", 3),
        ("fd77:5::2", 4),
        ("fd77:6::2", 4),
        ("fd77:100::5", 5),
    ];
    table.iter().find(|(a, _)| ip(a) == addr).map(|&(_, t)| t)
}

#[test]
fn every_fixture_agrees_with_the_lab() {
    for (name, bytes) in ALL {
        let s = ok(bytes);
        assert!(!s.hops.is_empty(), "{name}: no hops");
        for hop in &s.hops {
            assert_eq!(lab_ttl(hop.addr), Some(hop.ttl), "{name}: {hop:?}");
            for rtt in &hop.rtts_ms {
                assert!(
                    rtt.is_finite() && *rtt > 0.0,
                    "{name}: rtt {rtt} in {hop:?}"
                );
            }
            // Only a derived first hop may lack RTTs.
            assert!(
                !hop.rtts_ms.is_empty() || (hop.ttl == 1 && s.kind == TraceKind::Multipath),
                "{name}: {hop:?}"
            );
        }
        // Sorted by TTL, one entry per (ttl, addr).
        assert!(s.hops.windows(2).all(|w| w[0].ttl <= w[1].ttl), "{name}");
        let keys: HashSet<_> = s.hops.iter().map(|h| (h.ttl, h.addr)).collect();
        assert_eq!(keys.len(), s.hops.len(), "{name}");
        assert_eq!(s.src.map(|a| a.is_ipv6()), Some(s.dst.is_ipv6()), "{name}");
        let last = s.hops.last().map(|h| h.addr);
        if name.contains("blackhole") {
            assert_eq!(last, Some(ip("fd77:100::5")), "{name}");
        } else {
            assert!(
                last == Some(ip("10.77.100.5")) || last == Some(ip("fd77:100::5")),
                "{name}"
            );
        }
        let links: HashSet<_> = s.links.iter().collect();
        assert_eq!(links.len(), s.links.len(), "{name}: duplicate links");
    }
}

#[test]
fn trace_icmp_paris() {
    let s = ok(TRACE_ICMP);
    assert_eq!(s.kind, TraceKind::SinglePath);
    assert_eq!(s.method, "icmp-echo-paris");
    assert_eq!(s.src, Some(ip("10.77.1.1")));
    assert_eq!(s.dst, ip("10.77.100.5"));
    assert_eq!(s.start_time, 1_795_314_448);
    assert_eq!(s.stop_reason.as_deref(), Some("COMPLETED"));
    expect_hops(
        &s,
        &[
            (1, "10.77.1.2", TimeExceeded, 1),
            (2, "10.77.2.2", TimeExceeded, 1),
            (3, "10.77.3.2", TimeExceeded, 1),
            (4, "10.77.5.2", TimeExceeded, 1),
            (5, "10.77.100.5", EchoReply, 1),
        ],
    );
    let rtts: Vec<f64> = s.hops.iter().flat_map(|h| h.rtts_ms.clone()).collect();
    assert_eq!(rtts, [0.029, 0.040, 0.040, 0.046, 0.036]);
    assert!(s.links.is_empty());
}

#[test]
fn mpls_labels_read_from_icmpext_and_bad_ones_are_refused() {
    let ttl2 = r#""icmp_q_ttl":1, "icmp_q_ipl":44, "icmp_q_tos":0},{"addr":"10.77.3.2""#;
    let with = |icmpext: &str| {
        let labelled = ttl2.replacen("}", &format!(", \"icmpext\":{icmpext}}}"), 1);
        replace(TRACE_ICMP, ttl2, &labelled)
    };
    // An interface object (skipped) and a two-entry stack, as scamper prints them.
    let s = ok(&with(
        r#"[{"ie_cn":2,"ie_ct":12,"ie_dl":8},{"ie_cn":1,"ie_ct":1,"ie_dl":8,"mpls_labels":[{"mpls_ttl":1,"mpls_s":0,"mpls_exp":0,"mpls_label":16},{"mpls_ttl":254,"mpls_s":1,"mpls_exp":5,"mpls_label":703710}]}]"#,
    ));
    let labelled: Vec<(u8, usize)> = (s.hops.iter())
        .map(|h| (h.ttl, h.mpls_labels.len()))
        .filter(|&(_, n)| n > 0)
        .collect();
    assert_eq!(labelled, [(2, 2)]);
    assert_eq!(
        s.hops[1].mpls_labels,
        crate::engine::icmpext::tests::TWO_LABELS
    );
    for bad in [
        r#"[{"ie_cn":1,"ie_ct":1,"ie_dl":4,"mpls_labels":[{"mpls_ttl":1,"mpls_s":1,"mpls_exp":0,"mpls_label":1048576}]}]"#,
        r#"[{"ie_cn":1,"ie_ct":1,"ie_dl":4,"mpls_labels":[{"mpls_ttl":1,"mpls_s":2,"mpls_exp":0,"mpls_label":16}]}]"#,
        r#"[{"ie_cn":1,"ie_ct":1,"ie_dl":4,"mpls_labels":[{"mpls_s":1,"mpls_exp":0,"mpls_label":16}]}]"#,
        r#"{"ie_cn":1}"#,
    ] {
        err(&with(bad));
    }
}

#[test]
fn trace_tcp() {
    let s = ok(TRACE_TCP);
    assert_eq!(s.kind, TraceKind::SinglePath);
    assert_eq!(s.method, "tcp");
    assert_eq!(s.start_time, 1_795_314_453);
    assert_eq!(s.stop_reason.as_deref(), Some("COMPLETED"));
    expect_hops(
        &s,
        &[
            (1, "10.77.1.2", TimeExceeded, 1),
            (2, "10.77.2.2", TimeExceeded, 1),
            (3, "10.77.4.2", TimeExceeded, 1),
            (4, "10.77.6.2", TimeExceeded, 1),
            (5, "10.77.100.5", Tcp, 1),
        ],
    );
    assert_eq!(s.hops[4].rtts_ms, [0.078]);
}

#[test]
fn trace6_icmp_paris() {
    let s = ok(TRACE6_ICMP);
    assert_eq!(s.method, "icmp-echo-paris");
    assert_eq!(s.src, Some(ip("fd77:1::1")));
    assert_eq!(s.dst, ip("fd77:100::5"));
    assert_eq!(s.start_time, 1_795_314_464);
    // IPv6 time exceeded is type 3, echo reply 129.
    expect_hops(
        &s,
        &[
            (1, "fd77:1::2", TimeExceeded, 1),
            (2, "fd77:2::2", TimeExceeded, 1),
            (3, "fd77:3::2", TimeExceeded, 1),
            (4, "fd77:5::2", TimeExceeded, 1),
            (5, "fd77:100::5", EchoReply, 1),
        ],
    );
}

#[test]
fn trace6_tcp() {
    let s = ok(TRACE6_TCP);
    assert_eq!(s.method, "tcp");
    assert_eq!(s.start_time, 1_795_314_954);
    expect_hops(
        &s,
        &[
            (1, "fd77:1::2", TimeExceeded, 1),
            (2, "fd77:2::2", TimeExceeded, 1),
            (3, "fd77:4::2", TimeExceeded, 1),
            (4, "fd77:6::2", TimeExceeded, 1),
            (5, "fd77:100::5", Tcp, 1),
        ],
    );
}

#[test]
fn tracelb_icmp_echo() {
    let s = ok(LB_ICMP);
    assert_eq!(s.kind, TraceKind::Multipath);
    assert_eq!(s.method, "icmp-echo");
    assert_eq!(s.src, Some(ip("10.77.1.1")));
    assert_eq!(s.dst, ip("10.77.100.5"));
    assert_eq!(s.start_time, 1_795_314_448);
    assert_eq!(s.stop_reason, None);
    expect_hops(
        &s,
        &[
            (1, "10.77.1.2", Other, 0),
            (2, "10.77.2.2", TimeExceeded, 6),
            (3, "10.77.3.2", TimeExceeded, 6),
            (4, "10.77.5.2", TimeExceeded, 6),
            (5, "10.77.100.5", EchoReply, 1),
        ],
    );
    assert_eq!(
        s.hops[1].rtts_ms,
        [0.050, 0.052, 0.053, 0.054, 0.054, 0.053]
    );
    assert_eq!(s.hops[4].rtts_ms, [0.074]);
    expect_links(
        &s,
        &[
            ("10.77.1.2", "10.77.2.2"),
            ("10.77.2.2", "10.77.3.2"),
            ("10.77.3.2", "10.77.5.2"),
            ("10.77.5.2", "10.77.100.5"),
        ],
    );
}

#[test]
fn tracelb_udp_dport_finds_both_branches() {
    let s = ok(LB_UDP);
    assert_eq!(s.method, "udp-dport");
    assert_eq!(s.start_time, 1_795_314_453);
    expect_hops(
        &s,
        &[
            (1, "10.77.1.2", Other, 0),
            (2, "10.77.2.2", TimeExceeded, 6),
            (3, "10.77.3.2", TimeExceeded, 9),
            (3, "10.77.4.2", TimeExceeded, 8),
            (4, "10.77.5.2", TimeExceeded, 6),
            (4, "10.77.6.2", TimeExceeded, 6),
            (5, "10.77.100.5", Unreachable, 2),
        ],
    );
    // Both branches' replies from the destination, in document order.
    assert_eq!(s.hops[6].rtts_ms, [0.177, 0.072]);
    expect_links(
        &s,
        &[
            ("10.77.1.2", "10.77.2.2"),
            ("10.77.2.2", "10.77.3.2"),
            ("10.77.2.2", "10.77.4.2"),
            ("10.77.3.2", "10.77.5.2"),
            ("10.77.4.2", "10.77.6.2"),
            ("10.77.6.2", "10.77.100.5"),
            ("10.77.5.2", "10.77.100.5"),
        ],
    );
}

#[test]
fn tracelb6_icmp_echo() {
    let s = ok(LB6_ICMP);
    assert_eq!(s.method, "icmp-echo");
    assert_eq!(s.dst, ip("fd77:100::5"));
    expect_hops(
        &s,
        &[
            (1, "fd77:1::2", Other, 0),
            (2, "fd77:2::2", TimeExceeded, 6),
            (3, "fd77:3::2", TimeExceeded, 6),
            (4, "fd77:5::2", TimeExceeded, 6),
            (5, "fd77:100::5", EchoReply, 1),
        ],
    );
    expect_links(
        &s,
        &[
            ("fd77:1::2", "fd77:2::2"),
            ("fd77:2::2", "fd77:3::2"),
            ("fd77:3::2", "fd77:5::2"),
            ("fd77:5::2", "fd77:100::5"),
        ],
    );
}

#[test]
fn tracelb6_udp_dport_finds_both_branches() {
    let s = ok(LB6_UDP);
    assert_eq!(s.start_time, 1_795_314_944);
    expect_hops(
        &s,
        &[
            (1, "fd77:1::2", Other, 0),
            (2, "fd77:2::2", TimeExceeded, 6),
            (3, "fd77:3::2", TimeExceeded, 14),
            (3, "fd77:4::2", TimeExceeded, 3),
            (4, "fd77:5::2", TimeExceeded, 6),
            (4, "fd77:6::2", TimeExceeded, 6),
            (5, "fd77:100::5", Unreachable, 2),
        ],
    );
    expect_links(
        &s,
        &[
            ("fd77:1::2", "fd77:2::2"),
            ("fd77:2::2", "fd77:3::2"),
            ("fd77:2::2", "fd77:4::2"),
            ("fd77:3::2", "fd77:5::2"),
            ("fd77:4::2", "fd77:6::2"),
            ("fd77:6::2", "fd77:100::5"),
            ("fd77:5::2", "fd77:100::5"),
        ],
    );
}

#[test]
fn tracelb6_blackhole_keeps_the_silent_chain() {
    let s = ok(LB6_BLACKHOLE);
    assert_eq!(s.method, "udp-dport");
    assert_eq!(s.start_time, 1_795_315_688);
    // r3b answers its own probes but forwards nothing: its link is two silent hops and no
    // far node (gaplimit 2), while r3a's branch reaches the destination.
    expect_hops(
        &s,
        &[
            (1, "fd77:1::2", Other, 0),
            (2, "fd77:2::2", TimeExceeded, 6),
            (3, "fd77:3::2", TimeExceeded, 12),
            (3, "fd77:4::2", TimeExceeded, 5),
            (4, "fd77:5::2", TimeExceeded, 6),
            (5, "fd77:100::5", Unreachable, 1),
        ],
    );
    expect_links(
        &s,
        &[
            ("fd77:1::2", "fd77:2::2"),
            ("fd77:2::2", "fd77:3::2"),
            ("fd77:2::2", "fd77:4::2"),
            ("fd77:3::2", "fd77:5::2"),
            ("fd77:4::2", "*"),
            ("*", "*"),
            ("fd77:5::2", "fd77:100::5"),
        ],
    );
}

// Synthetic lines for shapes the fixtures do not show.
const START: &str = r#"{"type":"cycle-start", "list_name":"default", "id":0, "hostname":"vm", "start_time":1700000000}"#;
const STOP: &str = r#"{"type":"cycle-stop", "list_name":"default", "id":0, "hostname":"vm", "stop_time":1700000001}"#;

fn three(trace: &str) -> Vec<u8> {
    format!("{START}\n{trace}\n{STOP}\n").into_bytes()
}

fn lb(nodes: &str) -> Vec<u8> {
    three(&format!(
        r#"{{"type":"tracelb", "method":"udp-dport", "src":"192.0.2.1", "dst":"198.51.100.9", "firsthop":2, "nodes":[{nodes}]}}"#
    ))
}

#[test]
fn tracelb_chain_through_silent_hop_derives_first_node_ttl() {
    // A at ttl 1 (probe ttl 3 at position 1), "*" at 2, B at 3: the probes say 1 even though
    // firsthop says 2.
    let s = ok(&lb(
        r#"{"addr":"192.0.2.10", "linkc":1, "links":[[{"addr":"*"}],[{"addr":"192.0.2.30", "probes":[{"ttl":3, "replies":[{"rtt":1.5, "icmp_type":11}]},{"ttl":3, "replyc":0}]}]]}"#,
    ));
    expect_hops(
        &s,
        &[
            (1, "192.0.2.10", Other, 0),
            (3, "192.0.2.30", TimeExceeded, 1),
        ],
    );
    expect_links(&s, &[("192.0.2.10", "*"), ("*", "192.0.2.30")]);
    assert_eq!(s.src, Some(ip("192.0.2.1")));
}

#[test]
fn tracelb_first_node_without_probes_falls_back_to_firsthop() {
    let s = ok(&lb(
        r#"{"addr":"192.0.2.10", "linkc":1, "links":[[{"addr":"*"}],[{"addr":"*"}]]}"#,
    ));
    expect_hops(&s, &[(2, "192.0.2.10", Other, 0)]);
    expect_links(&s, &[("192.0.2.10", "*"), ("*", "*")]);
}

#[test]
fn tracelb_tcp_reply_and_silent_node() {
    // A node printed as "*" links from None; a tcp_flags reply is Tcp.
    let s = ok(&lb(
        r#"{"addr":"*", "linkc":1, "links":[[{"addr":"198.51.100.9", "probes":[{"ttl":4, "replies":[{"rtt":2.0, "tcp_flags":20}]}]}]]}"#,
    ));
    expect_hops(&s, &[(4, "198.51.100.9", Tcp, 1)]);
    expect_links(&s, &[("*", "198.51.100.9")]);
}

#[test]
fn tracelb_without_nodes_and_trace_without_hops() {
    let s = ok(&three(
        r#"{"type":"tracelb", "method":"tcp-sport", "src":"fd77:1::1", "dst":"fd77:100::5", "probec":0, "nodec":0, "linkc":0}"#,
    ));
    assert!(s.hops.is_empty() && s.links.is_empty());
    let s = ok(&three(
        r#"{"type":"trace", "method":"udp-paris", "dst":"192.0.2.9", "stop_reason":"GAPLIMIT"}"#,
    ));
    assert!(s.hops.is_empty());
    assert_eq!(s.src, None);
    assert_eq!(s.stop_reason.as_deref(), Some("GAPLIMIT"));
}

#[test]
fn trace_groups_replies_by_ttl_and_addr_and_skips_silent_ttls() {
    let s = ok(&three(
        &r#"{"type":"trace", "method":"udp-paris", "dst":"192.0.2.9", "hops":[
            {"addr":"192.0.2.1", "probe_ttl":1, "rtt":1.0, "icmp_type":11, "icmp_code":0},
            {"addr":"192.0.2.1", "probe_ttl":1, "rtt":2.0, "icmp_type":11, "icmp_code":0},
            {"addr":"192.0.2.3", "probe_ttl":3, "rtt":3.0, "icmp_type":11, "icmp_code":0},
            {"addr":"192.0.2.4", "probe_ttl":3, "rtt":3.5, "icmp_type":12, "icmp_code":0},
            {"addr":"192.0.2.9", "probe_ttl":5, "rtt":5.0, "icmp_type":3, "icmp_code":3},
            {"addr":"192.0.2.9", "probe_ttl":4, "rtt":4.0}]}"#
            .replace('\n', ""),
    ));
    expect_hops(
        &s,
        &[
            (1, "192.0.2.1", TimeExceeded, 2),
            (3, "192.0.2.3", TimeExceeded, 1),
            (3, "192.0.2.4", Other, 1),
            (4, "192.0.2.9", Other, 1),
            (5, "192.0.2.9", Unreachable, 1),
        ],
    );
    assert_eq!(s.hops[0].rtts_ms, [1.0, 2.0]);
}

#[test]
fn rejects_wrong_line_counts() {
    let text = String::from_utf8_lossy(TRACE_ICMP).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let two = format!("{}\n{}\n", lines[0], lines[1]);
    assert!(matches!(
        err(two.as_bytes()),
        ScamperJsonError::LineCount(2)
    ));
    let four = format!("{text}{}\n", lines[2]);
    let e = err(four.as_bytes());
    assert_eq!(e.to_string(), "expected 3 lines, got 4");
    assert!(matches!(err(b""), ScamperJsonError::LineCount(0)));
    assert!(matches!(err(b"\n"), ScamperJsonError::LineCount(1)));
    let blank_end = format!("{text}\n");
    assert!(matches!(
        err(blank_end.as_bytes()),
        ScamperJsonError::LineCount(4)
    ));
}

#[test]
fn rejects_crlf_missing_newline_and_non_utf8() {
    let crlf = String::from_utf8_lossy(LB_ICMP).replace('\n', "\r\n");
    let e = err(crlf.as_bytes());
    assert!(matches!(e, ScamperJsonError::CarriageReturn));
    assert_eq!(e.to_string(), "carriage return in output");

    let e = err(&TRACE_TCP[..TRACE_TCP.len() - 1]);
    assert!(matches!(e, ScamperJsonError::MissingFinalNewline));
    assert_eq!(e.to_string(), "missing final newline");

    let mut bytes = TRACE6_TCP.to_vec();
    bytes[30] = 0xff;
    let e = err(&bytes);
    assert!(matches!(e, ScamperJsonError::NotUtf8));
    assert_eq!(e.to_string(), "output is not UTF-8");
}

#[test]
fn rejects_wrong_type_order() {
    let text = String::from_utf8_lossy(TRACE_ICMP).into_owned();
    let l: Vec<&str> = text.lines().collect();
    let swapped = format!("{}\n{}\n{}\n", l[2], l[1], l[0]);
    let e = err(swapped.as_bytes());
    assert_eq!(
        e.to_string(),
        "line 1 has type \"cycle-stop\", expected \"cycle-start\""
    );
    let trace_first = format!("{}\n{}\n{}\n", l[1], l[0], l[2]);
    assert!(matches!(
        err(trace_first.as_bytes()),
        ScamperJsonError::WrongType { line: 1, .. }
    ));
    let e = err(&three(r#"{"type":"ping", "dst":"192.0.2.1"}"#));
    assert_eq!(
        e.to_string(),
        "line 2 has type \"ping\", expected \"trace\" or \"tracelb\""
    );
    let no_stop = format!("{}\n{}\n{}\n", l[0], l[1], l[0]);
    assert!(matches!(
        err(no_stop.as_bytes()),
        ScamperJsonError::WrongType { line: 3, .. }
    ));
    let untyped = replace(TRACE_ICMP, r#""type":"trace""#, r#""type":7"#);
    assert_eq!(err(&untyped).to_string(), "line 2 has no \"type\" string");
}

#[test]
fn rejects_lines_that_are_not_json_objects() {
    let e = err(&three(r#"{"type":"trace", "dst":"#));
    assert!(
        matches!(e, ScamperJsonError::NotJson { line: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().starts_with("line 2 is not JSON: "), "{e}");
    let e = err(&three("[1, 2]"));
    assert_eq!(e.to_string(), "line 2 is not a JSON object");
    // Trailing bytes after the object are not JSON either.
    let trailing = replace(
        TRACE_ICMP,
        "\"stop_time\":1795314448}",
        "\"stop_time\":1795314448} x",
    );
    assert!(matches!(
        err(&trailing),
        ScamperJsonError::NotJson { line: 3, .. }
    ));
}

#[test]
fn rejects_bad_addresses() {
    let bad_hop = replace(
        TRACE_ICMP,
        "\"addr\":\"10.77.3.2\"",
        "\"addr\":\"10.77.3.256\"",
    );
    assert_eq!(
        err(&bad_hop).to_string(),
        "field hops[2].addr is not an IP address: \"10.77.3.256\""
    );
    let bad_dst = replace(
        LB6_ICMP,
        "\"dst\":\"fd77:100::5\"",
        "\"dst\":\"fd77:100::5::1\"",
    );
    assert!(
        matches!(err(&bad_dst), ScamperJsonError::BadAddress { ref field, .. } if field == "dst")
    );
    let bad_lb = replace(LB_UDP, "\"addr\":\"10.77.4.2\"", "\"addr\":\"r3b\"");
    assert_eq!(
        err(&bad_lb).to_string(),
        "field nodes[1].links[0][1].addr is not an IP address: \"r3b\""
    );
    let bad_src = replace(TRACE6_TCP, "\"src\":\"fd77:1::1\"", "\"src\":\"\"");
    assert!(
        matches!(err(&bad_src), ScamperJsonError::BadAddress { ref field, .. } if field == "src")
    );
    // A trace reply always has an address: a "*" there is an error, not a silent hop.
    let star = replace(TRACE_ICMP, "\"addr\":\"10.77.2.2\"", "\"addr\":\"*\"");
    assert!(matches!(err(&star), ScamperJsonError::BadAddress { .. }));
}

#[test]
fn rejects_missing_and_mistyped_fields() {
    let no_dst = replace(TRACE_ICMP, "\"dst\":\"10.77.100.5\", ", "");
    assert_eq!(err(&no_dst).to_string(), "missing field dst");
    let no_addr = replace(TRACE_TCP, "\"addr\":\"10.77.1.2\", ", "");
    assert_eq!(err(&no_addr).to_string(), "missing field hops[0].addr");
    let no_start = replace(
        TRACE_TCP,
        "\"start_time\":1795314453",
        "\"start\":1795314453",
    );
    assert_eq!(err(&no_start).to_string(), "missing field start_time");
    let float_start = replace(
        TRACE_TCP,
        "\"start_time\":1795314453",
        "\"start_time\":1795314453.5",
    );
    assert_eq!(
        err(&float_start).to_string(),
        "field start_time is not an integer"
    );
    let string_ttl = replace(TRACE_TCP, "\"probe_ttl\":3", "\"probe_ttl\":\"3\"");
    assert_eq!(
        err(&string_ttl).to_string(),
        "field hops[2].probe_ttl is not an integer"
    );
    let no_method = replace(LB_ICMP, "\"method\":\"icmp-echo\"", "\"method\":null");
    assert_eq!(err(&no_method).to_string(), "field method is not a string");
    let no_rtt = replace(LB_ICMP, "\"rtt\":0.050", "\"rtt\":\"fast\"");
    assert_eq!(
        err(&no_rtt).to_string(),
        "field nodes[0].links[0][0].probes[0].replies[0].rtt is not a number"
    );
    let no_links = replace(LB_ICMP, "\"links\":", "\"linkz\":");
    assert_eq!(err(&no_links).to_string(), "missing field nodes[0].links");
    let nodes_obj = replace(LB_ICMP, "\"nodes\":[", "\"nodes\":{\"x\":[");
    let nodes_obj = replace(
        &nodes_obj,
        "]}\n{\"type\":\"cycle-stop\"",
        "]}}\n{\"type\":\"cycle-stop\"",
    );
    assert_eq!(err(&nodes_obj).to_string(), "field nodes is not an array");
}

#[test]
fn rejects_out_of_range_numbers() {
    let cases: [(&[u8], &str, &str, &str); 8] = [
        (
            TRACE_ICMP,
            "\"probe_ttl\":4",
            "\"probe_ttl\":256",
            "field hops[3].probe_ttl is out of range: 256",
        ),
        (
            TRACE_ICMP,
            "\"probe_ttl\":4",
            "\"probe_ttl\":-4",
            "field hops[3].probe_ttl is out of range: -4",
        ),
        (
            TRACE_ICMP,
            "\"probe_ttl\":1",
            "\"probe_ttl\":0",
            "field hops[0].probe_ttl is out of range: 0",
        ),
        (
            TRACE_ICMP,
            "\"rtt\":0.029",
            "\"rtt\":-0.029",
            "field hops[0].rtt is out of range: -0.029",
        ),
        (
            LB_ICMP,
            "\"ttl\":2",
            "\"ttl\":99999999999999999999",
            "field nodes[0].links[0][0].probes[0].ttl is not an integer",
        ),
        (
            LB_ICMP,
            "\"icmp_type\":11",
            "\"icmp_type\":300",
            "field nodes[0].links[0][0].probes[0].replies[0].icmp_type is out of range: 300",
        ),
        (
            TRACE_TCP,
            "\"tcp_flags\":20",
            "\"tcp_flags\":-1",
            "field hops[4].tcp_flags is out of range: -1",
        ),
        (
            TRACE_TCP,
            "\"start_time\":1795314453",
            "\"start_time\":9223372036854775808",
            "field start_time is out of range: 9223372036854775808",
        ),
    ];
    for (input, from, to, message) in cases {
        assert_eq!(err(&replace(input, from, to)).to_string(), message);
    }
    // Huge exponents are refused by the JSON parser itself.
    let huge = replace(TRACE_ICMP, "\"rtt\":0.029", "\"rtt\":1e999");
    assert!(matches!(
        err(&huge),
        ScamperJsonError::NotJson { line: 2, .. }
    ));
    // A negative start_time is a valid i64 and kept as is.
    let early = replace(TRACE_ICMP, "\"start_time\":1795314448", "\"start_time\":-5");
    assert_eq!(ok(&early).start_time, -5);
}

#[test]
fn rejects_links_that_disagree_with_linkc() {
    // linkc 2 but one next hop.
    let short = replace(LB_UDP, "\"linkc\":2", "\"linkc\":3");
    assert_eq!(
        err(&short).to_string(),
        "field nodes[1].links[0]: has 2 next hops but linkc is 3"
    );
    let e = err(&lb(
        r#"{"addr":"192.0.2.10", "linkc":2, "links":[[{"addr":"*"}],[{"addr":"*"}]]}"#,
    ));
    assert_eq!(
        e.to_string(),
        "field nodes[0].links: has 2 lists, expected 1 because linkc is 2"
    );
    let e = err(&lb(r#"{"addr":"192.0.2.10", "linkc":1, "links":[]}"#));
    assert!(matches!(e, ScamperJsonError::Shape { .. }), "{e}");
    let e = err(&lb(r#"{"addr":"192.0.2.10", "linkc":1, "links":[[]]}"#));
    assert!(matches!(e, ScamperJsonError::Shape { .. }), "{e}");
    let e = err(&lb(r#"{"addr":"192.0.2.10", "linkc":-1, "links":[]}"#));
    assert!(matches!(e, ScamperJsonError::OutOfRange { .. }), "{e}");
    let e = err(&lb(
        r#"{"addr":"192.0.2.10", "linkc":1, "links":[{"addr":"*"}]}"#,
    ));
    assert_eq!(e.to_string(), "field nodes[0].links[0] is not an array");
    let e = err(&lb(
        r#"{"addr":"192.0.2.10", "linkc":0, "links":[[{"addr":"*"}]]}"#,
    ));
    assert!(matches!(e, ScamperJsonError::Shape { .. }), "{e}");
    let ok_empty = ok(&lb(r#"{"addr":"192.0.2.10", "linkc":0, "links":[]}"#));
    // A lone node with nothing after it and no probes: placed at firsthop.
    expect_hops(&ok_empty, &[(2, "192.0.2.10", Other, 0)]);
}

use crate::test_rng::Rng;

#[test]
fn every_truncation_of_every_fixture_is_rejected_without_panic() {
    for (name, bytes) in ALL {
        for len in 0..bytes.len() {
            assert!(summarize(&bytes[..len]).is_err(), "{name} cut at {len}");
        }
        // And every suffix (a reader that lost the start of the output).
        for start in 1..bytes.len() {
            assert!(summarize(&bytes[start..]).is_err(), "{name} from {start}");
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    for seed in 1..=3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let len = rng.below(400);
        let bytes: Vec<u8> = (0..len).map(|_| (rng.next() >> 56) as u8).collect();
        let _ = summarize(&bytes);
    }
}

#[test]
fn random_json_like_text_never_panics() {
    const TOKENS: [&str; 28] = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\n",
        " ",
        "\"type\"",
        "\"cycle-start\"",
        "\"trace\"",
        "\"tracelb\"",
        "\"cycle-stop\"",
        "\"start_time\"",
        "\"dst\"",
        "\"addr\"",
        "\"*\"",
        "\"10.77.1.2\"",
        "\"fd77::1\"",
        "\"hops\"",
        "\"nodes\"",
        "\"links\"",
        "\"linkc\"",
        "\"probe_ttl\"",
        "-1",
        "1e999",
        "18446744073709551616",
        "null",
    ];
    for seed in 1..=3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
        let mut text = String::new();
        for _ in 0..rng.below(120) {
            text.push_str(TOKENS[rng.below(TOKENS.len())]);
        }
        let _ = summarize(text.as_bytes());
    }
}

#[test]
fn mutated_fixtures_never_panic() {
    // Splices that hit the checks: wrong types, signs, huge numbers, stars, empty containers.
    const SPLICES: [&str; 16] = [
        "-1",
        "0",
        "256",
        "1e999",
        "-0.5",
        "18446744073709551616",
        "null",
        "\"*\"",
        "[]",
        "{}",
        "[[]]",
        "\"x\"",
        "true",
        "\n",
        "\r",
        "\u{ff}",
    ];
    for (index, (name, bytes)) in ALL.iter().enumerate() {
        for seed in 1..=400u64 {
            let mut rng = Rng((seed << 8 | index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut mutated = bytes.to_vec();
            for _ in 0..=rng.below(3) {
                let at = rng.below(mutated.len());
                let cut = rng.below(8).min(mutated.len() - at);
                let splice = SPLICES[rng.below(SPLICES.len())].as_bytes();
                mutated.splice(at..at + cut, splice.iter().copied());
            }
            if let Ok(s) = summarize(&mutated) {
                // Whatever survives must still be a well-formed summary.
                assert!(
                    s.hops.windows(2).all(|w| w[0].ttl <= w[1].ttl),
                    "{name} seed {seed}"
                );
                assert!(s.hops.iter().all(|h| h.ttl >= 1), "{name} seed {seed}");
            }
        }
    }
}

/// Past the length it scans, the hop table indexes its hops: the same hops, in the same
/// order, with the same RTTs, and every address found, before and after the index is built.
#[test]
fn a_long_hop_table_groups_replies_as_a_short_one() {
    let addr = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
    let mut table = HopTable::default();
    // 300 (ttl, addr) pairs, each answering twice, the second round after the index exists.
    for round in 0..2u32 {
        for i in 0..300u32 {
            let ttl = u8::try_from(i % 30 + 1).expect("ttl");
            let order = usize::try_from(i).expect("order");
            table.reply(
                order,
                ttl,
                addr(i),
                f64::from(round),
                ReplyKind::TimeExceeded,
                &[],
            );
        }
    }
    assert!(table.index.is_some(), "indexed past {SCAN_HOPS} hops");
    assert!((0..300).all(|i| table.has_addr(addr(i))));
    assert!(!table.has_addr(addr(300)));
    let hops = table.finish();
    assert_eq!(hops.len(), 300);
    assert!(
        hops.iter().all(|h| h.rtts_ms == [0.0, 1.0]),
        "both replies on one hop"
    );
    let keys: Vec<(u8, IpAddr)> = hops.iter().map(|h| (h.ttl, h.addr)).collect();
    let mut sorted = keys.clone();
    sorted.sort_by_key(|&(ttl, a)| (ttl, a));
    assert_eq!(keys, sorted, "by TTL, then first appearance");
}

/// A chain position repeating one address (or "*") thousands of times is read in linear time,
/// as one element; more distinct addresses at one position than any hop has is refused.
#[test]
fn tracelb_chain_positions_are_bounded_work() {
    let stars = vec![r#"{"addr":"*"}"#; 8_000].join(",");
    let s = ok(&lb(&format!(
        r#"{{"addr":"192.0.2.10", "linkc":1, "links":[[{stars}],[{stars}]]}}"#
    )));
    expect_links(&s, &[("192.0.2.10", "*"), ("*", "*")]);
    let many: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"addr":"10.0.{}.{}"}}"#, i / 256, i % 256))
        .collect();
    let err = summarize(&lb(&format!(
        r#"{{"addr":"192.0.2.10", "linkc":1, "links":[[{}]]}}"#,
        many.join(",")
    )))
    .expect_err("too many addresses at one hop");
    assert!(err.to_string().contains("distinct addresses"), "{err}");
}
