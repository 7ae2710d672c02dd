//! Round trips and encoding checks, on byte buffers; forgeries and the randomised no-panic
//! property are in `strays`.

mod strays;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Icmpv4Slice, Icmpv6Header, Icmpv6Slice, Icmpv6Type, IpNumber, Ipv4HeaderSlice, Ipv6Header,
    PacketBuilder, TcpHeader, TcpSlice, UdpHeaderSlice,
};

use super::key::siphash24;
use super::*;

/// The lab destination the state-machine tests trace (10.77.100.5).
pub(crate) const LAB_DST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 100, 5));

/// A reply from `from` to probe `id` of a UDP flow to [`LAB_DST`] (source port 40000, the
/// default destination port), as the state-machine tests feed them.
pub(crate) fn udp_reply(id: ProbeId, from: IpAddr, kind: Kind) -> Reply {
    Reply {
        from,
        kind,
        flow_dst: LAB_DST,
        sport: 40000,
        dport: 33435,
        probe: Probe::Udp,
        id,
        reply_ttl: 64 - id.ttl,
        quoted_ttl: Some(1),
        packet: ReplyPacket::default(),
    }
}

const SRC4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const DST4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 7);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 9);

const PROBES: [Probe; 3] = [Probe::Udp, Probe::Icmp, Probe::Tcp];

fn key() -> ProbeKey {
    ProbeKey::new(*b"hoptrace-test-k1")
}

fn other_key() -> ProbeKey {
    ProbeKey::new(*b"hoptrace-test-k2")
}

fn flow(v6: bool, probe: Probe) -> Flow {
    let (src, dst) = if v6 {
        (IpAddr::V6(SRC6), IpAddr::V6(DST6))
    } else {
        (IpAddr::V4(SRC4), IpAddr::V4(DST4))
    };
    Flow {
        src,
        dst,
        probe,
        sport: 33434,
        dport: if probe == Probe::Icmp { 0 } else { 443 },
        salt: 0,
    }
}

fn every_flow() -> impl Iterator<Item = Flow> {
    [false, true]
        .into_iter()
        .flat_map(|v6| PROBES.into_iter().map(move |p| flow(v6, p)))
}

fn probe_bytes(flow: &Flow, id: ProbeId, key: &ProbeKey) -> Vec<u8> {
    let mut out = Vec::new();
    let encoded = encode(flow, id, key, &mut out).expect("ids in range");
    assert_eq!(encoded.bytes, out.len());
    assert_eq!(encoded.hop_limit, id.ttl);
    out
}

fn v4(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("expected IPv4"),
    }
}

fn v6(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => panic!("expected IPv6"),
    }
}

/// An ICMPv4 error from `from`, quoting the first `quote` bytes of `probe` with its TTL at 1.
fn icmp4_error(
    from: Ipv4Addr,
    flow: &Flow,
    icmp_type: u8,
    code: u8,
    probe: &[u8],
    quote: usize,
) -> Vec<u8> {
    let mut quoted = probe[..quote.min(probe.len())].to_vec();
    quoted[8] = 1;
    let mut out = Vec::new();
    PacketBuilder::ipv4(from.octets(), v4(flow.src), 250)
        .icmpv4_raw(icmp_type, code, [0; 4])
        .write(&mut out, &quoted)
        .expect("write to a Vec");
    out
}

