//! The in-process traceroute engine: [`Engine`], a [`Tracer`](crate::Tracer) on raw sockets.
//!
//! Probes carry their own state in their headers, so a reply is matched to its probe without a
//! per-probe table: the TTL and attempt are read back from the quoted (or echoed) headers, and a
//! keyed tag ([`ProbeKey`], SipHash-2-4) computed over (destination, protocol, ports, TTL,
//! attempt) rejects forged, corrupted or replayed replies. Encoding and decoding are pure byte
//! work; [`ProbeSockets`] (raw sockets opened inside a checked network namespace) send and
//! receive them, and [`Engine`] runs every trace over one set of sockets on one prober thread
//! (see `tracer.rs` and `prober.rs`).
//!
//! # Paris rule
//!
//! What an ECMP load balancer hashes stays constant for every probe of one [`Flow`]: addresses,
//! protocol, source and destination ports, and for ICMP echo the identifier and the checksum.
//! The per-probe state goes elsewhere.
//!
//! # Layout
//!
//! `m` is the 64-bit keyed hash of (family, destination, protocol, source port, destination port,
//! TTL, attempt, trace salt); `m[a..b]` are its bits a to b-1. The TTL gets 6 bits and the attempt 2, so
//! TTL ≤ [`MAX_TTL`] (63) and attempt ≤ [`MAX_ATTEMPT`] (3):
//!
//! - `state` = `ttl << 10 | attempt << 8 | m[0..8]` (16 bits);
//! - `echo_seq` = `ttl << 10 | attempt << 8 | m[24..32]` (16 bits, other tag bits than `state`);
//! - `tcp_seq` = `ttl << 26 | attempt << 24 | m[8..32]` (32 bits);
//! - UDP and ICMP probes carry an 8-byte payload `[state: u16][m[32..64]: u32][tweak: u16]`, where
//!   `tweak` is chosen so the L4 checksum takes the value in the table.
//!
//! | family | kind | IP ID | L4 fields holding state | L4 checksum | tag bits (error / direct) |
//! |---|---|---|---|---|---|
//! | v4 | UDP | `state` | — (ports constant) | `m[8..24]` | 24 / — |
//! | v4 | ICMP echo | `state` | seq = `echo_seq` | flow constant `c` | 32 / 48 |
//! | v4 | TCP SYN | `state` | seq = `tcp_seq` | computed | 32 / 24 |
//! | v6 | UDP | (none) | payload | `m[8..24]` | 56 / — |
//! | v6 | ICMPv6 echo | (none) | seq = `echo_seq`, payload | flow constant `c` | 64 / 48 |
//! | v6 | TCP SYN | (none) | seq = `tcp_seq` | computed | 24 / 24 |
//!
//! `c` is `m[8..24]` of the same flow at TTL 0 (never a probe's TTL); it and the UDP checksum are
//! mapped into 1..=0xFFFE, the values a payload tweak can reach. "Error" tags are checked on
//! ICMP errors (IPv4 ones decode from the quoted IP header plus 8 L4 bytes only; IPv6 ones quote
//! the whole probe), "direct" ones on echo replies and on the destination's TCP RST / SYN-ACK,
//! whose ack is the probe's seq + 1. UDP and ICMP payload lengths are constant, so IP lengths
//! are too.
//!
//! The source address is not in the tag: an ICMPv6 socket does not say which local address an
//! echo reply came to, and the key is per engine instance anyway.
//!
//! The trace salt is a number the engine gives each trace, kept in the flow table beside the
//! trace's slot: the decoder looks up the salt of the flow a reply quotes before checking the
//! tag ([`Keys`]). So a genuine reply captured during one trace and replayed during a later
//! trace of the same flow (same destination and ports) fails the tag check, and a reply for a
//! flow no trace runs is counted without being authenticated.

mod decode;
mod dispatch;
pub mod icmpext;
mod json;
mod key;
pub mod mda;
mod pacer;
pub mod paris;
mod probe;
mod prober;
mod routers;
mod socket;
#[cfg(test)]
pub(crate) mod tests;
mod tracer;

use std::net::IpAddr;
use std::time::Duration;

use crate::Probe;

pub use decode::{decode_icmp6, decode_tcp6, decode_v4};
pub use key::ProbeKey;
pub use paris::StopReason;
pub use probe::{Keys, encode};
pub use routers::RouterLimits;
pub use socket::{
    EngineError, Listener, Packet, ProbeSockets, RECV_BUFFER, Reader, ensure_thread_in,
    thread_ns_id,
};
pub use tracer::{Engine, EngineOptions, EngineStats, TCP_DPORT, UDP_DPORT};

/// Highest TTL a probe can carry: the TTL gets 6 bits of the state word.
pub const MAX_TTL: u8 = 63;
/// Highest attempt number at one TTL: the attempt gets 2 bits of the state word.
pub const MAX_ATTEMPT: u8 = 3;
/// Longest wait for one answer (longer ones are clamped): keeps every instant computed from it
/// far from overflow.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Most probes one multipath trace sends (larger budgets are clamped): every flow takes at
/// least one probe, so a trace's flows stay fewer than the automatic source ports (28,000) and
/// its flow numbers (`u16`).
pub const MAX_PROBES: u32 = 20_000;

/// The flow a path is probed with; constant for every probe of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// Our address; must be the address the kernel sends from, since the checksums cover it.
    pub src: IpAddr,
    /// The destination, of the same family as `src`.
    pub dst: IpAddr,
    /// The transport of every probe of the flow.
    pub probe: Probe,
    /// UDP/TCP source port; for ICMP echo, the echo identifier.
    pub sport: u16,
    /// UDP/TCP destination port; ignored (taken as 0) for ICMP echo.
    pub dport: u16,
    /// The salt of the trace probing the flow, in every tag: a reply to an earlier trace of
    /// the same flow (replayed, or just late) fails the tag check of the next one.
    pub salt: u32,
}

