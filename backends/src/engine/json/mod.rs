//! The engine's results written as scamper 20211212 writes them (`-O json`): the same keys, in
//! the same order, with the same units and separators, so a consumer of scamper's files (and
//! [`crate::scamper_json::summarize`]) reads them unchanged. The three lines are
//! `cycle-start`, the measurement and `cycle-stop`, with this host's name.
//!
//! Units as scamper: `rtt` in milliseconds with three decimals, `tx` and `start` as seconds and
//! microseconds, `wait` in seconds, `probe_id` counting attempts from 1.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::icmpext;
use super::paris::{Answer, Extensions, StopReason};
use super::{Flow, ReplyPacket};
use crate::scamper_json::HopTable;
use crate::{MplsLabel, Probe, TraceKind, TraceOutput, TraceSummary};

/// Maps the engine's monotonic instants to wall-clock time, from one reading of both clocks.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: SystemTime,
    mono: Instant,
}

impl Clock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// The wall-clock time of `at`, as (seconds, microseconds) since the Unix epoch.
    pub fn wall(&self, at: Instant) -> (u64, u32) {
        let wall = if at >= self.mono {
            self.wall + (at - self.mono)
        } else {
            self.wall - (self.mono - at)
        };
        let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        (since.as_secs(), since.subsec_micros())
    }
}

/// Everything a `trace` line says about one Paris trace.
#[derive(Debug)]
pub struct TraceLine<'a> {
    /// The flow probed.
    pub flow: &'a Flow,
    /// For ICMP echo flows: the echo checksum every probe carried (`icmp_sum`).
    pub icmp_sum: u16,
    /// Why it ended.
    pub stop: StopReason,
    /// When it started.
    pub start: Instant,
    /// `hop_count`.
    pub hop_count: u8,
    /// `attempts`.
    pub attempts: u8,
    /// `wait` (printed in whole seconds, rounded up).
    pub wait: Duration,
    /// One probe's IP length, header included.
    pub probe_size: u16,
    /// Probes sent.
    pub probe_count: usize,
    /// The answers, in the order to print.
    pub answers: &'a [Answer],
    /// The ICMP extensions some answers came with (`icmpext`).
    pub extensions: &'a Extensions,
}

/// scamper's `method` for a Paris flow.
fn method(probe: Probe) -> &'static str {
    match probe {
        Probe::Udp => "udp-paris",
        Probe::Icmp => "icmp-echo-paris",
        Probe::Tcp => "tcp",
    }
}

/// The output of a finished trace: the three lines (newline-terminated: `cycle-start`,
/// `trace`, `cycle-stop`, `stop` being when it ended) and their summary, built from the same
/// answers in the same pass rather than parsed back.
pub fn trace_output(
    line: &TraceLine<'_>,
    clock: &Clock,
    hostname: &HostName,
    stop: Instant,
) -> TraceOutput {
    let mut hops = HopTable::with_capacity(line.answers.len());
    let lines = trace_lines(line, clock, hostname, stop, &mut hops);
    let summary = TraceSummary {
        kind: TraceKind::SinglePath,
        method: method(line.flow.probe).to_owned(),
        src: Some(line.flow.src),
        dst: line.flow.dst,
        start_time: i64::try_from(clock.wall(line.start).0).unwrap_or(i64::MAX),
        stop_reason: Some(line.stop.name().to_owned()),
        hops: hops.finish(),
        links: Vec::new(),
    };
    TraceOutput::from_parts(lines, summary)
}

fn trace_lines(
    line: &TraceLine<'_>,
    clock: &Clock,
    hostname: &HostName,
    stop: Instant,
    hops: &mut HopTable,
) -> String {
    // About 420 bytes per hop: sized once, so the text is never copied to grow.
    let capacity = 640 + 420 * line.answers.len();
    cycle_lines(clock, hostname, line.start, stop, capacity, |out, start| {
        write_trace(out, line, clock, start, hops);
    })
}

