//! A multipath trace written as scamper 20211212 writes `tracelb` (see `scamper_tracelb_json.c`
//! and the fixtures): a header with the trace's parameters and counts, then every node that has
//! outgoing links with, per link, the probes that crossed it and their replies.
//!
//! The summary is read back from the line with [`crate::scamper_json::summarize`] (multipath
//! results are small, and that is exactly what a consumer of scamper's files gets).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Instant;

use super::text::Append;
use super::{Clock, HostName, Rtt, cycle_lines};
use crate::engine::Flow;
use crate::engine::mda::{FlowIx, Link, MdaTrace};
use crate::engine::paris::Answer;
use crate::{Probe, ScamperJsonError, TraceOutput};

/// Everything a `tracelb` line says besides what the [`MdaTrace`] holds.
#[derive(Debug)]
pub struct TracelbLine<'a> {
    /// The first flow (its source port is the line's `sport`).
    pub flow: &'a Flow,
    /// The source port (echo identifier for ICMP) of each flow, by flow number: the `flowid`.
    pub flow_ids: &'a [u16],
    /// When it started.
    pub start: Instant,
    /// One probe's IP length, header included.
    pub probe_size: u16,
    /// Consecutive silent hops that ended a branch (`gaplimit`).
    pub gap_limit: u8,
}

/// scamper's `method` for a multipath flow.
fn method(probe: Probe) -> &'static str {
    match probe {
        Probe::Udp => "udp-sport",
        Probe::Icmp => "icmp-echo",
        Probe::Tcp => "tcp-sport",
    }
}

/// The three lines of a finished multipath trace and their summary.
pub fn tracelb_output(
    line: &TracelbLine<'_>,
    trace: &MdaTrace,
    clock: &Clock,
    hostname: &HostName,
    stop: Instant,
) -> Result<TraceOutput, ScamperJsonError> {
    let capacity = 1024 + 340 * usize::try_from(trace.probes_sent()).unwrap_or(0);
    let text = cycle_lines(clock, hostname, line.start, stop, capacity, |out, start| {
        write_tracelb(out, line, trace, clock, start);
    });
    TraceOutput::from_lines(text.into_bytes())
}

