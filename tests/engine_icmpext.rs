//! A router that puts its MPLS label stack in its Time Exceeded messages (RFC 4884 extension
//! structure, RFC 4950 object): the in-process engine prints it as scamper prints it. Needs
//! root (namespaces, raw and packet sockets, nftables); fails in CI when it cannot run.
//!
//! Linux routers add no ICMP extensions, so r2 is made into one: an nftables rule in r2 drops
//! the Time Exceeded messages its kernel sends, and a responder in r2 (a packet socket that
//! sees every probe arriving with TTL 1, and a raw socket whose packets carry a mark the rule
//! lets through) answers each such probe as an MPLS router would: the probe quoted and padded
//! to 128 bytes, then an extension structure holding one label stack entry. The engine and
//! scamper then trace the same flow through it; both must print the same `icmpext` at TTL 2
//! and none at any other TTL. IPv4 and IPv6.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::backends::{lab_engine, lab_scamper};
use common::lab::{Family, Lab, require_root};
use common::raw::{checksum, socket_in};
use common::requests::paris_request;
use hoptrace_backends::engine::EngineOptions;
use hoptrace_backends::{MplsLabel, TraceOutput, TraceRequest, Tracer};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    bind, recvfrom, sendto, setsockopt, socket, sockopt,
};

/// Bound on one trace (the lab answers in well under a millisecond).
const DEADLINE: Duration = Duration::from_secs(20);
/// Bound on the responder, whatever happens to the test.
const RESPONDER_LIMIT: Duration = Duration::from_secs(120);
/// The mark of the responder's packets, which r2's rule lets through.
const MARK: u32 = 0x4d50;
/// The label r2 reports: entry label 16, experimental bits 0, bottom of stack, TTL 1.
const LABEL_ENTRY: [u8; 4] = [0x00, 0x01, 0x01, 0x01];
/// How scamper prints that stack (and the engine must too), byte for byte.
const ICMPEXT: &str = r#""icmpext":[{"ie_cn":1,"ie_ct":1,"ie_dl":4,"mpls_labels":[{"mpls_ttl":1,"mpls_s":1,"mpls_exp":0,"mpls_label":16}]}]"#;
/// `sll_pkttype` of a packet this host sends (the others arrived).
const PACKET_OUTGOING: u8 = 4;

impl Family {
    /// The nftables rule dropping r2's own Time Exceeded messages (not the responder's).
    fn rule(self) -> &'static str {
        match self {
            Family::V4 => "icmp type time-exceeded",
            Family::V6 => "icmpv6 type time-exceeded",
        }
    }

    /// Whether `packet` (an IP packet a packet socket in r2 saw arrive) is a probe from
    /// `client` that expires at r2: TTL / hop limit 1.
    fn expires_here(self, packet: &[u8], client: IpAddr) -> bool {
        match (self, client) {
            (Family::V4, IpAddr::V4(c)) => {
                packet.len() >= 28
                    && packet[0] >> 4 == 4
                    && packet[8] == 1
                    && packet[12..16] == c.octets()
            }
            (Family::V6, IpAddr::V6(c)) => {
                packet.len() >= 48
                    && packet[0] >> 4 == 6
                    && packet[7] == 1
                    && packet[8..24] == c.octets()
            }
            _ => false,
        }
    }
}

/// Drops the Time Exceeded messages r2's kernel sends, except the responder's.
fn silence_r2(lab: &Lab, family: Family) {
    let rules = format!(
        "table inet hoptrace_mpls {{\n\
         \tchain out {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\t{} meta mark != {MARK:#x} drop\n\
         \t}}\n\
         }}\n",
        family.rule()
    );
    lab.nft("r2", &rules);
}

/// An extension structure (RFC 4884) holding `objects` (class, type, data), with its checksum.
fn structure(objects: &[(u8, u8, &[u8])]) -> Vec<u8> {
    let mut ext = vec![0x20, 0, 0, 0];
    for (class, ctype, data) in objects {
        let len = u16::try_from(4 + data.len()).expect("fits");
        ext.extend_from_slice(&len.to_be_bytes());
        ext.extend_from_slice(&[*class, *ctype]);
        ext.extend_from_slice(data);
    }
    let sum = checksum(&[&ext]);
    ext[2..4].copy_from_slice(&sum.to_be_bytes());
    ext
}