/// An ICMPv6 message (no IPv6 header) from `from` to the flow's source.
fn icmp6_message(from: Ipv6Addr, flow: &Flow, icmp_type: Icmpv6Type, payload: &[u8]) -> Vec<u8> {
    let header = Icmpv6Header::with_checksum(icmp_type, from.octets(), v6(flow.src), payload)
        .expect("small");
    let mut out = header.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// An ICMPv6 error quoting the whole probe behind the IPv6 header the kernel would have built.
fn icmp6_error(from: Ipv6Addr, flow: &Flow, icmp_type: u8, code: u8, probe: &[u8]) -> Vec<u8> {
    let next_header = match flow.probe {
        Probe::Udp => IpNumber::UDP,
        Probe::Icmp => IpNumber::IPV6_ICMP,
        Probe::Tcp => IpNumber::TCP,
    };
    let ip = Ipv6Header {
        payload_length: probe.len() as u16,
        next_header,
        hop_limit: 1,
        source: v6(flow.src),
        destination: v6(flow.dst),
        ..Default::default()
    };
    let mut quoted = ip.to_bytes().to_vec();
    quoted.extend_from_slice(probe);
    let icmp_type = Icmpv6Type::Unknown {
        type_u8: icmp_type,
        code_u8: code,
        bytes5to8: [0; 4],
    };
    icmp6_message(from, flow, icmp_type, &quoted)
}

/// The destination's TCP reply to the SYN `probe` (the L4 part), with ack = seq + 1.
fn tcp_reply(flow: &Flow, l4: &[u8], syn_ack: bool) -> Vec<u8> {
    let syn = TcpSlice::from_slice(l4).expect("our SYN");
    let mut tcp = TcpHeader::new(syn.destination_port(), syn.source_port(), 0x1234_5678, 0);
    tcp.acknowledgment_number = syn.sequence_number().wrapping_add(1);
    tcp.ack = true;
    tcp.rst = !syn_ack;
    tcp.syn = syn_ack;
    let mut out = Vec::new();
    match (flow.dst, flow.src) {
        (IpAddr::V4(d), IpAddr::V4(s)) => {
            let builder = PacketBuilder::ipv4(d.octets(), s.octets(), 57).tcp_header(tcp);
            builder.write(&mut out, &[]).expect("write to a Vec");
        }
        (IpAddr::V6(d), IpAddr::V6(s)) => {
            tcp.checksum = tcp
                .calc_checksum_ipv6_raw(d.octets(), s.octets(), &[])
                .expect("small");
            out.extend_from_slice(&tcp.to_bytes());
        }
        _ => panic!("mixed families"),
    }
    out
}

/// Every flow is run by a trace with salt 0 (the salt the test flows are encoded with).
fn any_flow(_: IpAddr, _: Probe, _: u16, _: u16) -> Option<u32> {
    Some(0)
}

/// Tags checked with `key`, for any flow.
fn keys(key: &ProbeKey) -> Keys<'_> {
    Keys::new(key, &any_flow)
}

/// Decodes a reply to `flow` of the shape the family's socket returns.
fn decode(flow: &Flow, reply: &[u8], from: IpAddr, key: &ProbeKey) -> Result<Reply, Stray> {
    decode_keyed(flow, reply, from, &keys(key))
}

/// [`decode`] with the salts `keys` gives.
fn decode_keyed(flow: &Flow, reply: &[u8], from: IpAddr, keys: &Keys<'_>) -> Result<Reply, Stray> {
    match (flow.src, from) {
        (IpAddr::V4(_), _) => decode_v4(reply, keys),
        (IpAddr::V6(src), IpAddr::V6(from))
            if flow.probe == Probe::Tcp && from == v6ip(flow.dst) =>
        {
            decode_tcp6(reply, from, src, 58, keys)
        }
        (IpAddr::V6(_), IpAddr::V6(from)) => decode_icmp6(reply, from, 58, keys),
        _ => panic!("mixed families"),
    }
}

fn v6ip(addr: IpAddr) -> Ipv6Addr {
    Ipv6Addr::from(v6(addr))
}

