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
//! and none at any other TTL.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::backends::{lab_engine, lab_scamper};
use common::lab::{Lab, require_root};
use common::raw::{checksum, socket_in};
use common::requests::paris_request;
use hoptrace_backends::engine::EngineOptions;
use hoptrace_backends::{TraceOutput, TraceRequest, Tracer};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom,
    sendto, setsockopt, socket, sockopt,
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

/// Drops the Time Exceeded messages r2's kernel sends, except the responder's.
fn silence_r2(lab: &Lab) {
    let rules = format!(
        "table ip hoptrace_mpls {{\n\
         \tchain out {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\ticmp type time-exceeded meta mark != {MARK:#x} drop\n\
         \t}}\n\
         }}\n"
    );
    let r2 = lab.ns("r2");
    let mut nft = std::process::Command::new("ip")
        .args(["netns", "exec", &r2, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run nft in r2");
    {
        use std::io::Write;
        let mut stdin = nft.stdin.take().expect("nft stdin");
        stdin.write_all(rules.as_bytes()).expect("write the rules");
    }
    assert!(nft.wait().expect("nft").success(), "nft rules in r2");
}

/// The Time Exceeded an MPLS router at `router` sends for `probe` (the IPv4 packet as it
/// arrived, TTL 1): quote padded to 128 bytes (RFC 4884's length field set), then an extension
/// structure with one MPLS label stack object.
fn time_exceeded_with_label(router: Ipv4Addr, probe: &[u8]) -> Vec<u8> {
    let mut quote = probe[..probe.len().min(128)].to_vec();
    quote.resize(128, 0);
    let mut extension = vec![0x20, 0, 0, 0, 0, 8, 1, 1];
    extension.extend_from_slice(&LABEL_ENTRY);
    let sum = checksum(&[&extension]);
    extension[2..4].copy_from_slice(&sum.to_be_bytes());
    // Type 11 code 0, checksum, unused, length of the padded quote in 32-bit words, unused.
    let mut icmp = vec![11, 0, 0, 0, 0, 32, 0, 0];
    icmp.extend_from_slice(&quote);
    icmp.extend_from_slice(&extension);
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = u16::try_from(20 + icmp.len()).expect("fits");
    let mut packet = vec![0x45, 0xc0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    packet.extend_from_slice(&router.octets());
    packet.extend_from_slice(&probe[12..16]);
    let sum = checksum(&[&packet]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(&icmp);
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
    fn start(lab: &Lab, router: Ipv4Addr, client: Ipv4Addr) -> Self {
        let r2 = lab.ns("r2");
        let capture = socket_in(&r2, || {
            socket(
                AddressFamily::Packet,
                SockType::Datagram,
                SockFlag::SOCK_NONBLOCK,
                SockProtocol::EthIp,
            )
        });
        let send = socket_in(&r2, || {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::Raw,
            )?;
            setsockopt(&fd, sockopt::Mark, &MARK)?;
            Ok(fd)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread =
            std::thread::spawn(move || answer_probes(&capture, &send, router, client, &flag));
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
    router: Ipv4Addr,
    client: Ipv4Addr,
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
            let packet = &buf[..n];
            // An IPv4 probe from the client arriving with TTL 1: it expires here.
            let expires = from.pkttype() != PACKET_OUTGOING
                && packet.len() >= 28
                && packet[0] >> 4 == 4
                && packet[8] == 1
                && packet[12..16] == client.octets();
            if !expires {
                continue;
            }
            let reply = time_exceeded_with_label(router, packet);
            let to = SockaddrIn::from(SocketAddrV4::new(client, 0));
            sendto(send.as_raw_fd(), &reply, &to, MsgFlags::empty()).expect("send the reply");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpls_labels_in_time_exceeded_print_as_scamper_prints_them() {
    if !require_root("mpls_labels_in_time_exceeded_print_as_scamper_prints_them") {
        return;
    }
    let lab = Lab::up();
    let dst = lab.dst_v4(5);
    let truth = lab.hops_v4();
    let IpAddr::V4(router) = truth[1][0] else {
        panic!("the lab's second hop is IPv4");
    };
    // The client's address on its link to r1 (`scripts/lab`), checked against the traces.
    let client = Ipv4Addr::new(10, 77, 1, 1);
    silence_r2(&lab);
    let responder = Responder::start(&lab, router, client);
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
        assert_eq!(out.summary.src, Some(IpAddr::V4(client)), "{name}");
        assert_eq!(
            out.summary.stop_reason.as_deref(),
            Some("COMPLETED"),
            "{name}"
        );
        assert_eq!(out.summary.hops[1].addr, IpAddr::V4(router), "{name}");
        // The label at TTL 2 only, written byte for byte as scamper writes it.
        assert_eq!(ttls_with_icmpext(out), [2], "{name}: {}", out.lines);
        assert_eq!(
            out.lines.matches(ICMPEXT).count(),
            1,
            "{name}: {}",
            out.lines
        );
    }
}