/// One probe of a flow: the TTL it is sent with, and which attempt at that TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeId {
    /// The TTL (IPv4) or hop limit (IPv6), 1..=[`MAX_TTL`].
    pub ttl: u8,
    /// The attempt at this TTL, 0..=[`MAX_ATTEMPT`].
    pub attempt: u8,
}

/// What [`encode`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    /// Bytes appended to the output buffer: the whole IPv4 packet (for a raw socket with
    /// `IP_HDRINCL`), or the IPv6 L4 part only (the kernel builds the IPv6 header).
    pub bytes: usize,
    /// The TTL / hop limit to send with. Already in the IPv4 header; for IPv6 it must be set on
    /// the socket (or per packet, `IPV6_HOPLIMIT`).
    pub hop_limit: u8,
}

/// Why a probe could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The TTL does not fit the state word.
    #[error("ttl {0} out of range 1..={MAX_TTL}")]
    TtlOutOfRange(u8),
    /// The attempt does not fit the state word.
    #[error("attempt {0} out of range 0..={MAX_ATTEMPT}")]
    AttemptOutOfRange(u8),
    /// Source and destination are of different families.
    #[error("source and destination are of different address families")]
    MixedFamilies,
}

/// Why the probe was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// ICMP time exceeded: a router on the way.
    TimeExceeded,
    /// ICMP destination unreachable with its code (IPv4 port unreachable is 3, IPv6 is 4).
    Unreachable {
        /// The ICMP code, as sent (family-specific numbering).
        code: u8,
    },
    /// ICMP echo reply from the destination.
    EchoReply,
    /// TCP RST (with ACK) from the destination.
    TcpReset,
    /// TCP SYN-ACK from the destination.
    TcpSynAck,
}

impl Kind {
    /// An ICMP error (time exceeded or unreachable): a reply that quotes the probe and may
    /// carry ICMP extensions, and that routers rate-limit.
    pub fn is_icmp_error(self) -> bool {
        matches!(self, Kind::TimeExceeded | Kind::Unreachable { .. })
    }
}

impl From<Kind> for crate::ReplyKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::TimeExceeded => crate::ReplyKind::TimeExceeded,
            Kind::Unreachable { .. } => crate::ReplyKind::Unreachable,
            Kind::EchoReply => crate::ReplyKind::EchoReply,
            Kind::TcpReset | Kind::TcpSynAck => crate::ReplyKind::Tcp,
        }
    }
}

/// A reply matched to a probe this key produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Who answered.
    pub from: IpAddr,
    /// Why.
    pub kind: Kind,
    /// The destination of the probe's flow.
    pub flow_dst: IpAddr,
    /// The flow's source port (echo identifier for ICMP).
    pub sport: u16,
    /// The flow's destination port (0 for ICMP).
    pub dport: u16,
    /// The flow's transport.
    pub probe: Probe,
    /// Which probe of the flow was answered.
    pub id: ProbeId,
    /// The reply's own TTL / hop limit as it arrived.
    pub reply_ttl: u8,
    /// The TTL left in the quoted probe header (ICMP errors only): 1 is normal, other values
    /// hint at a router that rewrites or forwards with TTL 0.
    pub quoted_ttl: Option<u8>,
    /// The reply packet's other header fields, as scamper prints them per hop.
    pub packet: ReplyPacket,
}

/// Header fields of a reply packet that the output records (scamper's `reply_*` and `icmp_*`
/// keys). Fields a family does not have are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyPacket {
    /// The whole packet's length, IP header included (`reply_size`).
    pub size: u16,
    /// IPv4 TOS byte (`reply_tos`); 0 on IPv6 (the socket does not report it).
    pub tos: u8,
    /// IPv4 identification (`reply_ipid`); 0 on IPv6.
    pub ipid: u16,
    /// ICMP type and code, for ICMP replies (`icmp_type`, `icmp_code`).
    pub icmp: Option<(u8, u8)>,
    /// TCP flags, for TCP replies (`tcp_flags`).
    pub tcp_flags: Option<u8>,
    /// The quoted probe's IP length (`icmp_q_ipl`; IPv6: payload length + 40), ICMP errors.
    pub quoted_len: u16,
    /// The quoted probe's TOS byte (`icmp_q_tos`), IPv4 ICMP errors.
    pub quoted_tos: u8,
}

/// Why a received packet is not a reply to one of our probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stray {
    /// Too short to hold the named header or field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// The named header does not parse (bad version, header length, ...).
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// An IPv4 packet that is neither ICMP nor TCP.
    #[error("unexpected IP protocol {0}")]
    UnexpectedProtocol(u8),
    /// An ICMP message no probe elicits (echo request, redirect, neighbour discovery, ...).
    #[error("ICMP type {icmp_type} code {code} is not a reply to a probe")]
    UnknownType {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        code: u8,
    },
    /// The quoted or direct headers are not shaped like a probe (protocol, message type, TCP
    /// flags, TTL 0).
    #[error("not shaped like one of our probes")]
    NotOurProbe,
    /// A direct TCP reply whose checksum is wrong (corrupted on the way).
    #[error("bad TCP checksum")]
    BadChecksum,
    /// The integrity tag does not match: forged, replayed from another trace or engine, or
    /// corrupted.
    #[error("integrity tag mismatch")]
    BadTag,
    /// Shaped like a reply to one of our probes, but no running trace has its flow (late, or
    /// not ours): it cannot be authenticated.
    #[error("no running trace has this flow")]
    NoFlow,
}