/// Every reply a probe can get: (who answered, the expected kind, the bytes).
fn replies(flow: &Flow, probe: &[u8]) -> Vec<(IpAddr, Kind, Vec<u8>)> {
    let mut out = Vec::new();
    match flow.src {
        IpAddr::V4(_) => {
            let (router, dst) = (ROUTER4, Ipv4Addr::from(v4(flow.dst)));
            // Routers quote the IP header and exactly 8 bytes of L4; destinations may quote more.
            out.push((
                IpAddr::V4(router),
                Kind::TimeExceeded,
                icmp4_error(router, flow, 11, 0, probe, 28),
            ));
            match flow.probe {
                Probe::Udp => {
                    let bytes = icmp4_error(dst, flow, 3, 3, probe, probe.len());
                    out.push((flow.dst, Kind::Unreachable { code: 3 }, bytes));
                }
                Probe::Icmp => {
                    let echo = Icmpv4Slice::from_slice(&probe[20..]).expect("our echo");
                    let (id, seq) = match echo.icmp_type() {
                        etherparse::Icmpv4Type::EchoRequest(e) => (e.id, e.seq),
                        other => panic!("not an echo request: {other:?}"),
                    };
                    let mut bytes = Vec::new();
                    PacketBuilder::ipv4(dst.octets(), v4(flow.src), 60)
                        .icmpv4_echo_reply(id, seq)
                        .write(&mut bytes, echo.payload())
                        .expect("write to a Vec");
                    out.push((flow.dst, Kind::EchoReply, bytes));
                }
                Probe::Tcp => {
                    out.push((
                        flow.dst,
                        Kind::TcpReset,
                        tcp_reply(flow, &probe[20..], false),
                    ));
                    out.push((
                        flow.dst,
                        Kind::TcpSynAck,
                        tcp_reply(flow, &probe[20..], true),
                    ));
                }
            }
        }
        IpAddr::V6(_) => {
            out.push((
                IpAddr::V6(ROUTER6),
                Kind::TimeExceeded,
                icmp6_error(ROUTER6, flow, 3, 0, probe),
            ));
            let dst = v6ip(flow.dst);
            match flow.probe {
                Probe::Udp => {
                    out.push((
                        flow.dst,
                        Kind::Unreachable { code: 4 },
                        icmp6_error(dst, flow, 1, 4, probe),
                    ));
                }
                Probe::Icmp => {
                    let echo = Icmpv6Slice::from_slice(probe).expect("our echo");
                    let Icmpv6Type::EchoRequest(e) = echo.icmp_type() else {
                        panic!("not an echo request");
                    };
                    let reply = icmp6_message(dst, flow, Icmpv6Type::EchoReply(e), echo.payload());
                    out.push((flow.dst, Kind::EchoReply, reply));
                }
                Probe::Tcp => {
                    out.push((flow.dst, Kind::TcpReset, tcp_reply(flow, probe, false)));
                    out.push((flow.dst, Kind::TcpSynAck, tcp_reply(flow, probe, true)));
                }
            }
        }
    }
    out
}

fn all_ids() -> impl Iterator<Item = ProbeId> {
    (1..=MAX_TTL).flat_map(|ttl| (0..=MAX_ATTEMPT).map(move |attempt| ProbeId { ttl, attempt }))
}

#[test]
fn siphash_matches_the_reference_vectors() {
    let key: [u8; 16] = std::array::from_fn(|i| i as u8);
    let msg: Vec<u8> = (0..15).collect();
    assert_eq!(siphash24(&key, &[]), 0x726f_db47_dd0e_0e31);
    assert_eq!(siphash24(&key, &msg), 0xa129_ca61_49be_45e5);
}

#[test]
fn every_reply_round_trips_for_every_family_kind_ttl_and_attempt() {
    let key = key();
    for flow in every_flow() {
        for id in all_ids() {
            let probe = probe_bytes(&flow, id, &key);
            for (from, kind, bytes) in replies(&flow, &probe) {
                let reply = decode(&flow, &bytes, from, &key)
                    .unwrap_or_else(|e| panic!("{flow:?} {id:?} {kind:?}: {e}"));
                assert_eq!(reply.from, from);
                assert_eq!(reply.kind, kind);
                assert_eq!(reply.flow_dst, flow.dst);
                assert_eq!((reply.sport, reply.dport), (flow.sport, flow.dport));
                assert_eq!(reply.probe, flow.probe);
                assert_eq!(reply.id, id);
                let errored = kind.is_icmp_error();
                assert_eq!(reply.quoted_ttl, errored.then_some(1));
            }
        }
    }
}

/// A reply to an earlier trace of the same flow (another salt) fails the tag check of the
/// trace running it now, and a reply for a flow no trace runs is not authenticated at all.
#[test]
fn replies_to_another_trace_of_the_flow_or_to_no_trace_are_refused() {
    let key = key();
    let id = ProbeId { ttl: 3, attempt: 0 };
    let later = |_: IpAddr, _: Probe, _: u16, _: u16| Some(1);
    let nobody = |_: IpAddr, _: Probe, _: u16, _: u16| None;
    for flow in every_flow() {
        let probe = probe_bytes(&flow, id, &key);
        for (from, kind, bytes) in replies(&flow, &probe) {
            let decode_with = |salt_of: &dyn Fn(IpAddr, Probe, u16, u16) -> Option<u32>| {
                decode_keyed(&flow, &bytes, from, &Keys::new(&key, salt_of))
            };
            assert_eq!(decode_with(&later), Err(Stray::BadTag), "{flow:?} {kind:?}");
            assert_eq!(
                decode_with(&nobody),
                Err(Stray::NoFlow),
                "{flow:?} {kind:?}"
            );
        }
    }
}

