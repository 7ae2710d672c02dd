//! Replies forged from inside the lab never become hops of the in-process engine (issue 3,
//! item 5). Needs root (namespaces, raw sockets); fails in CI when it cannot run.
//!
//! Trace A (Paris UDP, fixed ports) runs first while a raw ICMP socket in the client namespace
//! copies the genuine replies it gets. Then, while rounds of traces run, a raw socket in r2
//! (`IPPROTO_RAW`, so the outer source can be an address on no path: 10.77.99.1 / fd77:99::1)
//! sends the client, every millisecond, Time Exceeded and Port Unreachable messages quoting:
//!
//! - **inner destination**: A's genuine TTL-3 quote naming another destination, one a running
//!   trace probes with the same ports: only the tag stands between it and that trace;
//! - **source port** / **destination port**: the same quote with one port changed (the source
//!   port to a running trace's), keeping A's tag: a forger copying a valid tag onto another flow;
//! - **truncated L4** (4 bytes of UDP: ports only) and **truncated IP** (cut inside the quoted
//!   IP header);
//! - **guessed tag**: A's quote with the tag bits changed (UDP checksum; IPv4 also the IP ID's
//!   tag byte, IPv6 the payload's tag word): a forger guessing the tag of a known flow and TTL;
//! - **other key**: a probe of the very flow and TTL, encoded with another [`ProbeKey`]: the
//!   probes of another engine, or of this one before a restart.
//!
//! Every one must be refused: counted as a stray (failed decoding or the tag check), or as
//! late when the flow it names has no running trace (the tag is keyed with the salt of the
//! trace that owns the flow, so without one there is nothing to check it against). The
//! counters grow by at least the number sent, so the test cannot pass with forgeries that never
//! arrived, and every trace must stay the lab's path with no forged source at any TTL. A
//! byte-exact **replay** of A's reply (only the outer source changed) is sent along, while no
//! trace of A's flow runs.
//!
//! What this cannot model: a forger on the path (r2 forwards every probe, so it could quote
//! one; no tag can tell that from a router's answer).
//!
//! A byte-exact replay of A's reply while a later trace of the *same* flow runs (the
//! `replay_of_the_same_flow_never_becomes_a_hop_*` tests) used to become an extra hop at TTL 3:
//! the tag covered flow, TTL and attempt only. Each trace now has its own salt in the tag, so
//! the replay fails the later trace's tag check.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::lab::{Family, Lab, require_root};
use common::raw::{checksum, socket_in};
use common::requests::paris_request;
use hoptrace_backends::engine::{
    Engine, EngineOptions, EngineStats, Flow, ProbeId, ProbeKey, UDP_DPORT, encode,
};
use hoptrace_backends::{Method, Probe, TraceOutput, TraceRequest, Tracer};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    SockaddrStorage, recvfrom, sendto, socket,
};

/// Bound on one trace (the lab answers in well under a millisecond).
const DEADLINE: Duration = Duration::from_secs(20);
/// The traced flow's source port, and the one a second running flow uses.
const SPORT: u16 = 40000;
const OTHER_SPORT: u16 = 40001;
/// The TTL whose genuine quote the forgeries start from (r3a or r3b answers it).
const FORGED_TTL: u8 = 3;
/// Rounds of traces run while forging; the forger stops after them or after `FORGE_MAX`.
const ROUNDS: usize = 20;
const FORGE_EVERY: Duration = Duration::from_millis(1);
const FORGE_MAX: Duration = Duration::from_secs(2);
/// How long forged packets may take to be counted once the forger stopped.
const SETTLE: Duration = Duration::from_secs(5);

