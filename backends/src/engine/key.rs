//! The per-engine secret and the keyed hash (SipHash-2-4) every tag is cut from.

use std::fmt;
use std::io::Read;
use std::net::IpAddr;

use super::ProbeId;
use crate::Probe;

/// A secret per engine instance, so forged replies, or replies to another engine's probes, fail
/// the integrity check.
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeKey([u8; 16]);

impl fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret: never log it.
        f.write_str("ProbeKey(..)")
    }
}

impl ProbeKey {
    /// A key from the given bytes (tests, or a key kept across restarts).
    pub fn new(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// A fresh random key.
    ///
    /// `getrandom` is not in this crate's dependency tree, so the bytes come from
    /// `/dev/urandom`; if that cannot be read, from two std `RandomState`s (seeded by the OS per
    /// process) hashed with the current time. The fallback is not cryptographic, but the tag only
    /// has to defeat off-path guessing for the life of one engine.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if read.is_err() {
            use std::hash::{BuildHasher, Hasher};
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            for half in bytes.chunks_exact_mut(8) {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(now);
                half.copy_from_slice(&h.finish().to_le_bytes());
            }
        }
        Self(bytes)
    }

    /// The keyed hash of one probe: (family, destination, protocol, ports, TTL, attempt) and
    /// the salt of the trace that sent it.
    pub(super) fn mac(
        &self,
        dst: IpAddr,
        probe: Probe,
        sport: u16,
        dport: u16,
        id: ProbeId,
        salt: u32,
    ) -> u64 {
        // Fixed-size message so hashing allocates nothing: family tag, address, then the rest.
        let mut msg = [0u8; 28];
        let addr_len = match dst {
            IpAddr::V4(a) => {
                msg[0] = 4;
                msg[1..5].copy_from_slice(&a.octets());
                4
            }
            IpAddr::V6(a) => {
                msg[0] = 6;
                msg[1..17].copy_from_slice(&a.octets());
                16
            }
        };
        let rest = 1 + addr_len;
        msg[rest] = match probe {
            Probe::Udp => 17,
            Probe::Icmp => 1,
            Probe::Tcp => 6,
        };
        // ICMP has no destination port: keep it out of the hash so decoding can recompute it.
        let dport = if probe == Probe::Icmp { 0 } else { dport };
        msg[rest + 1..rest + 3].copy_from_slice(&sport.to_be_bytes());
        msg[rest + 3..rest + 5].copy_from_slice(&dport.to_be_bytes());
        msg[rest + 5] = id.ttl;
        msg[rest + 6] = id.attempt;
        msg[rest + 7..rest + 11].copy_from_slice(&salt.to_be_bytes());
        siphash24(&self.0, &msg[..rest + 11])
    }
}

/// SipHash-2-4 (Aumasson & Bernstein), written out because no hashing crate is a dependency and
/// std's keyed `SipHasher` is deprecated.
pub(super) fn siphash24(key: &[u8; 16], msg: &[u8]) -> u64 {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
    ] = *key;
    let k0 = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
    let k1 = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    fn compress(m: u64, v: &mut [u64; 4]) {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    }
    let chunks = msg.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        compress(u64::from_le_bytes(word), &mut v);
    }
    // Last block: the remaining bytes, little-endian, with the length's low byte on top.
    let mut last = (msg.len() as u64) << 56;
    for (i, &byte) in tail.iter().enumerate() {
        last |= u64::from(byte) << (8 * i);
    }
    compress(last, &mut v);
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}
