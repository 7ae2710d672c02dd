//! Probe encoding, and the tag layout shared with decoding (see the table in the module docs).

use std::net::IpAddr;

use etherparse::{IpNumber, Ipv4Header, TcpHeader};

use super::{EncodeError, Encoded, Flow, MAX_ATTEMPT, MAX_TTL, ProbeId, ProbeKey, Stray};
use crate::Probe;

/// Length of the UDP / ICMP probe payload: `[state: u16][tag32: u32][tweak: u16]`.
pub(super) const PAYLOAD_LEN: usize = 8;
/// Length of UDP, ICMP echo and ICMPv6 echo headers (and of the UDP/ICMP probes' L4 part
/// without payload).
const L4_SHORT: usize = 8;
/// Length of the probe's TCP header (no options).
const TCP_LEN: usize = 20;
/// The SYN's receive window; any constant does, it is not hashed.
const TCP_WINDOW: u16 = 64240;

/// The tag fields of one probe, all cut from its keyed hash `m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tags {
    /// `ttl << 10 | attempt << 8 | m[0..8]`: IPv4 IP ID and the payload's first word.
    pub state: u16,
    /// `ttl << 10 | attempt << 8 | m[24..32]`: ICMP echo sequence number.
    pub echo_seq: u16,
    /// `ttl << 26 | attempt << 24 | m[8..32]`: TCP sequence number.
    pub tcp_seq: u32,
    /// `m[8..24]` mapped into 1..=0xFFFE: the UDP checksum.
    pub udp_checksum: u16,
    /// `m[32..64]`: the payload's tag word.
    pub tag32: u32,
}

impl Tags {
    /// Computes the tags of (flow, ttl, attempt) for the trace with `salt`; `ttl`, `attempt`
    /// must be in range.
    pub(super) fn new(
        key: &ProbeKey,
        salt: u32,
        dst: IpAddr,
        probe: Probe,
        sport: u16,
        dport: u16,
        id: ProbeId,
    ) -> Self {
        let m = key.mac(dst, probe, sport, dport, id, salt);
        let hi = u16::from(id.ttl) << 10 | u16::from(id.attempt) << 8;
        Self {
            state: hi | (m & 0xff) as u16,
            echo_seq: hi | (m >> 24 & 0xff) as u16,
            tcp_seq: u32::from(id.ttl) << 26
                | u32::from(id.attempt) << 24
                | (m >> 8 & 0xff_ffff) as u32,
            udp_checksum: reachable_checksum((m >> 8) as u16),
            tag32: (m >> 32) as u32,
        }
    }

    /// The ICMP echo checksum every probe of the flow carries (Paris): `m[8..24]` at TTL 0,
    /// which no probe uses.
    pub(super) fn echo_checksum(key: &ProbeKey, salt: u32, dst: IpAddr, sport: u16) -> u16 {
        let none = ProbeId { ttl: 0, attempt: 0 };
        reachable_checksum((key.mac(dst, Probe::Icmp, sport, 0, none, salt) >> 8) as u16)
    }

    /// The probe's payload with a zero tweak.
    fn payload(&self) -> [u8; PAYLOAD_LEN] {
        let [s0, s1] = self.state.to_be_bytes();
        let [t0, t1, t2, t3] = self.tag32.to_be_bytes();
        [s0, s1, t0, t1, t2, t3, 0, 0]
    }
}

/// What decoding checks tags with: the engine's key, and the salt of the running trace that
/// owns a flow (`salt_of(destination, protocol, source port, destination port)`, the
/// destination port 0 for ICMP). A flow no trace owns cannot be authenticated.
#[derive(Clone, Copy)]
pub struct Keys<'a> {
    key: &'a ProbeKey,
    salt_of: &'a dyn Fn(IpAddr, Probe, u16, u16) -> Option<u32>,
}

impl<'a> Keys<'a> {
    /// Tags checked with `key` and the salts `salt_of` gives.
    pub fn new(
        key: &'a ProbeKey,
        salt_of: &'a dyn Fn(IpAddr, Probe, u16, u16) -> Option<u32>,
    ) -> Self {
        Self { key, salt_of }
    }

