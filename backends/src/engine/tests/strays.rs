//! Replies that must not decode as ours: other keys, forged quotes, truncations, noise and
//! mutations.

use std::net::{IpAddr, Ipv6Addr};

use crate::test_rng::Rng;

use etherparse::{IcmpEchoHeader, Icmpv6Type, PacketBuilder};

use super::*;

#[test]
fn replies_to_another_key_never_decode() {
    let (key, other) = (key(), other_key());
    for flow in every_flow() {
        for id in all_ids() {
            let probe = probe_bytes(&flow, id, &other);
            for (from, kind, bytes) in replies(&flow, &probe) {
                let got = decode(&flow, &bytes, from, &key);
                assert_eq!(got, Err(Stray::BadTag), "{flow:?} {id:?} {kind:?}");
            }
        }
    }
}

#[test]
fn forged_quotes_never_decode() {
    let key = key();
    let id = ProbeId { ttl: 9, attempt: 2 };
    for flow in every_flow() {
        let probe = probe_bytes(&flow, id, &key);
        let ip_len = if flow.src.is_ipv4() { 20 } else { 0 };
        // (what is forged, byte offset in the probe, bit mask)
        // The ICMP identifier stands in for the source port.
        let sport_at = if flow.probe == Probe::Icmp {
            ip_len + 5
        } else {
            ip_len + 1
        };
        let mut forgeries = vec![("sport", sport_at, 0x01)];
        if flow.probe != Probe::Icmp {
            forgeries.push(("dport", ip_len + 3, 0x80));
        }
        match flow.probe {
            Probe::Icmp => forgeries.push(("echo seq", ip_len + 7, 0x04)),
            Probe::Tcp => forgeries.push(("tcp seq", ip_len + 7, 0x10)),
            Probe::Udp => forgeries.push(("udp checksum", ip_len + 7, 0x01)),
        }
        if flow.src.is_ipv4() {
            forgeries.push(("ip id tag", 5, 0x01));
            forgeries.push(("ip id attempt", 4, 0x01));
            forgeries.push(("inner destination", 19, 0x01));
        }
        for (what, at, mask) in forgeries {
            let mut forged = probe.clone();
            forged[at] ^= mask;
            for (from, kind, bytes) in replies(&flow, &forged) {
                // Direct replies echo the L4 fields only, not the probe's IP header.
                let direct = matches!(kind, Kind::EchoReply | Kind::TcpReset | Kind::TcpSynAck);
                if direct && (what.starts_with("ip id") || what == "inner destination") {
                    continue;
                }
                let got = decode(&flow, &bytes, from, &key);
                assert!(
                    got.is_err(),
                    "{flow:?} forged {what} {kind:?} decoded: {got:?}"
                );
            }
        }
    }
    // A quote naming another destination (v6: the quoted IPv6 header's destination).
    for probe_kind in PROBES {
        let flow = flow(true, probe_kind);
        let probe = probe_bytes(&flow, id, &key);
        let elsewhere = Flow {
            dst: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 8)),
            ..flow
        };
        let bytes = icmp6_error(ROUTER6, &elsewhere, 3, 0, &probe);
        assert!(
            decode_icmp6(&bytes, ROUTER6, 60, &keys(&key)).is_err(),
            "{probe_kind:?}"
        );
    }
}

#[test]
fn truncated_replies_decode_as_the_original_or_not_at_all() {
    let key = key();
    let id = ProbeId { ttl: 5, attempt: 1 };
    for flow in every_flow() {
        let probe = probe_bytes(&flow, id, &key);
        for (from, kind, bytes) in replies(&flow, &probe) {
            let whole = decode(&flow, &bytes, from, &key).expect("the whole reply decodes");
            for len in 0..bytes.len() {
                match decode(&flow, &bytes[..len], from, &key) {
                    Err(_) => {}
                    // IPv4 packets carry their total length: any cut is an error. IPv6 ones
                    // are only shorter (their size is what arrived).
                    Ok(mut r) if flow.src.is_ipv6() => {
                        assert!(r.packet.size < whole.packet.size);
                        r.packet.size = whole.packet.size;
                        assert_eq!(r, whole, "{flow:?} {kind:?} cut at {len}")
                    }
                    Ok(r) => panic!("{flow:?} {kind:?} cut at {len} decoded: {r:?}"),
                }
            }
        }
    }
}