fn write_tracelb(
    out: &mut String,
    line: &TracelbLine<'_>,
    trace: &MdaTrace,
    clock: &Clock,
    (sec, usec): (u64, u32),
) {
    let flow = line.flow;
    let config = trace.config();
    let _ = write!(
        out,
        r#"{{"type":"tracelb", "version":"0.1", "userid":0, "method":"{}", "src":"{}", "dst":"{}""#,
        method(flow.probe),
        flow.src,
        flow.dst
    );
    if flow.probe != Probe::Icmp {
        let _ = write!(out, r#", "sport":{}, "dport":{}"#, flow.sport, flow.dport);
    }
    let ftime = crate::civil::ftime(i64::try_from(sec).unwrap_or(i64::MAX));
    // Nodes in the order found; each with the first answer it gave (for `q_ttl`).
    let mut nodes: Vec<(IpAddr, &Answer)> = Vec::new();
    for (_, answer) in trace.answers() {
        if !nodes.iter().any(|(a, _)| *a == answer.reply.from) {
            nodes.push((answer.reply.from, answer));
        }
    }
    let links = trace.links();
    let _ = write!(
        out,
        r#", "start":{{"sec":{sec}, "usec":{usec}, "ftime":"{ftime}"}}, "probe_size":{}, "firsthop":1, "attempts":{}, "confidence":{}, "tos":0, "gaplimit":{}, "wait_timeout":{}, "wait_probe":0, "probec":{}, "probec_max":{}, "nodec":{}, "linkc":{}"#,
        line.probe_size,
        config.attempts,
        config.confidence.percent(),
        line.gap_limit,
        config.wait.as_secs() + u64::from(config.wait.subsec_nanos() > 0),
        trace.probes_sent(),
        config.max_probes,
        nodes.len(),
        links.len(),
    );
    let mut first = true;
    for (addr, answer) in &nodes {
        let from: Vec<&Link> = links.iter().filter(|l| l.from == *addr).collect();
        if from.is_empty() {
            continue;
        }
        out.push_str(if first { r#", "nodes":["# } else { "," });
        first = false;
        let _ = write!(out, r#"{{"addr":"{addr}""#);
        if let Some(q_ttl) = answer.reply.quoted_ttl {
            let _ = write!(out, r#", "q_ttl":{q_ttl}"#);
        }
        let _ = write!(out, r#", "linkc":{}, "links":["#, from.len());
        if let [link] = from.as_slice() {
            write_chain(out, link, line, trace, clock);
        } else {
            out.push('[');
            for (i, link) in from.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_far_end(out, link, line, trace, clock);
            }
            out.push(']');
        }
        out.push_str("]}");
    }
    if !first {
        out.push(']');
    }
    out.push('}');
}

/// A node's only link: one list per hop along it, `*` for the silent ones.
fn write_chain(
    out: &mut String,
    link: &Link,
    line: &TracelbLine<'_>,
    trace: &MdaTrace,
    clock: &Clock,
) {
    // A link to nowhere counts its last silent hop as its end.
    let stars = usize::from(link.silent) - usize::from(link.to.is_none() && link.silent > 0);
    for i in 0..stars {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"[{"addr":"*"}]"#);
    }
    if stars > 0 {
        out.push(',');
    }
    out.push('[');
    write_far_end(out, link, line, trace, clock);
    out.push(']');
}

/// The far end of a link with the probes that crossed it, or `*`.
fn write_far_end(
    out: &mut String,
    link: &Link,
    line: &TracelbLine<'_>,
    trace: &MdaTrace,
    clock: &Clock,
) {
    let Some(to) = link.to else {
        out.push_str(r#"{"addr":"*"}"#);
        return;
    };
    let _ = write!(out, r#"{{"addr":"{to}", "probes":["#);
    let mut first = true;
    for &(ttl, flow) in &link.probes {
        let Some(answer) = trace.answer(ttl, flow) else {
            continue;
        };
        if !first {
            out.push(',');
        }
        first = false;
        write_probe(out, answer, flow_id(line, flow), clock);
    }
    out.push_str("]}");
}

fn flow_id(line: &TracelbLine<'_>, flow: FlowIx) -> u16 {
    line.flow_ids.get(usize::from(flow)).copied().unwrap_or(0)
}

/// One answered probe and its reply, with scamper's `tracelb` keys.
fn write_probe(out: &mut String, answer: &Answer, flow_id: u16, clock: &Clock) {
    let reply = &answer.reply;
    let (tx_sec, tx_usec) = clock.wall(answer.tx);
    let (rx_sec, rx_usec) = clock.wall(answer.rx);
    let rtt = Rtt::of(answer);
    out.raw(r#"{"tx":{"sec":"#)
        .num(tx_sec)
        .field("usec", tx_usec)
        .raw(r#"}, "replyc":1"#)
        .field("ttl", reply.id.ttl)
        .field("attempt", reply.id.attempt)
        .field("flowid", flow_id)
        .raw(r#", "replies":[{"rx":{"sec":"#)
        .num(rx_sec)
        .field("usec", rx_usec)
        .raw("}")
        .field("ttl", reply.reply_ttl)
        .raw(r#", "rtt":"#)
        .millis(rtt.micros);
    let packet = &reply.packet;
    if reply.from.is_ipv4() {
        out.field("ipid", packet.ipid);
    }
    match (packet.tcp_flags, packet.icmp) {
        (Some(flags), _) => {
            out.field("tcp_flags", flags);
        }
        (None, icmp) => {
            let (icmp_type, icmp_code) = icmp.unwrap_or_default();
            out.field("icmp_type", icmp_type)
                .field("icmp_code", icmp_code)
                .field("icmp_q_tos", packet.quoted_tos);
            if reply.kind.is_icmp_error() {
                out.field("icmp_q_ttl", reply.quoted_ttl.unwrap_or(0));
            }
        }
    }
    out.push_str("}]}");
}