/// This host's name as a JSON string literal, escaped once per engine (a host name can hold
/// anything the administrator typed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostName(String);

impl HostName {
    /// `name`, escaped for JSON.
    pub fn new(name: &str) -> Self {
        Self(serde_json::Value::from(name).to_string())
    }
}

/// `cycle-start`, the measurement `body` writes (given the start as seconds and
/// microseconds), `cycle-stop`: three newline-terminated lines.
fn cycle_lines(
    clock: &Clock,
    hostname: &HostName,
    start: Instant,
    stop: Instant,
    capacity: usize,
    body: impl FnOnce(&mut String, (u64, u32)),
) -> String {
    let (start_sec, start_usec) = clock.wall(start);
    let (stop_sec, _) = clock.wall(stop);
    let host = &hostname.0;
    let mut out = String::with_capacity(capacity);
    out.raw(r#"{"type":"cycle-start", "list_name":"default", "id":0, "hostname":"#)
        .raw(host)
        .field("start_time", start_sec)
        .raw("}\n");
    body(&mut out, (start_sec, start_usec));
    out.raw("\n")
        .raw(r#"{"type":"cycle-stop", "list_name":"default", "id":0, "hostname":"#)
        .raw(host)
        .field("stop_time", stop_sec)
        .raw("}\n");
    out
}

/// An answer's round-trip time in whole microseconds, as scamper measures it (from `timeval`s),
/// printed as milliseconds with three decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rtt {
    micros: u64,
}

impl Rtt {
    fn of(answer: &Answer) -> Self {
        let nanos = answer.rx.saturating_duration_since(answer.tx).as_nanos();
        // Rounded to the nearest microsecond.
        let micros = (nanos + 500) / 1000;
        Self {
            micros: u64::try_from(micros).unwrap_or(u64::MAX),
        }
    }

    /// Milliseconds: the number a reader of the printed value gets (both are the double
    /// nearest to micros / 1000).
    fn ms(self) -> f64 {
        self.micros as f64 / 1000.0
    }
}

fn write_trace(
    out: &mut String,
    line: &TraceLine<'_>,
    clock: &Clock,
    (sec, usec): (u64, u32),
    hops: &mut HopTable,
) {
    let flow = line.flow;
    out.raw(r#"{"type":"trace","version":"0.1", "userid":0, "method":""#)
        .raw(method(flow.probe))
        .raw(r#"", "src":""#)
        .addr(flow.src)
        .raw(r#"", "dst":""#)
        .addr(flow.dst)
        .raw("\"");
    match flow.probe {
        Probe::Icmp => out.field("icmp_sum", line.icmp_sum),
        Probe::Udp | Probe::Tcp => out.field("sport", flow.sport).field("dport", flow.dport),
    };
    let wait = line.wait.as_secs() + u64::from(line.wait.subsec_nanos() > 0);
    out.raw(r#", "stop_reason":""#)
        .raw(line.stop.name())
        .raw("\"")
        .field("stop_data", line.stop.data())
        .raw(r#", "start":{"sec":"#)
        .num(sec)
        .field("usec", usec)
        .raw(r#", "ftime":""#)
        .ftime(i64::try_from(sec).unwrap_or(i64::MAX))
        .raw("\"}")
        .field("hop_count", line.hop_count)
        .field("attempts", line.attempts)
        .raw(r#", "hoplimit":0, "firsthop":1"#)
        .field("wait", wait)
        .raw(r#", "wait_probe":0, "tos":0"#)
        .field("probe_size", line.probe_size)
        .field("probe_count", line.probe_count);
    if !line.answers.is_empty() {
        out.push_str(r#", "hops":["#);
        for (i, answer) in line.answers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let extension = line.extensions.get(answer.reply.id);
            let (rtt, labels) = write_hop(out, answer, line.probe_size, clock, extension);
            let reply = &answer.reply;
            hops.reply(i, reply.id.ttl, reply.from, rtt, reply.kind.into(), &labels);
        }
        out.push(']');
    }
    out.push('}');
}

/// Writes one hop; returns its RTT as written (milliseconds, three decimals) and the MPLS
/// labels its `icmpext` holds.
fn write_hop(
    out: &mut String,
    answer: &Answer,
    probe_size: u16,
    clock: &Clock,
    extension: Option<&[u8]>,
) -> (f64, Vec<MplsLabel>) {
    let reply = &answer.reply;
    let (tx_sec, tx_usec) = clock.wall(answer.tx);
    let ReplyPacket {
        size,
        tos,
        ipid,
        icmp,
        tcp_flags,
        quoted_len,
        quoted_tos,
    } = reply.packet;
    let rtt = Rtt::of(answer);
    out.raw(r#"{"addr":""#)
        .addr(reply.from)
        .raw("\"")
        .field("probe_ttl", reply.id.ttl)
        .field("probe_id", u16::from(reply.id.attempt) + 1)
        .field("probe_size", probe_size)
        .raw(r#", "tx":{"sec":"#)
        .num(tx_sec)
        .field("usec", tx_usec)
        .raw(r#"}, "rtt":"#)
        .millis(rtt.micros)
        .field("reply_ttl", reply.reply_ttl)
        .field("reply_tos", tos)
        .field("reply_ipid", ipid)
        .field("reply_size", size);
    if let Some((icmp_type, icmp_code)) = icmp {
        out.field("icmp_type", icmp_type)
            .field("icmp_code", icmp_code);
        if let Some(q_ttl) = reply.quoted_ttl {
            out.field("icmp_q_ttl", q_ttl)
                .field("icmp_q_ipl", quoted_len);
            if reply.from.is_ipv4() {
                out.field("icmp_q_tos", quoted_tos);
            }
        }
    }
    if let Some(flags) = tcp_flags {
        out.field("tcp_flags", flags);
    }
    let labels = extension.map_or_else(Vec::new, |e| write_icmpext(out, e));
    out.push('}');
    (rtt.ms(), labels)
}

/// `, "icmpext":[…]` as scamper writes it (no spaces inside): each object's class, type and
/// data length, and the entries of an MPLS label stack. Nothing when no object is readable.
/// Returns the MPLS entries written.
fn write_icmpext(out: &mut String, extension: &[u8]) -> Vec<MplsLabel> {
    let mut labels = Vec::new();
    let mut objects = 0;
    for object in icmpext::objects(extension) {
        out.raw(if objects == 0 {
            r#", "icmpext":["#
        } else {
            ","
        })
        .raw(r#"{"ie_cn":"#)
        .num(object.class)
        .raw(r#","ie_ct":"#)
        .num(object.ctype)
        .raw(r#","ie_dl":"#)
        .num(object.data.len());
        if object.is_mpls() {
            out.raw(r#","mpls_labels":["#);
            for (j, entry) in object.mpls_entries().enumerate() {
                out.raw(if j == 0 { "" } else { "," })
                    .raw(r#"{"mpls_ttl":"#)
                    .num(entry.ttl)
                    .raw(r#","mpls_s":"#)
                    .num(u8::from(entry.bottom))
                    .raw(r#","mpls_exp":"#)
                    .num(entry.exp)
                    .raw(r#","mpls_label":"#)
                    .num(entry.label)
                    .raw("}");
                labels.push(entry);
            }
            out.raw("]");
        }
        out.raw("}");
        objects += 1;
    }
    if objects > 0 {
        out.raw("]");
    }
    labels
}

/// The IP length of a probe whose encoded bytes are `encoded` (IPv6 probes are encoded without
/// their 40-byte header).
pub fn probe_size(dst: IpAddr, encoded: usize) -> u16 {
    let size = match dst {
        IpAddr::V4(_) => encoded,
        IpAddr::V6(_) => encoded + 40,
    };
    u16::try_from(size).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests;
mod text;
mod tracelb;

use text::Append;

pub use tracelb::{TracelbLine, tracelb_output};
