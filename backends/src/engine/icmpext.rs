//! ICMP extensions (RFC 4884): the objects a router appends to an error message after the quoted
//! probe, such as its MPLS label stack (RFC 4950), which scamper prints per hop as `icmpext`.
//!
//! Found where scamper 20211212 looks for them, so that both backends print the same hops: an
//! error message longer than its 8-byte header, the 128 bytes the quote is padded to and a
//! 4-byte extension header holds an extension structure at byte 136, if that structure says
//! version 2 (in its first four bits; on IPv4 also as a whole first byte, which some routers
//! send) and its checksum is zero (not computed) or right. Like scamper, an object whose data
//! is shorter than 4 bytes is left out.
//!
//! One deliberate difference: every object is kept. scamper 20211212 prints an object only
//! when a single one fills the structure (its walk stops at an object that ends before the
//! structure does), so for a router that sends its label stack beside another object, such as
//! RFC 5837 interface information, scamper prints no `icmpext` and its hop has no labels, where
//! the engine prints both objects and its hop has the labels. The common case, one label stack
//! object, prints the same from both.

use etherparse::checksum::Sum16BitWords;
use etherparse::{IpNumber, Ipv4Slice};

use super::Listener;
use crate::MplsLabel;

/// Bytes of the ICMP header, and of the quote an extension structure follows.
const ICMP_HEADER: usize = 8;
const PADDED_QUOTE: usize = 128;
/// Bytes of the extension structure's header (version, reserved, checksum), and of an object's
/// (length, class number, class type).
const EXT_HEADER: usize = 4;
const OBJECT_HEADER: usize = 4;

/// The extension structure (its header included) of the ICMP error in `packet` as the socket
/// `from` returned it (IPv4: from the IP header; IPv6: from the ICMPv6 header), if it has one.
pub fn find(packet: &[u8], from: Listener) -> Option<&[u8]> {
    // Most errors quote a short probe and end long before: done without parsing.
    if packet.len() <= ICMP_HEADER + PADDED_QUOTE + EXT_HEADER {
        return None;
    }
    let (message, v4) = match from {
        Listener::IcmpV4 => {
            // An error longer than the receive buffer (1280 bytes; routers keep ICMPv4 errors
            // to 576) arrives cut, fails the length check here and keeps no extension.
            let ip = Ipv4Slice::from_slice(packet).ok()?;
            let payload = ip.payload();
            if payload.ip_number != IpNumber::ICMP || payload.fragmented {
                return None;
            }
            (payload.payload, true)
        }
        Listener::IcmpV6 => (packet, false),
        Listener::TcpV4 | Listener::TcpV6 => return None,
    };
    let ext = message.get(ICMP_HEADER + PADDED_QUOTE..)?;
    if ext.len() <= EXT_HEADER {
        return None;
    }
    let version_2 = ext[0] & 0xf0 == 0x20 || (v4 && ext[0] == 0x02);
    let unchecked = ext[2] == 0 && ext[3] == 0;
    let sums = unchecked || Sum16BitWords::new().add_slice(ext).ones_complement() == 0;
    (version_2 && sums).then_some(ext)
}

/// One object of an extension structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object<'a> {
    /// Class number (1: MPLS label stack; 2: interface information).
    pub class: u8,
    /// Class type (C-Type) within the class.
    pub ctype: u8,
    /// The object's data, its header left out.
    pub data: &'a [u8],
}

impl Object<'_> {
    /// An MPLS label stack (class 1, type 1), whose entries scamper prints.
    pub fn is_mpls(&self) -> bool {
        self.class == 1 && self.ctype == 1
    }

    /// The label stack entries of an MPLS object, top first (a trailing partial entry is left
    /// out).
    pub fn mpls_entries(&self) -> impl Iterator<Item = MplsLabel> + '_ {
        self.data.chunks_exact(4).map(|e| MplsLabel {
            label: (u32::from(e[0]) << 12) | (u32::from(e[1]) << 4) | u32::from(e[2] >> 4),
            exp: (e[2] >> 1) & 0x7,
            bottom: e[2] & 1 == 1,
            ttl: e[3],
        })
    }
}