impl Family {
    /// The outer source of every forgery: no lab node has it.
    fn forged_src(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 77, 99, 1).into(),
            Family::V6 => Ipv6Addr::new(0xfd77, 0x99, 0, 0, 0, 0, 0, 1).into(),
        }
    }

    /// Length of the quoted IP header (our probes carry no options or extension headers).
    fn ip_len(self) -> usize {
        match self {
            Family::V4 => 20,
            Family::V6 => 40,
        }
    }

    /// Where the quoted IP header holds the destination address.
    fn dst_at(self) -> std::ops::Range<usize> {
        match self {
            Family::V4 => 16..20,
            Family::V6 => 24..40,
        }
    }

    /// (type, code) of Time Exceeded and of Port Unreachable.
    fn kinds(self) -> [(u8, u8); 2] {
        match self {
            Family::V4 => [(11, 0), (3, 3)],
            Family::V6 => [(3, 0), (1, 4)],
        }
    }

    /// The probe's state word (`ttl << 10 | attempt << 8 | tag`) in a quote: IPv4 IP ID,
    /// IPv6 first payload word.
    fn state(self, quote: &[u8]) -> Option<u16> {
        let at = match self {
            Family::V4 => 4,
            Family::V6 => 40 + 8,
        };
        quote
            .get(at..at + 2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]))
    }

    /// A whole IP packet from `src` to the client carrying ICMP `kind` that quotes `quote`.
    fn reply(self, src: IpAddr, (icmp_type, code): (u8, u8), quote: &[u8]) -> Vec<u8> {
        let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quote);
        let len = u16::try_from(icmp.len()).expect("short quote");
        let mut packet = match (src, self.client()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let sum = checksum(&[&icmp]);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                // The kernel fills in the header checksum (IP_HDRINCL) and, as it is 0, the ID.
                let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
                ip[2..4].copy_from_slice(&(len + 20).to_be_bytes());
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let (s, d) = (s.octets(), d.octets());
                let pseudo_len = u32::from(len).to_be_bytes();
                let sum = checksum(&[&s, &d, &pseudo_len, &[0, 0, 0, 58], &icmp]);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                ipv6_header(s, d, 58, 64, len)
            }
            _ => unreachable!("family addresses"),
        };
        packet.extend_from_slice(&icmp);
        packet
    }
}

/// An IPv6 header with no traffic class or flow label.
fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: u8, hop_limit: u8, len: u16) -> Vec<u8> {
    let mut header = vec![0x60, 0, 0, 0];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend([next, hop_limit]);
    header.extend_from_slice(&src);
    header.extend_from_slice(&dst);
    header
}