    /// The tags of probe `id` of a flow, if a running trace owns the flow.
    pub(super) fn tags(
        &self,
        dst: IpAddr,
        probe: Probe,
        sport: u16,
        dport: u16,
        id: ProbeId,
    ) -> Result<Tags, Stray> {
        let salt = self.salt(dst, probe, sport, dport)?;
        Ok(Tags::new(self.key, salt, dst, probe, sport, dport, id))
    }

    /// The flow's ICMP echo checksum (see [`Tags::echo_checksum`]).
    pub(super) fn echo_checksum(&self, dst: IpAddr, id: u16) -> Result<u16, Stray> {
        let salt = self.salt(dst, Probe::Icmp, id, 0)?;
        Ok(Tags::echo_checksum(self.key, salt, dst, id))
    }

    fn salt(&self, dst: IpAddr, probe: Probe, sport: u16, dport: u16) -> Result<u32, Stray> {
        (self.salt_of)(dst, probe, sport, dport).ok_or(Stray::NoFlow)
    }
}

impl std::fmt::Debug for Keys<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// Splits a 16-bit state word into (TTL, attempt, tag byte); `None` for TTL 0.
pub(super) fn split_state(word: u16) -> Option<(ProbeId, u8)> {
    let ttl = (word >> 10) as u8;
    let id = ProbeId {
        ttl,
        attempt: (word >> 8 & 0b11) as u8,
    };
    (ttl != 0).then_some((id, word as u8))
}

/// Splits a TCP sequence number into (TTL, attempt); `None` for TTL 0.
pub(super) fn split_tcp_seq(seq: u32) -> Option<ProbeId> {
    let ttl = (seq >> 26) as u8;
    (ttl != 0).then_some(ProbeId {
        ttl,
        attempt: (seq >> 24 & 0b11) as u8,
    })
}

/// Maps 16 hash bits into 1..=0xFFFE: a payload tweak can make the one's-complement checksum
/// take any of these values, but not 0 or 0xFFFF for every packet (and 0 means "no checksum"
/// for UDP over IPv4).
fn reachable_checksum(bits: u16) -> u16 {
    bits % 0xfffe + 1
}

/// Adds `bytes` (an even number, except possibly the last call) as big-endian 16-bit words to a
/// one's-complement accumulator.
pub(super) fn sum_words(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// Folds an accumulator to 16 bits, end-around carry included.
pub(super) fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum (RFC 768 / RFC 8200 §8.1) for L4 length `len` and protocol `proto`.
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum_words(sum_words(0, &s.octets()), &d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum_words(sum_words(0, &s.octets()), &d.octets()),
        // encode() rejects mixed families before any checksum is computed.
        _ => 0,
    };
    // `len` is at most a few dozen bytes, so it fits in 16 bits.
    acc + u32::from(proto) + (len as u32 & 0xffff)
}

/// Writes into `l4[tweak_at..tweak_at + 2]` the word that makes the checksum field (already
/// holding the wanted value, in 1..=0xFFFE) correct over `pseudo` and `l4`.
fn tweak_checksum(l4: &mut [u8], tweak_at: usize, pseudo: u32) {
    // With the tweak at 0, the sum s covers everything but the tweak, the wanted checksum
    // included; a valid packet sums to 0xFFFF, so the tweak is 0xFFFF - s, i.e. !s. A sender
    // recomputing the checksum (the kernel, for ICMPv6) then gets the wanted value back, since
    // the rest sums to !checksum, which is neither zero word for a checksum in 1..=0xFFFE.
    let s = fold(sum_words(pseudo, l4));
    l4[tweak_at..tweak_at + 2].copy_from_slice(&(!s).to_be_bytes());
}