/// The objects of extension structure `ext` (as [`find`] returns it), in order, up to the first
/// that does not fit; objects with less than 4 bytes of data are skipped.
pub fn objects(ext: &[u8]) -> impl Iterator<Item = Object<'_>> {
    let mut rest = ext.get(EXT_HEADER..).unwrap_or_default();
    std::iter::from_fn(move || {
        loop {
            let header = rest.get(..OBJECT_HEADER)?;
            let len = usize::from(u16::from_be_bytes([header[0], header[1]]));
            // A length shorter than the object's header, or past the end: nothing more can be
            // read with confidence.
            let object = rest.get(OBJECT_HEADER..len)?;
            rest = &rest[len..];
            if object.len() >= 4 {
                return Some(Object {
                    class: header[2],
                    ctype: header[3],
                    data: object,
                });
            }
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An extension structure holding `objects` (class, type, data), with its checksum.
    pub(crate) fn structure(objects: &[(u8, u8, &[u8])]) -> Vec<u8> {
        let mut ext = vec![0x20, 0, 0, 0];
        for (class, ctype, data) in objects {
            let len = u16::try_from(OBJECT_HEADER + data.len()).expect("fits");
            ext.extend_from_slice(&len.to_be_bytes());
            ext.extend_from_slice(&[*class, *ctype]);
            ext.extend_from_slice(data);
        }
        // etherparse sums 16-bit words in native byte order: so is the checksum it returns.
        let sum = Sum16BitWords::new().add_slice(&ext).ones_complement();
        ext[2..4].copy_from_slice(&sum.to_ne_bytes());
        ext
    }

    /// An ICMPv6 Time Exceeded whose quote is padded to 128 bytes, followed by `ext`.
    fn icmp6_with(ext: &[u8]) -> Vec<u8> {
        let mut message = vec![3, 0, 0, 0, 0, 0, 0, 0];
        message.extend_from_slice(&[0x60; PADDED_QUOTE]);
        message.extend_from_slice(ext);
        message
    }

    /// Two MPLS entries: label 16 (TTL 1), then label 0xABCDE, exp 5, bottom of stack (TTL 254).
    const LABELS: [u8; 8] = [0x00, 0x01, 0x00, 0x01, 0xAB, 0xCD, 0xEB, 0xFE];

    /// [`LABELS`] decoded (scamper prints them as labels 16 and 703710).
    pub(crate) const TWO_LABELS: [MplsLabel; 2] = [
        MplsLabel {
            label: 16,
            exp: 0,
            bottom: false,
            ttl: 1,
        },
        MplsLabel {
            label: 0xABCDE,
            exp: 5,
            bottom: true,
            ttl: 254,
        },
    ];

    #[test]
    fn an_mpls_label_stack_after_the_padded_quote_is_found_and_read() {
        let ext = structure(&[(1, 1, &LABELS)]);
        let message = icmp6_with(&ext);
        let found = find(&message, Listener::IcmpV6).expect("extension");
        assert_eq!(found, ext.as_slice());
        let objects: Vec<Object<'_>> = objects(found).collect();
        assert_eq!(objects.len(), 1);
        assert!(objects[0].is_mpls());
        let entries: Vec<MplsLabel> = objects[0].mpls_entries().collect();
        assert_eq!(entries, TWO_LABELS);
    }

    #[test]
    fn every_object_is_kept_and_short_ones_are_skipped() {
        let interface = [0u8; 12];
        let ext = structure(&[(2, 0x0C, &interface), (3, 1, &[1, 2]), (1, 1, &LABELS)]);
        let classes: Vec<(u8, u8, usize)> = objects(&ext)
            .map(|o| (o.class, o.ctype, o.data.len()))
            .collect();
        assert_eq!(classes, [(2, 0x0C, 12), (1, 1, 8)]);
    }

    #[test]
    fn objects_stop_at_a_length_that_does_not_fit() {
        let mut ext = structure(&[(1, 1, &LABELS)]);
        // A second object claiming 64 bytes where 8 remain.
        ext.extend_from_slice(&[0, 64, 1, 1, 0, 0, 0, 0]);
        assert_eq!(objects(&ext).count(), 1);
        // A zero length ends the walk instead of looping on it.
        let mut zero = structure(&[]);
        zero.extend_from_slice(&[0, 0, 1, 1]);
        assert_eq!(objects(&zero).count(), 0);
    }

    #[test]
    fn no_extension_without_the_padding_the_version_or_a_right_checksum() {
        let ext = structure(&[(1, 1, &LABELS)]);
        // The quote is shorter than 128 bytes: what follows it is the quote.
        let mut short = vec![3, 0, 0, 0, 0, 0, 0, 0];
        short.extend_from_slice(&[0x60; 64]);
        short.extend_from_slice(&ext);
        assert_eq!(find(&short, Listener::IcmpV6), None);
        // Another version.
        let mut v1 = ext.clone();
        v1[0] = 0x10;
        assert_eq!(find(&icmp6_with(&v1), Listener::IcmpV6), None);
        // A wrong checksum; a zero one is not checked.
        let mut wrong = ext.clone();
        wrong[3] ^= 0xff;
        assert_eq!(find(&icmp6_with(&wrong), Listener::IcmpV6), None);
        let mut unchecked = ext.clone();
        unchecked[2..4].copy_from_slice(&[0, 0]);
        assert!(find(&icmp6_with(&unchecked), Listener::IcmpV6).is_some());
        // Only the header: nothing after it.
        assert_eq!(find(&icmp6_with(&ext[..4]), Listener::IcmpV6), None);
        // TCP answers carry no ICMP extensions.
        assert_eq!(find(&icmp6_with(&ext), Listener::TcpV6), None);
    }

    #[test]
    fn random_and_mutated_extensions_never_panic_and_objects_stay_inside() {
        let mut rng = crate::test_rng::Rng(0x2545_f491_4f6c_dd1d);
        let mut found = 0;
        for round in 0..20_000 {
            // A well-formed structure with up to 4 objects of up to 24 bytes, then mutated or
            // cut; every fourth round, noise.
            let written: Vec<(u8, u8, Vec<u8>)> = (0..rng.below(5))
                .map(|_| {
                    let data = (0..rng.below(25)).map(|_| rng.next() as u8).collect();
                    (1 + rng.below(3) as u8, rng.below(3) as u8, data)
                })
                .collect();
            let borrowed: Vec<(u8, u8, &[u8])> = written
                .iter()
                .map(|(c, t, d)| (*c, *t, d.as_slice()))
                .collect();
            let mut ext = structure(&borrowed);
            match round % 4 {
                0 => ext = (0..rng.below(160)).map(|_| rng.next() as u8).collect(),
                1 => {
                    let at = rng.below(ext.len());
                    ext[at] ^= 1 + rng.below(255) as u8;
                }
                2 => ext.truncate(rng.below(ext.len() + 1)),
                _ => {}
            }
            let message = icmp6_with(&ext);
            for listener in Listener::ALL {
                let Some(ext) = find(&message, listener) else {
                    continue;
                };
                found += 1;
                let mut inside = EXT_HEADER;
                for object in objects(ext) {
                    inside += OBJECT_HEADER + object.data.len();
                    assert!(
                        inside <= ext.len(),
                        "round {round}: {object:?} past the end"
                    );
                    assert!(object.data.len() >= 4);
                    for entry in object.mpls_entries() {
                        assert!(entry.label < 1 << 20 && entry.exp < 8);
                    }
                }
            }
        }
        // The success path was exercised too (unmutated and unchecked structures).
        assert!(found > 3_000, "{found}");
    }

    #[test]
    fn ipv4_messages_are_read_past_their_ip_header() {
        let ext = structure(&[(1, 1, &LABELS)]);
        let mut icmp = vec![11, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&[0x45; PADDED_QUOTE]);
        icmp.extend_from_slice(&ext);
        let total = u16::try_from(20 + icmp.len()).expect("fits");
        let mut packet = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 77, 1, 2, 10, 77, 1, 1,
        ];
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&icmp);
        assert_eq!(find(&packet, Listener::IcmpV4), Some(ext.as_slice()));
        // Some IPv4 routers put the version in the whole first byte (checksum not computed
        // here); on IPv6 that is not version 2.
        let at = 20 + ICMP_HEADER + PADDED_QUOTE;
        let mut old = packet.clone();
        old[at..at + 4].copy_from_slice(&[0x02, 0, 0, 0]);
        assert!(find(&old, Listener::IcmpV4).is_some());
        assert_eq!(find(&old[20..], Listener::IcmpV6), None);
        // Truncated IP header: nothing.
        assert_eq!(find(&packet[..12], Listener::IcmpV4), None);
    }
}