/// Recomputes a quoted IPv4 header's checksum, so only the field a forgery changes is wrong.
fn fix_v4_header(quote: &mut [u8]) {
    quote[10..12].fill(0);
    let sum = checksum(&[&quote[..20]]);
    quote[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// A raw socket opened inside lab namespace `name` (checked).
fn raw_socket_in(name: &str, family: Family, protocol: SockProtocol) -> OwnedFd {
    let domain = match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    socket_in(name, || {
        socket(domain, SockType::Raw, SockFlag::SOCK_NONBLOCK, protocol)
    })
}

/// An engine in the lab's client namespace (checked), with no probe budget.
fn lab_engine(lab: &Lab) -> Engine {
    common::backends::lab_engine(
        lab,
        EngineOptions {
            pps: 0,
            ..EngineOptions::default()
        },
    )
}

fn request(dst: IpAddr, sport: u16) -> TraceRequest {
    TraceRequest {
        method: Method::Paris(Probe::Udp),
        source_port: Some(sport),
        ..paris_request(dst, DEADLINE)
    }
}

/// The trace is the lab's path, TTL 1 to 5, one genuine answer each, and no forged source.
fn assert_lab_path(out: &TraceOutput, family: Family, alternatives: &[Vec<IpAddr>]) {
    let summary = &out.summary;
    let ttls: Vec<u8> = summary.hops.iter().map(|h| h.ttl).collect();
    let completed = summary.stop_reason.as_deref() == Some("COMPLETED");
    assert!(completed && ttls == [1, 2, 3, 4, 5], "{}", out.lines);
    for hop in &summary.hops {
        assert_ne!(hop.addr, family.forged_src(), "{}", out.lines);
        let genuine = match alternatives.get(usize::from(hop.ttl) - 1) {
            Some(choices) => choices.contains(&hop.addr),
            None => hop.addr == summary.dst,
        };
        assert!(
            genuine,
            "ttl {}: {} forged\n{}",
            hop.ttl, hop.addr, out.lines
        );
    }
}

/// Genuine ICMP errors for `flow` read so far by `capture` (a raw socket in the client
/// namespace), as quotes with the TTL of the probe they quote.
fn genuine_quotes(capture: &OwnedFd, family: Family, flow: &Flow) -> Vec<(u8, Vec<u8>)> {
    let mut quotes = Vec::new();
    let mut buf = [0u8; 1500];
    // Raw sockets get their copy when the engine's does: once the trace saw its replies,
    // they are all queued here.
    while let Ok((n, _)) = recvfrom::<SockaddrStorage>(capture.as_raw_fd(), &mut buf) {
        let packet = &buf[..n];
        // IPv4 raw sockets return the IP header, IPv6 ones the ICMPv6 message.
        let icmp = match (family, packet.first()) {
            (Family::V4, Some(b)) => packet.get(usize::from(b & 0xf) * 4..).unwrap_or_default(),
            _ => packet,
        };
        let Some(quote) = icmp.get(8..) else { continue };
        let l4 = family.ip_len();
        let quotes_flow = family.kinds().iter().any(|k| k.0 == icmp[0])
            && quote.len() >= l4 + 16
            && quote[family.dst_at()] == ip_octets(flow.dst)[..]
            && quote[l4..l4 + 2] == flow.sport.to_be_bytes();
        match family.state(quote) {
            Some(state) if quotes_flow => {
                quotes.push(((state >> 10) as u8, quote[..l4 + 16].to_vec()));
            }
            _ => {}
        }
    }
    quotes
}

fn ip_octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Every forged quote, by name (see the module docs), built from `genuine`, the quote of
/// the TTL-`FORGED_TTL` probe of `flow`; `elsewhere` is the destination of another running flow.
fn forged_quotes(
    family: Family,
    flow: &Flow,
    genuine: &[u8],
    elsewhere: IpAddr,
) -> Vec<(&'static str, Vec<u8>)> {
    let l4 = family.ip_len();
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut quote = genuine.to_vec();
        f(&mut quote);
        if family == Family::V4 {
            fix_v4_header(&mut quote);
        }
        quote
    };
    let mut other_key = Vec::new();
    let id = ProbeId {
        ttl: FORGED_TTL,
        attempt: 0,
    };
    encode(flow, id, &ProbeKey::random(), &mut other_key).expect("encode");
    let other_key = match (flow.src, flow.dst) {
        // As a router quotes it: TTL 1 left.
        (IpAddr::V4(_), _) => edit(&|q| {
            *q = other_key.clone();
            q[8] = 1;
        }),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(other_key.len()).expect("short probe");
            let mut quote = ipv6_header(s.octets(), d.octets(), 17, 1, len);
            quote.extend_from_slice(&other_key);
            quote
        }
        _ => unreachable!("family addresses"),
    };
    vec![
        (
            "inner destination",
            edit(&|q| q[family.dst_at()].copy_from_slice(&ip_octets(elsewhere))),
        ),
        (
            "source port",
            edit(&|q| q[l4..l4 + 2].copy_from_slice(&OTHER_SPORT.to_be_bytes())),
        ),
        ("destination port", edit(&|q| q[l4 + 3] ^= 1)),
        ("truncated L4", edit(&|q| q.truncate(l4 + 4))),
        ("truncated IP", genuine[..12].to_vec()),
        ("guessed tag: checksum", edit(&|q| q[l4 + 6] ^= 0x5a)),
        (
            "guessed tag: state",
            edit(&|q| match family {
                Family::V4 => q[5] ^= 0x5a,
                Family::V6 => q[l4 + 10] ^= 0x5a,
            }),
        ),
        ("other key", other_key),
    ]
}