#[test]
fn random_and_mutated_packets_never_panic_and_only_decode_when_the_tag_checks_out() {
    let key = key();
    let flows: Vec<Flow> = every_flow().collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    for round in 0..12_000 {
        let flow = flows[rng.below(flows.len())];
        let id = ProbeId {
            ttl: 1 + rng.below(usize::from(MAX_TTL)) as u8,
            attempt: rng.below(usize::from(MAX_ATTEMPT) + 1) as u8,
        };
        let probe = probe_bytes(&flow, id, &key);
        let candidates = replies(&flow, &probe);
        let (from, _, mut bytes) = candidates[rng.below(candidates.len())].clone();
        match round % 4 {
            // Pure noise, of any length up to a jumbo ICMP error.
            0 => bytes = (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
            // One to three flipped bytes.
            1 | 2 => {
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 + rng.below(255) as u8;
                }
            }
            // A random cut, sometimes also a flipped byte.
            _ => {
                bytes.truncate(rng.below(bytes.len() + 1));
                if !bytes.is_empty() && rng.below(2) == 0 {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 0x5a;
                }
            }
        }
        let from6 = match from {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => ROUTER6,
        };
        let results = [
            decode_v4(&bytes, &keys(&key)),
            decode_icmp6(&bytes, from6, 64, &keys(&key)),
            decode_tcp6(&bytes, from6, SRC6, 64, &keys(&key)),
        ];
        for reply in results.into_iter().flatten() {
            assert_ne!(round % 4, 0, "noise decoded: {reply:?}");
            // A reply that decodes names a probe this key produced: re-encoding it gives back
            // the probe that was sent, byte for byte.
            let named = Flow {
                src: flow.src,
                dst: reply.flow_dst,
                probe: reply.probe,
                sport: reply.sport,
                dport: reply.dport,
                salt: 0,
            };
            assert_eq!(
                probe_bytes(&named, reply.id, &key),
                probe,
                "round {round}: {reply:?}"
            );
            decoded += 1;
        }
    }
    // Most mutations miss the fields that matter: the test exercised the success path too.
    assert!(decoded > 1000, "only {decoded} decoded");
}

#[test]
fn strays_are_classified() {
    let key = key();
    // An echo request to us is not a reply.
    let mut bytes = Vec::new();
    PacketBuilder::ipv4(DST4.octets(), SRC4.octets(), 60)
        .icmpv4_echo_request(1, 2)
        .write(&mut bytes, &[])
        .expect("write to a Vec");
    assert_eq!(
        decode_v4(&bytes, &keys(&key)),
        Err(Stray::UnknownType {
            icmp_type: 8,
            code: 0
        })
    );
    // UDP arriving on the socket.
    bytes.clear();
    PacketBuilder::ipv4(DST4.octets(), SRC4.octets(), 60)
        .udp(1, 2)
        .write(&mut bytes, &[])
        .expect("write to a Vec");
    assert_eq!(
        decode_v4(&bytes, &keys(&key)),
        Err(Stray::UnexpectedProtocol(17))
    );
    // A router advertisement on the ICMPv6 socket.
    let ra = icmp6_message(
        ROUTER6,
        &flow(true, Probe::Icmp),
        Icmpv6Type::Unknown {
            type_u8: 134,
            code_u8: 0,
            bytes5to8: [0; 4],
        },
        &[0; 8],
    );
    assert_eq!(
        decode_icmp6(&ra, ROUTER6, 255, &keys(&key)),
        Err(Stray::UnknownType {
            icmp_type: 134,
            code: 0
        })
    );
    // An echo reply whose sequence number claims TTL 0.
    let echo = Icmpv6Type::EchoReply(IcmpEchoHeader { id: 1, seq: 0x00ff });
    let reply = icmp6_message(DST6, &flow(true, Probe::Icmp), echo, &[0; 8]);
    assert_eq!(
        decode_icmp6(&reply, DST6, 60, &keys(&key)),
        Err(Stray::NotOurProbe)
    );
    // A TCP reply with a broken checksum.
    let f = flow(true, Probe::Tcp);
    let mut rst = tcp_reply(
        &f,
        &probe_bytes(&f, ProbeId { ttl: 3, attempt: 0 }, &key),
        false,
    );
    rst[16] ^= 1;
    assert_eq!(
        decode_tcp6(&rst, DST6, SRC6, 60, &keys(&key)),
        Err(Stray::BadChecksum)
    );
    // A key's Debug output never shows the secret.
    assert_eq!(format!("{:?}", ProbeKey::random()), "ProbeKey(..)");
    assert_ne!(ProbeKey::random(), ProbeKey::random());
    assert_eq!(
        crate::ReplyKind::from(Kind::TcpSynAck),
        crate::ReplyKind::Tcp
    );
}
