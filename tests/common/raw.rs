//! Raw packets from inside the lab: sockets opened in a lab namespace (checked), and the
//! Internet checksum for the headers tests build by hand.

use std::os::fd::OwnedFd;

use hoptrace_backends::NetNs;
use hoptrace_backends::engine::ensure_thread_in;

use super::lab::{Lab, ns_id_of_pid};

/// A socket `open` creates inside lab namespace `name`, after checking the opening thread is
/// in it and that it is not this process's namespace.
pub fn socket_in(name: &str, open: impl FnOnce() -> nix::Result<OwnedFd> + Send) -> OwnedFd {
    assert_ne!(
        Lab::ns_id(name),
        ns_id_of_pid(std::process::id()),
        "{name} is the test's own namespace"
    );
    let ns = NetNs::open(name).expect("open lab namespace");
    ns.run_inside(|| {
        ensure_thread_in(&ns).expect("thread is in the lab namespace");
        open()
    })
    .expect("enter lab namespace")
    .expect("open socket")
}

/// The Internet checksum (RFC 1071) of the concatenated `parts` (all but the last of even
/// length).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for word in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