/// Sends each packet every `FORGE_EVERY` from `socket` to the client until `stop` (at most
/// `FORGE_MAX`); returns how many of each were sent. `started` fires after the first round.
fn forge(
    socket: OwnedFd,
    family: Family,
    packets: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
    started: tokio::sync::oneshot::Sender<()>,
) -> Vec<u64> {
    let to = SocketAddr::new(family.client(), 0);
    let (v4, v6);
    let to: &dyn nix::sys::socket::SockaddrLike = match to {
        SocketAddr::V4(a) => {
            v4 = SockaddrIn::from(a);
            &v4
        }
        SocketAddr::V6(a) => {
            v6 = SockaddrIn6::from(a);
            &v6
        }
    };
    let mut sent = vec![0; packets.len()];
    let mut started = Some(started);
    let until = Instant::now() + FORGE_MAX;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        for (packet, count) in packets.iter().zip(&mut sent) {
            if sendto(socket.as_raw_fd(), packet, to, MsgFlags::empty()) == Ok(packet.len()) {
                *count += 1;
            }
        }
        if let Some(started) = started.take() {
            let _ = started.send(());
        }
        std::thread::sleep(FORGE_EVERY);
    }
    sent
}

/// A lab, an engine in its client namespace, and the genuine quote of the TTL-`FORGED_TTL` probe
/// of `flow`, copied from trace A's replies.
struct Setup {
    family: Family,
    lab: Lab,
    engine: Engine,
    flow: Flow,
    genuine: Vec<u8>,
}

async fn setup(family: Family) -> Setup {
    let lab = Lab::up();
    let engine = lab_engine(&lab);
    let icmp = match family {
        Family::V4 => SockProtocol::Icmp,
        Family::V6 => SockProtocol::IcmpV6,
    };
    let flow = Flow {
        src: family.client(),
        dst: family.dst(&lab, 5),
        probe: Probe::Udp,
        sport: SPORT,
        dport: UDP_DPORT,
        salt: 0,
    };
    let capture = raw_socket_in(&lab.client_ns(), family, icmp);
    let a = engine
        .trace(&request(flow.dst, SPORT))
        .await
        .expect("trace A");
    assert_lab_path(&a, family, &family.hops(&lab));
    let quotes = genuine_quotes(&capture, family, &flow);
    let genuine = quotes
        .iter()
        .find(|(ttl, _)| *ttl == FORGED_TTL)
        .map(|(_, q)| q.clone())
        .unwrap_or_else(|| panic!("no genuine quote of ttl {FORGED_TTL} in {quotes:?}"));
    Setup {
        family,
        lab,
        engine,
        flow,
        genuine,
    }
}

impl Setup {
    /// Runs `ROUNDS` rounds of `requests` (concurrently within a round) while r2 sends
    /// `packets`; every trace must be the lab's path. Returns how many of each packet were sent
    /// and the engine's counters from before the forger started.
    async fn trace_while_forging(
        &self,
        requests: &[TraceRequest],
        packets: Vec<Vec<u8>>,
    ) -> (Vec<u64>, EngineStats) {
        let family = self.family;
        let socket = raw_socket_in(&self.lab.ns("r2"), family, SockProtocol::Raw);
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let before = self.engine.stats();
        let forger = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || forge(socket, family, packets, stop, started_tx))
        };
        started.await.expect("forger started");
        let alternatives = family.hops(&self.lab);
        let mut outs = Vec::new();
        for _ in 0..ROUNDS {
            outs.extend(
                futures::future::join_all(requests.iter().map(|r| self.engine.trace(r))).await,
            );
        }
        stop.store(true, Ordering::Relaxed);
        let sent = forger.join().expect("forger thread");
        for out in outs {
            assert_lab_path(&out.expect("trace"), family, &alternatives);
        }
        (sent, before)
    }
}

