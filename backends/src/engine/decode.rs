//! Reply decoding: every header goes through etherparse's length-checked slices; the only
//! hand-read bytes are our own probe payload and the first 8 bytes of a quoted TCP header
//! (etherparse's TCP slices need the full 20-byte header, IPv4 routers may quote only 8).

use std::net::{IpAddr, Ipv6Addr};

use etherparse::err::{LenError, ipv4, tcp};
use etherparse::{IcmpEchoHeader, Icmpv4Slice, Icmpv4Type, Icmpv6Slice, Icmpv6Type, IpNumber};
use etherparse::{Ipv4Slice, LaxIpv4Slice, LaxIpv6Slice, TcpSlice, UdpHeaderSlice};

use super::probe::{Keys, PAYLOAD_LEN, Tags, split_state, split_tcp_seq};
use super::{Kind, ProbeId, Reply, ReplyPacket, Stray};
use crate::Probe;

/// The ICMP types a probe can elicit, per family (ICMPv4: RFC 792; ICMPv6: RFC 4443).
struct IcmpTypes {
    echo_reply: u8,
    unreachable: u8,
    time_exceeded: u8,
}

const V4: IcmpTypes = IcmpTypes {
    echo_reply: 0,
    unreachable: 3,
    time_exceeded: 11,
};

const V6: IcmpTypes = IcmpTypes {
    echo_reply: 129,
    unreachable: 1,
    time_exceeded: 3,
};

/// What an ICMP message is, by its type: an error quoting a probe, an echo reply, or neither.
enum Icmp {
    Error(Kind),
    EchoReply,
}

impl IcmpTypes {
    fn classify(&self, icmp_type: u8, code: u8) -> Result<Icmp, Stray> {
        match icmp_type {
            t if t == self.time_exceeded => Ok(Icmp::Error(Kind::TimeExceeded)),
            t if t == self.unreachable => Ok(Icmp::Error(Kind::Unreachable { code })),
            t if t == self.echo_reply => Ok(Icmp::EchoReply),
            icmp_type => Err(Stray::UnknownType { icmp_type, code }),
        }
    }
}

/// The probe a reply was matched to (everything of [`Reply`] but who answered and how).
struct Matched {
    flow_dst: IpAddr,
    probe: Probe,
    sport: u16,
    dport: u16,
    id: ProbeId,
    quoted_ttl: Option<u8>,
    quoted_len: u16,
    quoted_tos: u8,
}

impl Matched {
    fn reply(self, from: IpAddr, kind: Kind, reply_ttl: u8, packet: ReplyPacket) -> Reply {
        Reply {
            from,
            kind,
            flow_dst: self.flow_dst,
            sport: self.sport,
            dport: self.dport,
            probe: self.probe,
            id: self.id,
            reply_ttl,
            quoted_ttl: self.quoted_ttl,
            packet: ReplyPacket {
                quoted_len: self.quoted_len,
                quoted_tos: self.quoted_tos,
                ..packet
            },
        }
    }
}

/// An IPv4 packet as a raw ICMP (or TCP) socket returns it: IP header + ICMP/TCP.
pub fn decode_v4(packet: &[u8], keys: &Keys<'_>) -> Result<Reply, Stray> {
    let ip = Ipv4Slice::from_slice(packet).map_err(|e| match e {
        ipv4::SliceError::Len(_) => Stray::Truncated("IPv4 packet"),
        _ => Stray::Malformed("IPv4 header"),
    })?;
    let from = IpAddr::V4(ip.header().source_addr());
    let reply_ttl = ip.header().ttl();
    let mut packet = ReplyPacket {
        size: ip.header().total_len(),
        tos: ip.header().slice()[1],
        ipid: ip.header().identification(),
        ..ReplyPacket::default()
    };
    let payload = ip.payload();
    if payload.fragmented {
        // Raw sockets see reassembled datagrams; a fragment is nobody's reply.
        return Err(Stray::NotOurProbe);
    }
    match payload.ip_number {
        IpNumber::TCP => {
            let to = IpAddr::V4(ip.header().destination_addr());
            decode_tcp(payload.payload, from, to, reply_ttl, packet, keys)
        }
        IpNumber::ICMP => {
            let icmp = Icmpv4Slice::from_slice(payload.payload)
                .map_err(|_: LenError| Stray::Truncated("ICMP header"))?;
            packet.icmp = Some((icmp.type_u8(), icmp.code_u8()));
            let kind = match V4.classify(icmp.type_u8(), icmp.code_u8())? {
                Icmp::Error(kind) => kind,
                Icmp::EchoReply => {
                    let Icmpv4Type::EchoReply(echo) = icmp.icmp_type() else {
                        return Err(Stray::NotOurProbe);
                    };
                    return echo_reply(echo, icmp.payload(), from, keys)
                        .map(|m| m.reply(from, Kind::EchoReply, reply_ttl, packet));
                }
            };
            quoted_v4(icmp.payload(), keys).map(|m| m.reply(from, kind, reply_ttl, packet))
        }
        other => Err(Stray::UnexpectedProtocol(other.0)),
    }
}