/// Appends probe `id` of `flow` to `out` and says how to send it.
///
/// IPv4: the whole packet for a raw socket with `IP_HDRINCL` (its IP ID is never 0, so the
/// kernel keeps it). IPv6: the L4 part only, for a raw socket of the probe's protocol; the
/// kernel writes the ICMPv6 checksum itself, and gets the same value because the pseudo-header
/// here uses `flow.src`, which must be the address actually sent from.
///
/// Allocates nothing when `out` has room for 40 more bytes.
pub fn encode(
    flow: &Flow,
    id: ProbeId,
    key: &ProbeKey,
    out: &mut Vec<u8>,
) -> Result<Encoded, EncodeError> {
    if id.ttl == 0 || id.ttl > MAX_TTL {
        return Err(EncodeError::TtlOutOfRange(id.ttl));
    }
    if id.attempt > MAX_ATTEMPT {
        return Err(EncodeError::AttemptOutOfRange(id.attempt));
    }
    let v4 = match (flow.src, flow.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => true,
        (IpAddr::V6(_), IpAddr::V6(_)) => false,
        _ => return Err(EncodeError::MixedFamilies),
    };
    let tags = Tags::new(
        key, flow.salt, flow.dst, flow.probe, flow.sport, flow.dport, id,
    );
    let start = out.len();

    // The L4 part, built in place so the tweak can be patched with the checksum known.
    let mut l4 = [0u8; TCP_LEN];
    let (l4_len, proto) = match flow.probe {
        Probe::Udp => {
            let len = (L4_SHORT + PAYLOAD_LEN) as u16;
            l4[0..2].copy_from_slice(&flow.sport.to_be_bytes());
            l4[2..4].copy_from_slice(&flow.dport.to_be_bytes());
            l4[4..6].copy_from_slice(&len.to_be_bytes());
            l4[6..8].copy_from_slice(&tags.udp_checksum.to_be_bytes());
            l4[8..16].copy_from_slice(&tags.payload());
            let pseudo = pseudo_header(flow.src, flow.dst, IpNumber::UDP.0, usize::from(len));
            tweak_checksum(&mut l4[..usize::from(len)], 14, pseudo);
            (usize::from(len), IpNumber::UDP)
        }
        Probe::Icmp => {
            let len = L4_SHORT + PAYLOAD_LEN;
            let (icmp_type, proto, pseudo) = if v4 {
                (8, IpNumber::ICMP, 0)
            } else {
                let proto = IpNumber::IPV6_ICMP;
                (128, proto, pseudo_header(flow.src, flow.dst, proto.0, len))
            };
            let checksum = Tags::echo_checksum(key, flow.salt, flow.dst, flow.sport);
            l4[0] = icmp_type;
            l4[2..4].copy_from_slice(&checksum.to_be_bytes());
            l4[4..6].copy_from_slice(&flow.sport.to_be_bytes());
            l4[6..8].copy_from_slice(&tags.echo_seq.to_be_bytes());
            l4[8..16].copy_from_slice(&tags.payload());
            tweak_checksum(&mut l4[..len], 14, pseudo);
            (len, proto)
        }
        Probe::Tcp => {
            let mut tcp = TcpHeader::new(flow.sport, flow.dport, tags.tcp_seq, TCP_WINDOW);
            tcp.syn = true;
            let bytes = tcp.to_bytes();
            l4[..bytes.len()].copy_from_slice(&bytes);
            let pseudo = pseudo_header(flow.src, flow.dst, IpNumber::TCP.0, TCP_LEN);
            let checksum = !fold(sum_words(pseudo, &l4[..TCP_LEN]));
            l4[16..18].copy_from_slice(&checksum.to_be_bytes());
            (TCP_LEN, IpNumber::TCP)
        }
    };

    if let (IpAddr::V4(src), IpAddr::V4(dst)) = (flow.src, flow.dst) {
        let mut ip = Ipv4Header {
            // l4_len is at most TCP_LEN, so this neither truncates nor overflows.
            total_len: (Ipv4Header::MIN_LEN + l4_len) as u16,
            identification: tags.state,
            // Never fragmented: fragments past the first would not carry the ports.
            dont_fragment: true,
            time_to_live: id.ttl,
            protocol: proto,
            source: src.octets(),
            destination: dst.octets(),
            ..Ipv4Header::default()
        };
        ip.header_checksum = ip.calc_header_checksum();
        out.extend_from_slice(&ip.to_bytes());
    }
    out.extend_from_slice(&l4[..l4_len]);
    Ok(Encoded {
        bytes: out.len() - start,
        hop_limit: id.ttl,
    })
}