#[test]
fn probes_are_well_formed_and_keep_the_paris_fields_constant() {
    let key = key();
    for flow in every_flow() {
        let mut seen: Option<Vec<u8>> = None;
        for id in all_ids() {
            let probe = probe_bytes(&flow, id, &key);
            let l4 = match flow.src {
                IpAddr::V4(_) => {
                    let ip = Ipv4HeaderSlice::from_slice(&probe).expect("IPv4 header");
                    let header = ip.to_header();
                    assert_eq!(header.calc_header_checksum(), header.header_checksum);
                    assert_eq!(usize::from(ip.total_len()), probe.len());
                    assert_eq!(ip.ttl(), id.ttl);
                    assert_ne!(
                        ip.identification(),
                        0,
                        "the kernel would replace a zero IP ID"
                    );
                    &probe[20..]
                }
                IpAddr::V6(_) => &probe[..],
            };
            // The checksum must verify as any receiver computes it.
            let (src, dst) = (flow.src, flow.dst);
            let hashed: Vec<u8> = match flow.probe {
                Probe::Udp => {
                    let udp = UdpHeaderSlice::from_slice(l4).expect("UDP");
                    let h = udp.to_header();
                    let sum = match src {
                        IpAddr::V4(_) => h.calc_checksum_ipv4_raw(v4(src), v4(dst), &l4[8..]),
                        IpAddr::V6(_) => h.calc_checksum_ipv6_raw(v6(src), v6(dst), &l4[8..]),
                    };
                    assert_eq!(sum.expect("small"), udp.checksum());
                    l4[..6].to_vec()
                }
                Probe::Icmp => {
                    match src {
                        IpAddr::V4(_) => {
                            let icmp = Icmpv4Slice::from_slice(l4).expect("ICMP");
                            assert_eq!(
                                icmp.icmp_type().calc_checksum(icmp.payload()),
                                icmp.checksum()
                            );
                        }
                        IpAddr::V6(_) => {
                            let icmp = Icmpv6Slice::from_slice(l4).expect("ICMPv6");
                            assert!(icmp.is_checksum_valid(v6(src), v6(dst)));
                        }
                    }
                    // type, code, checksum, identifier: all of it constant (Paris).
                    l4[..6].to_vec()
                }
                Probe::Tcp => {
                    let tcp = TcpSlice::from_slice(l4).expect("TCP");
                    let sum = match src {
                        IpAddr::V4(_) => tcp.calc_checksum_ipv4(v4(src), v4(dst)),
                        IpAddr::V6(_) => tcp.calc_checksum_ipv6(v6(src), v6(dst)),
                    };
                    assert_eq!(sum.expect("small"), tcp.checksum());
                    assert!(tcp.syn() && !tcp.ack());
                    l4[..4].to_vec()
                }
            };
            let mut constant = hashed;
            constant.push(probe.len() as u8);
            match &seen {
                None => seen = Some(constant),
                Some(first) => assert_eq!(first, &constant, "{flow:?} {id:?}"),
            }
        }
    }
}

#[test]
fn encode_rejects_out_of_range_ids_and_mixed_families_and_does_not_allocate() {
    let key = key();
    let f = flow(false, Probe::Udp);
    let mut out = Vec::with_capacity(64);
    let bad = [
        (
            ProbeId { ttl: 0, attempt: 0 },
            EncodeError::TtlOutOfRange(0),
        ),
        (
            ProbeId {
                ttl: 64,
                attempt: 0,
            },
            EncodeError::TtlOutOfRange(64),
        ),
        (
            ProbeId { ttl: 1, attempt: 4 },
            EncodeError::AttemptOutOfRange(4),
        ),
    ];
    for (id, err) in bad {
        assert_eq!(encode(&f, id, &key, &mut out), Err(err));
    }
    let mixed = Flow {
        dst: IpAddr::V6(DST6),
        ..f
    };
    let id = ProbeId { ttl: 1, attempt: 0 };
    assert_eq!(
        encode(&mixed, id, &key, &mut out),
        Err(EncodeError::MixedFamilies)
    );
    assert!(out.is_empty());
    let before = out.as_ptr();
    for flow in every_flow() {
        out.clear();
        encode(&flow, id, &key, &mut out).expect("in range");
        assert_eq!((out.as_ptr(), out.capacity()), (before, 64));
    }
}