/// The ICMP(v6) Time Exceeded an MPLS router sends for `probe` (the IP packet as it arrived,
/// TTL 1): the quote padded to 128 bytes (RFC 4884's length field set), then `extension`. The ICMPv4 checksum is filled in; an ICMPv6
/// socket fills in its own.
fn time_exceeded_with(family: Family, probe: &[u8], extension: &[u8]) -> Vec<u8> {
    let mut quote = probe[..probe.len().min(128)].to_vec();
    quote.resize(128, 0);
    // Type, code 0, checksum, then the quote's length: in 32-bit words in the second unused
    // byte on IPv4, in 64-bit words in the first on IPv6.
    let mut icmp = match family {
        Family::V4 => vec![11, 0, 0, 0, 0, 32, 0, 0],
        Family::V6 => vec![3, 0, 0, 0, 16, 0, 0, 0],
    };
    icmp.extend_from_slice(&quote);
    icmp.extend_from_slice(extension);
    if let Family::V4 = family {
        let sum = checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    icmp
}

/// `icmp` in an IPv4 header from `router` to the probe's source.
fn ipv4_packet(router: Ipv4Addr, probe: &[u8], icmp: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + icmp.len()).expect("fits");
    let mut packet = vec![0x45, 0xc0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    packet.extend_from_slice(&router.octets());
    packet.extend_from_slice(&probe[12..16]);
    let sum = checksum(&[&packet]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(icmp);
    packet
}

/// The responder in r2 (see the module docs); stops when told or after [`RESPONDER_LIMIT`], and
/// returns how many probes it answered.
struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Responder {
    /// Opens its sockets in r2 (checked) before returning, so no probe passes unanswered.
    fn start(lab: &Lab, family: Family, router: IpAddr, extension: Vec<u8>) -> Self {
        let r2 = lab.ns("r2");
        let ethertype = match family {
            Family::V4 => SockProtocol::EthIp,
            Family::V6 => SockProtocol::EthIpv6,
        };
        let capture = socket_in(&r2, || {
            socket(
                AddressFamily::Packet,
                SockType::Datagram,
                SockFlag::SOCK_NONBLOCK,
                ethertype,
            )
        });
        // IPv4: whole packets, ours from r2's address; IPv6: ICMPv6 messages the kernel wraps
        // (and checksums) from the address the socket is bound to.
        let send = socket_in(&r2, || {
            let fd = match router {
                IpAddr::V4(_) => socket(
                    AddressFamily::Inet,
                    SockType::Raw,
                    SockFlag::empty(),
                    SockProtocol::Raw,
                )?,
                IpAddr::V6(r) => {
                    let fd = socket(
                        AddressFamily::Inet6,
                        SockType::Raw,
                        SockFlag::empty(),
                        SockProtocol::IcmpV6,
                    )?;
                    bind(
                        fd.as_raw_fd(),
                        &SockaddrIn6::from(SocketAddrV6::new(r, 0, 0, 0)),
                    )?;
                    fd
                }
            };
            setsockopt(&fd, sockopt::Mark, &MARK)?;
            Ok(fd)
        });
        let client = family.client();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let reply = |probe: &[u8]| time_exceeded_with(family, probe, &extension);
            answer_probes(&capture, &send, family, router, client, reply, &flag)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("responder thread")
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer_probes(
    capture: &OwnedFd,
    send: &OwnedFd,
    family: Family,
    router: IpAddr,
    client: IpAddr,
    reply: impl Fn(&[u8]) -> Vec<u8>,
    stop: &AtomicBool,
) -> usize {
    let limit = Instant::now() + RESPONDER_LIMIT;
    let mut buf = [0u8; 2048];
    let mut answered = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
        let mut fds = [PollFd::new(capture.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(50u16)).expect("poll") == 0 {
            continue;
        }
        // Everything queued, then back to the checks.
        for _ in 0..64 {
            let Ok((n, Some(from))) = recvfrom::<LinkAddr>(capture.as_raw_fd(), &mut buf) else {
                break;
            };
            let probe = &buf[..n];
            if from.pkttype() == PACKET_OUTGOING || !family.expires_here(probe, client) {
                continue;
            }
            let icmp = reply(probe);
            let sent = match (router, client) {
                (IpAddr::V4(r), IpAddr::V4(c)) => sendto(
                    send.as_raw_fd(),
                    &ipv4_packet(r, probe, &icmp),
                    &SockaddrIn::from(SocketAddrV4::new(c, 0)),
                    MsgFlags::empty(),
                ),
                (_, IpAddr::V6(c)) => sendto(
                    send.as_raw_fd(),
                    &icmp,
                    &SockaddrIn6::from(SocketAddrV6::new(c, 0, 0, 0)),
                    MsgFlags::empty(),
                ),
                _ => unreachable!("one family"),
            };
            sent.expect("send the reply");
            answered += 1;
        }
    }
    answered
}

/// The TTLs of the hops of `out` that have an `icmpext` key.
fn ttls_with_icmpext(out: &TraceOutput) -> Vec<u64> {
    let line = out.lines.lines().nth(1).expect("trace line");
    let trace: serde_json::Value = serde_json::from_str(line).expect("trace JSON");
    (trace["hops"].as_array().expect("hops").iter())
        .filter(|h| h.get("icmpext").is_some())
        .map(|h| h["probe_ttl"].as_u64().expect("probe_ttl"))
        .collect()
}

/// The engine's trace and scamper's of one flow through r2 answering with `extension`, after
/// checking both completed over the lab's path from the client.
async fn trace_both(family: Family, extension: Vec<u8>) -> (TraceOutput, TraceOutput) {
    let lab = Lab::up();
    let (dst, router) = (family.dst(&lab, 5), family.hops(&lab)[1][0]);
    silence_r2(&lab, family);
    let responder = Responder::start(&lab, family, router, extension);
    let request = TraceRequest {
        source_port: Some(40000),
        ..paris_request(dst, DEADLINE)
    };
    let engine = lab_engine(
        &lab,
        EngineOptions {
            pps: 0,
            ..EngineOptions::default()
        },
    );
    let ours = engine.trace(&request).await.expect("engine trace");
    engine.shutdown().await;
    let tools = tempfile::tempdir().expect("tempdir");
    let theirs = lab_scamper(&lab, tools.path())
        .trace(&request)
        .await
        .expect("scamper trace");
    let answered = responder.stop();
    eprintln!("ours {}\ntheirs {}", ours.lines, theirs.lines);
    assert!(answered >= 2, "the responder answered {answered} probes");
    for (name, out) in [("engine", &ours), ("scamper", &theirs)] {
        assert_eq!(out.summary.src, Some(family.client()), "{name}");
        assert_eq!(
            out.summary.stop_reason.as_deref(),
            Some("COMPLETED"),
            "{name}"
        );
        assert_eq!(out.summary.hops[1].addr, router, "{name}");
    }
    (ours, theirs)
}

/// The hops of `out` with MPLS labels, as (TTL, labels).
fn labelled(out: &TraceOutput) -> Vec<(u8, &[MplsLabel])> {
    (out.summary.hops.iter())
        .filter(|h| !h.mpls_labels.is_empty())
        .map(|h| (h.ttl, h.mpls_labels.as_slice()))
        .collect()
}

async fn mpls_labels_print_as_scamper_prints_them(family: Family) {
    let (ours, theirs) = trace_both(family, structure(&[(1, 1, &LABEL_ENTRY)])).await;
    for (name, out) in [("engine", &ours), ("scamper", &theirs)] {
        // The label at TTL 2 only, written byte for byte as scamper writes it, and in the
        // normalised hops that the gRPC record carries.
        assert_eq!(ttls_with_icmpext(out), [2], "{name}: {}", out.lines);
        assert_eq!(
            out.lines.matches(ICMPEXT).count(),
            1,
            "{name}: {}",
            out.lines
        );
        let label = MplsLabel {
            label: 16,
            exp: 0,
            bottom: true,
            ttl: 1,
        };
        assert_eq!(labelled(out), [(2, [label].as_slice())], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpls_labels_in_time_exceeded_print_as_scamper_prints_them_v4() {
    if require_root("mpls_labels_in_time_exceeded_print_as_scamper_prints_them_v4") {
        mpls_labels_print_as_scamper_prints_them(Family::V4).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpls_labels_in_time_exceeded_print_as_scamper_prints_them_v6() {
    if require_root("mpls_labels_in_time_exceeded_print_as_scamper_prints_them_v6") {
        mpls_labels_print_as_scamper_prints_them(Family::V6).await;
    }
}

/// A label stack beside an interface information object (RFC 5837): the engine keeps both
/// objects and the labels; scamper 20211212 prints neither (its object walk stops at an object
/// that ends before the structure does), as `engine::icmpext` documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_stack_beside_another_object_is_kept_where_scamper_drops_both() {
    if !require_root("a_label_stack_beside_another_object_is_kept_where_scamper_drops_both") {
        return;
    }
    let interface = [0u8; 8];
    let extension = structure(&[(2, 0x0C, &interface), (1, 1, &LABEL_ENTRY)]);
    let (ours, theirs) = trace_both(Family::V4, extension).await;
    let both = r#""icmpext":[{"ie_cn":2,"ie_ct":12,"ie_dl":8},{"ie_cn":1,"ie_ct":1,"ie_dl":4,"mpls_labels":[{"mpls_ttl":1,"mpls_s":1,"mpls_exp":0,"mpls_label":16}]}]"#;
    assert_eq!(ours.lines.matches(both).count(), 1, "{}", ours.lines);
    assert_eq!(labelled(&ours).len(), 1);
    assert_eq!(
        ttls_with_icmpext(&theirs),
        Vec::<u64>::new(),
        "{}",
        theirs.lines
    );
    assert!(labelled(&theirs).is_empty());
}