/// An ICMPv6 message as a raw ICMPv6 socket returns it (no IPv6 header), with the sender and
/// hop limit the socket reports.
pub fn decode_icmp6(
    message: &[u8],
    from: Ipv6Addr,
    hop_limit: u8,
    keys: &Keys<'_>,
) -> Result<Reply, Stray> {
    let icmp = Icmpv6Slice::from_slice(message)
        .map_err(|_: LenError| Stray::Truncated("ICMPv6 header"))?;
    let from = IpAddr::V6(from);
    let packet = ReplyPacket {
        size: v6_size(message.len()),
        icmp: Some((icmp.type_u8(), icmp.code_u8())),
        ..ReplyPacket::default()
    };
    let kind = match V6.classify(icmp.type_u8(), icmp.code_u8())? {
        Icmp::Error(kind) => kind,
        Icmp::EchoReply => {
            let Icmpv6Type::EchoReply(echo) = icmp.icmp_type() else {
                return Err(Stray::NotOurProbe);
            };
            return echo_reply(echo, icmp.payload(), from, keys)
                .map(|m| m.reply(from, Kind::EchoReply, hop_limit, packet));
        }
    };
    quoted_v6(icmp.payload(), keys).map(|m| m.reply(from, kind, hop_limit, packet))
}

/// A TCP segment over IPv6 (raw TCP socket, no IP header), with the sender, our address (for
/// the checksum) and the hop limit the socket reports.
pub fn decode_tcp6(
    segment: &[u8],
    from: Ipv6Addr,
    to: Ipv6Addr,
    hop_limit: u8,
    keys: &Keys<'_>,
) -> Result<Reply, Stray> {
    let packet = ReplyPacket {
        size: v6_size(segment.len()),
        ..ReplyPacket::default()
    };
    decode_tcp(
        segment,
        IpAddr::V6(from),
        IpAddr::V6(to),
        hop_limit,
        packet,
        keys,
    )
}

/// The length of an IPv6 packet whose payload (no extension headers) is `payload` bytes.
fn v6_size(payload: usize) -> u16 {
    u16::try_from(payload + 40).unwrap_or(u16::MAX)
}

/// The destination's RST or SYN-ACK: its ack is our SYN's sequence number + 1.
fn decode_tcp(
    segment: &[u8],
    from: IpAddr,
    to: IpAddr,
    reply_ttl: u8,
    mut packet: ReplyPacket,
    keys: &Keys<'_>,
) -> Result<Reply, Stray> {
    let tcp = TcpSlice::from_slice(segment).map_err(|e| match e {
        tcp::HeaderSliceError::Len(_) => Stray::Truncated("TCP header"),
        tcp::HeaderSliceError::Content(_) => Stray::Malformed("TCP header"),
    })?;
    // A checksum over a segment too long for its field is as wrong as a bad one.
    let checksum = match (from, to) {
        (IpAddr::V4(f), IpAddr::V4(t)) => tcp.calc_checksum_ipv4(f.octets(), t.octets()).ok(),
        (IpAddr::V6(f), IpAddr::V6(t)) => tcp.calc_checksum_ipv6(f.octets(), t.octets()).ok(),
        _ => None,
    };
    if checksum != Some(tcp.checksum()) {
        return Err(Stray::BadChecksum);
    }
    let kind = match (tcp.rst(), tcp.syn(), tcp.ack()) {
        (true, _, true) => Kind::TcpReset,
        (false, true, true) => Kind::TcpSynAck,
        // Without ACK the ack number says nothing about our SYN.
        _ => return Err(Stray::NotOurProbe),
    };
    // The reply goes from the flow's destination back to us: its ports are ours swapped.
    packet.tcp_flags = Some(tcp_flags(&tcp));
    let (sport, dport) = (tcp.destination_port(), tcp.source_port());
    let seq = tcp.acknowledgment_number().wrapping_sub(1);
    let id = split_tcp_seq(seq).ok_or(Stray::NotOurProbe)?;
    if keys.tags(from, Probe::Tcp, sport, dport, id)?.tcp_seq != seq {
        return Err(Stray::BadTag);
    }
    let matched = Matched {
        flow_dst: from,
        probe: Probe::Tcp,
        sport,
        dport,
        id,
        quoted_ttl: None,
        quoted_len: 0,
        quoted_tos: 0,
    };
    Ok(matched.reply(from, kind, reply_ttl, packet))
}

