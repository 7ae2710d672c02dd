//! Arbitrary bytes into every reply decoder and the ICMP extension reader: none may panic, and
//! whatever decodes must name a probe the key produced (re-encoding it gives a probe the
//! decoder accepts replies to).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hoptrace_backends::Probe;
use hoptrace_backends::engine::{self, Flow, Keys, ProbeKey};
use libfuzzer_sys::fuzz_target;

const FROM6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
const TO6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

fuzz_target!(|data: &[u8]| {
    // A fixed key: the fuzzer can then learn tags from the corpus and reach the success paths.
    let key = ProbeKey::new(*b"hoptrace-fuzzkey");
    // Every flow belongs to a running trace with salt 0, so tags are checked for any flow.
    let salt_of = |_: IpAddr, _: Probe, _: u16, _: u16| Some(0);
    let keys = Keys::new(&key, &salt_of);
    for listener in engine::Listener::ALL {
        if let Some(extension) = engine::icmpext::find(data, listener) {
            for object in engine::icmpext::objects(extension) {
                assert!(object.data.len() < extension.len());
                object.mpls_entries().for_each(drop);
            }
        }
    }
    let results = [
        engine::decode_v4(data, &keys),
        engine::decode_icmp6(data, FROM6, 64, &keys),
        engine::decode_tcp6(data, FROM6, TO6, 64, &keys),
    ];
    for reply in results.into_iter().flatten() {
        // Whatever decodes must be a probe this key can encode.
        let src = match reply.flow_dst {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V6(_) => IpAddr::V6(TO6),
        };
        let flow = Flow {
            src,
            dst: reply.flow_dst,
            probe: reply.probe,
            sport: reply.sport,
            dport: reply.dport,
            salt: 0,
        };
        let mut out = Vec::new();
        assert!(
            engine::encode(&flow, reply.id, &key, &mut out).is_ok(),
            "{reply:?}"
        );
    }
});