/// Every forgery in both kinds (Time Exceeded, Port Unreachable) is a stray while traces of
/// the flows it alters run; the genuine quote replayed as is, while no trace of its flow runs,
/// is counted late (which also shows the forged packets are well-formed: only what each
/// forgery alters makes it a stray).
async fn forged_replies_never_become_hops(family: Family) {
    let setup = setup(family).await;
    let Setup { lab, flow, .. } = &setup;
    let elsewhere = family.dst(lab, 6);
    let forged_src = family.forged_src();
    let mut names = Vec::new();
    let mut packets = Vec::new();
    let quotes = forged_quotes(family, flow, &setup.genuine, elsewhere);
    for (name, quote) in quotes.iter().chain([&("replay", setup.genuine.clone())]) {
        for kind in family.kinds() {
            names.push(*name);
            packets.push(family.reply(forged_src, kind, quote));
        }
    }
    // A flow to another destination with the same ports, and one with another source port:
    // the forgeries that alter a field name one of these. The traced flow itself does not
    // run (see `replay_of_the_same_flow_never_becomes_a_hop`).
    let requests = [request(elsewhere, SPORT), request(flow.dst, OTHER_SPORT)];
    let (sent, before) = setup.trace_while_forging(&requests, packets).await;

    let replays: u64 = names
        .iter()
        .zip(&sent)
        .filter(|(n, _)| **n == "replay")
        .map(|(_, c)| c)
        .sum();
    let forged = sent.iter().sum::<u64>() - replays;
    let engine = &setup.engine;
    let until = Instant::now() + SETTLE;
    let mut stats = engine.stats();
    // Refused either way: as strays (failed decoding or the tag check), or as late when the
    // flow they name has no running trace (nothing to check their tag against).
    let refused = |s: &EngineStats| (s.strays - before.strays) + (s.late - before.late);
    while refused(&stats) < forged + replays && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
        stats = engine.stats();
    }
    for (name, count) in names.iter().zip(&sent) {
        eprintln!("{family:?} {name}: {count} sent");
    }
    eprintln!("{family:?} before {before:?}\nafter {stats:?}");
    assert!(forged > 0 && replays > 0, "nothing was sent");
    assert!(
        refused(&stats) >= forged + replays,
        "{forged} forgeries and {replays} replays sent, {} refused",
        refused(&stats)
    );
    assert_eq!(stats.kernel_drops, 0, "{stats:?}");
    engine.shutdown().await;
}

/// A byte-exact replay of trace A's genuine TTL-3 reply (Time Exceeded and Port Unreachable),
/// from an address on no path, while traces of the same flow run.
async fn replay_of_the_same_flow(family: Family) {
    let setup = setup(family).await;
    let packets = family
        .kinds()
        .map(|kind| family.reply(family.forged_src(), kind, &setup.genuine))
        .to_vec();
    let requests = [request(setup.flow.dst, SPORT)];
    setup.trace_while_forging(&requests, packets).await;
    setup.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replies_never_become_hops_v4() {
    if !require_root("forged_replies_never_become_hops_v4") {
        return;
    }
    forged_replies_never_become_hops(Family::V4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replies_never_become_hops_v6() {
    if !require_root("forged_replies_never_become_hops_v6") {
        return;
    }
    forged_replies_never_become_hops(Family::V6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_same_flow_never_becomes_a_hop_v4() {
    if !require_root("replay_of_the_same_flow_never_becomes_a_hop_v4") {
        return;
    }
    replay_of_the_same_flow(Family::V4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_same_flow_never_becomes_a_hop_v6() {
    if !require_root("replay_of_the_same_flow_never_becomes_a_hop_v6") {
        return;
    }
    replay_of_the_same_flow(Family::V6).await;
}