/// The flags byte of a TCP header (CWR ECE URG ACK PSH RST SYN FIN, high to low).
fn tcp_flags(tcp: &TcpSlice) -> u8 {
    [
        tcp.fin(),
        tcp.syn(),
        tcp.rst(),
        tcp.psh(),
        tcp.ack(),
        tcp.urg(),
        tcp.ece(),
        tcp.cwr(),
    ]
    .iter()
    .enumerate()
    .fold(0, |flags, (bit, &set)| flags | u8::from(set) << bit)
}

/// An echo reply (either family): the identifier is the flow's, the sequence number and the
/// echoed payload carry the state.
fn echo_reply(
    echo: IcmpEchoHeader,
    payload: &[u8],
    from: IpAddr,
    keys: &Keys<'_>,
) -> Result<Matched, Stray> {
    let (id, _) = split_state(echo.seq).ok_or(Stray::NotOurProbe)?;
    let tags = keys.tags(from, Probe::Icmp, echo.id, 0, id)?;
    if tags.echo_seq != echo.seq {
        return Err(Stray::BadTag);
    }
    check_payload(payload, &tags)?;
    Ok(Matched {
        flow_dst: from,
        probe: Probe::Icmp,
        sport: echo.id,
        dport: 0,
        id,
        quoted_ttl: None,
        quoted_len: 0,
        quoted_tos: 0,
    })
}

/// Checks our payload's state and tag words (the tweak is whatever the checksum needed).
fn check_payload(payload: &[u8], tags: &Tags) -> Result<(), Stray> {
    let Some(&[s0, s1, t0, t1, t2, t3, _, _]) = payload.get(..PAYLOAD_LEN) else {
        return Err(Stray::Truncated("probe payload"));
    };
    if u16::from_be_bytes([s0, s1]) != tags.state
        || u32::from_be_bytes([t0, t1, t2, t3]) != tags.tag32
    {
        return Err(Stray::BadTag);
    }
    Ok(())
}

/// Source port, destination port and sequence number: the first 8 bytes of a TCP header,
/// read by hand because that may be all an IPv4 router quotes.
fn quoted_tcp(l4: &[u8]) -> Result<(u16, u16, u32), Stray> {
    let Some(&[p0, p1, p2, p3, s0, s1, s2, s3]) = l4.get(..8) else {
        return Err(Stray::Truncated("quoted TCP header"));
    };
    Ok((
        u16::from_be_bytes([p0, p1]),
        u16::from_be_bytes([p2, p3]),
        u32::from_be_bytes([s0, s1, s2, s3]),
    ))
}

/// The probe quoted in an ICMPv4 error: IP header + at least 8 bytes of L4. The state comes
/// from the IP ID; the L4 fields must agree with it.
fn quoted_v4(quoted: &[u8], keys: &Keys<'_>) -> Result<Matched, Stray> {
    // Lax: the quote is cut short of the probe's total length, by design.
    let (ip, _) = LaxIpv4Slice::from_slice(quoted).map_err(|e| match e {
        ipv4::HeaderSliceError::Len(_) => Stray::Truncated("quoted IPv4 header"),
        ipv4::HeaderSliceError::Content(_) => Stray::Malformed("quoted IPv4 header"),
    })?;
    let header = ip.header();
    let payload = ip.payload();
    // A later fragment does not start with the L4 header; our probes are never fragmented.
    if header.fragments_offset().value() != 0 {
        return Err(Stray::NotOurProbe);
    }
    let flow_dst = IpAddr::V4(header.destination_addr());
    let (id, tag8) = split_state(header.identification()).ok_or(Stray::NotOurProbe)?;
    let l4 = payload.payload;
    let (probe, sport, dport) = match payload.ip_number {
        IpNumber::UDP => {
            let udp = UdpHeaderSlice::from_slice(l4)
                .map_err(|_: LenError| Stray::Truncated("quoted UDP header"))?;
            let (sport, dport) = (udp.source_port(), udp.destination_port());
            let tags = keys.tags(flow_dst, Probe::Udp, sport, dport, id)?;
            if tags.state as u8 != tag8 || tags.udp_checksum != udp.checksum() {
                return Err(Stray::BadTag);
            }
            (Probe::Udp, sport, dport)
        }
        IpNumber::ICMP => {
            let icmp = Icmpv4Slice::from_slice(l4)
                .map_err(|_: LenError| Stray::Truncated("quoted ICMP header"))?;
            let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
                return Err(Stray::NotOurProbe);
            };
            let tags = keys.tags(flow_dst, Probe::Icmp, echo.id, 0, id)?;
            if tags.state as u8 != tag8
                || tags.echo_seq != echo.seq
                || keys.echo_checksum(flow_dst, echo.id)? != icmp.checksum()
            {
                return Err(Stray::BadTag);
            }
            (Probe::Icmp, echo.id, 0)
        }
        IpNumber::TCP => {
            let (sport, dport, seq) = quoted_tcp(l4)?;
            let tags = keys.tags(flow_dst, Probe::Tcp, sport, dport, id)?;
            if tags.state as u8 != tag8 || tags.tcp_seq != seq {
                return Err(Stray::BadTag);
            }
            (Probe::Tcp, sport, dport)
        }
        _ => return Err(Stray::NotOurProbe),
    };
    Ok(Matched {
        flow_dst,
        probe,
        sport,
        dport,
        id,
        quoted_ttl: Some(header.ttl()),
        quoted_len: header.total_len(),
        quoted_tos: header.slice()[1],
    })
}

/// The probe quoted in an ICMPv6 error: the whole probe (RFC 4443 quotes up to 1280 bytes).
/// UDP and echo state comes from our payload, TCP state from the sequence number.
fn quoted_v6(quoted: &[u8], keys: &Keys<'_>) -> Result<Matched, Stray> {
    let (ip, _) =
        LaxIpv6Slice::from_slice(quoted).map_err(|_| Stray::Truncated("quoted IPv6 header"))?;
    let header = ip.header();
    let payload = ip.payload();
    if payload.fragmented {
        return Err(Stray::NotOurProbe);
    }
    let flow_dst = IpAddr::V6(header.destination_addr());
    let l4 = payload.payload;
    let (probe, sport, dport, id) = match payload.ip_number {
        IpNumber::UDP => {
            let udp = UdpHeaderSlice::from_slice(l4)
                .map_err(|_: LenError| Stray::Truncated("quoted UDP header"))?;
            let (sport, dport) = (udp.source_port(), udp.destination_port());
            let data = l4.get(udp.slice().len()..).unwrap_or_default();
            let id = payload_id(data)?;
            let tags = keys.tags(flow_dst, Probe::Udp, sport, dport, id)?;
            if tags.udp_checksum != udp.checksum() {
                return Err(Stray::BadTag);
            }
            check_payload(data, &tags)?;
            (Probe::Udp, sport, dport, id)
        }
        IpNumber::IPV6_ICMP => {
            let icmp = Icmpv6Slice::from_slice(l4)
                .map_err(|_: LenError| Stray::Truncated("quoted ICMPv6 header"))?;
            let Icmpv6Type::EchoRequest(echo) = icmp.icmp_type() else {
                return Err(Stray::NotOurProbe);
            };
            let (id, _) = split_state(echo.seq).ok_or(Stray::NotOurProbe)?;
            let tags = keys.tags(flow_dst, Probe::Icmp, echo.id, 0, id)?;
            if tags.echo_seq != echo.seq
                || keys.echo_checksum(flow_dst, echo.id)? != icmp.checksum()
            {
                return Err(Stray::BadTag);
            }
            check_payload(icmp.payload(), &tags)?;
            (Probe::Icmp, echo.id, 0, id)
        }
        IpNumber::TCP => {
            let (sport, dport, seq) = quoted_tcp(l4)?;
            let id = split_tcp_seq(seq).ok_or(Stray::NotOurProbe)?;
            if keys.tags(flow_dst, Probe::Tcp, sport, dport, id)?.tcp_seq != seq {
                return Err(Stray::BadTag);
            }
            (Probe::Tcp, sport, dport, id)
        }
        _ => return Err(Stray::NotOurProbe),
    };
    Ok(Matched {
        flow_dst,
        probe,
        sport,
        dport,
        id,
        quoted_ttl: Some(header.hop_limit()),
        quoted_len: header.payload_length().saturating_add(40),
        quoted_tos: 0,
    })
}

/// The probe id in a payload's state word.
fn payload_id(data: &[u8]) -> Result<ProbeId, Stray> {
    let Some(&[s0, s1]) = data.get(..2) else {
        return Err(Stray::Truncated("probe payload"));
    };
    split_state(u16::from_be_bytes([s0, s1]))
        .map(|(id, _)| id)
        .ok_or(Stray::NotOurProbe)
}
