//! This host's own TCP connections as a source of close events, learnt from the kernel.
//!
//! A netlink `sock_diag` socket joined to the TCP-destroy multicast groups
//! (`SKNLGRP_INET_TCP_DESTROY`, `SKNLGRP_INET6_TCP_DESTROY`) receives one `inet_diag_msg` per
//! TCP socket the kernel destroys, with its 4-tuple and cookie: no polling, so a close is seen
//! as it happens. Where the kernel does not offer those groups, the watcher dumps the
//! connected TCP sockets periodically (as tcp-info does) and reports those that vanished.
//! Each close becomes an event whose connection id has the shape tcp-info gives
//! (`<hostname>_<boot time>_<cookie %016X>`), so files from either source agree.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
};

use ipnet::IpNet;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use crate::{
    event::{RawEvent, Source},
    metrics::ReasonLabel,
    pipeline::Pipeline,
    policy::canonical,
};

/// `SKNLGRP_INET_TCP_DESTROY` (group 1) and `SKNLGRP_INET6_TCP_DESTROY` (group 3; group 2 is
/// IPv4 UDP) as the bind bitmask, where group n is bit n-1.
const TCP_DESTROY_GROUPS: u32 = 0b101;
/// `SOCK_DIAG_BY_FAMILY`: the message type of an `inet_diag_msg`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg` without attributes.
const INET_DIAG_MSG: usize = 72;
/// Receive buffer asked for, so bursts of closes are not dropped.
const RCVBUF: usize = 4 << 20;

/// A TCP socket as `sock_diag` reports it (destroyed, or listed by a dump).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destroyed {
    /// Local address (canonical).
    pub src: IpAddr,
    /// Local port.
    pub sport: u16,
    /// Remote address (canonical).
    pub dst: IpAddr,
    /// Remote port.
    pub dport: u16,
    /// The kernel's socket cookie.
    pub cookie: u64,
}

/// `NLMSG_ERROR` and `NLMSG_DONE`: the end of a dump.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// How a datagram ends a dump, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpEnd {
    /// `NLMSG_DONE`: every socket was listed.
    Done,
    /// `NLMSG_ERROR`: the dump stopped part way; what it listed is not the whole set.
    Failed,
}

/// Whether a datagram ends a dump, and how.
pub fn dump_end(bytes: &[u8]) -> Option<DumpEnd> {
    let mut at = 0;
    while at + NLMSG_HDR <= bytes.len() {
        let h = &bytes[at..];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        match kind {
            NLMSG_DONE => return Some(DumpEnd::Done),
            NLMSG_ERROR => return Some(DumpEnd::Failed),
            _ => {}
        }
        if len < NLMSG_HDR || len > h.len() {
            return None;
        }
        at += (len + 3) & !3;
    }
    None
}

/// A dump request (`inet_diag_req_v2`) for the connected TCP sockets of one family.
fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    // ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING:
    // a connection that leaves this set has closed (TIME_WAIT and CLOSE are left out).
    const CONNECTED: u32 =
        (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
    const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
    let mut m = Vec::with_capacity(NLMSG_HDR + 56);
    m.extend_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 6 /* IPPROTO_TCP */, 0, 0]);
    m.extend_from_slice(&CONNECTED.to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]);
    m
}

/// Every `inet_diag_msg` in one netlink datagram. Lengths are checked before every read: a
/// short or lying message ends the walk, never a panic.
pub fn parse_datagram(bytes: &[u8]) -> Vec<Destroyed> {
    let mut found = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR <= bytes.len() {
        let header = &bytes[at..];
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if len < NLMSG_HDR || len > header.len() {
            break;
        }
        if kind == SOCK_DIAG_BY_FAMILY && len >= NLMSG_HDR + INET_DIAG_MSG {
            found.extend(parse_inet_diag_msg(&header[NLMSG_HDR..len]));
        }
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    found
}

fn parse_inet_diag_msg(m: &[u8]) -> Option<Destroyed> {
    let family = *m.first()?;
    let sport = u16::from_be_bytes([*m.get(4)?, *m.get(5)?]);
    let dport = u16::from_be_bytes([*m.get(6)?, *m.get(7)?]);
    let addr = |at: usize| -> Option<IpAddr> {
        let raw: [u8; 16] = m.get(at..at + 16)?.try_into().ok()?;
        match family {
            2 => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            10 => Some(canonical(IpAddr::V6(Ipv6Addr::from(raw)))),
            _ => None,
        }
    };
    let src = addr(8)?;
    let dst = addr(24)?;
    let cookie_lo = u32::from_ne_bytes(m.get(44..48)?.try_into().ok()?);
    let cookie_hi = u32::from_ne_bytes(m.get(48..52)?.try_into().ok()?);
    Some(Destroyed {
        src,
        sport,
        dst,
        dport,
        cookie: u64::from(cookie_hi) << 32 | u64::from(cookie_lo),
    })
}

/// Watcher settings.
#[derive(Debug, Clone)]
pub struct HostSocketsConfig {
    /// Closes of connections on these local ports are ignored.
    pub exclude_local_ports: Vec<u16>,
    /// Closes of connections to these remote prefixes are ignored.
    pub exclude_remote: Vec<IpNet>,
    /// Close events waiting for the intake before new ones are dropped.
    pub queue: usize,
}

/// What the watcher counts (shared with the metrics registry).
#[derive(Debug, Clone, Default)]
pub struct HostSocketsCounters {
    /// Destroyed sockets by what became of them (see [`OUTCOMES`]).
    pub sockets: Family<ReasonLabel, Counter>,
}

/// Every outcome counted for a destroyed socket.
pub const OUTCOMES: [&str; 6] = [
    "reported",
    "not_connected",
    "excluded",
    "queue_full",
    "kernel_overflow",
    "poll_failed",
];

/// Why the watcher could not start or went on.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The netlink socket refused.
    #[error("cannot watch this host's TCP sockets: {0}")]
    Netlink(#[from] nix::Error),
    /// Registering or polling the socket failed.
    #[error("cannot watch this host's TCP sockets: {0}")]
    Io(#[from] std::io::Error),
}

/// How the watcher learns of closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The kernel announces every destroyed TCP socket.
    Destroy,
    /// Dump the connected sockets this often and report those that vanished.
    Poll(std::time::Duration),
}

/// A netlink `sock_diag` socket in the calling thread's network namespace, with the mode it
/// can serve.
#[derive(Debug)]
pub struct DiagSocket {
    fd: OwnedFd,
    mode: Mode,
}

impl DiagSocket {
    /// Joins the TCP-destroy groups; when the kernel refuses them, falls back to dumping every
    /// `poll` (tcp-info's own method). `force_poll` skips the groups (benchmarks, tests).
    pub fn open(poll: std::time::Duration, force_poll: bool) -> Result<Self, WatchError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkSockDiag,
        )?;
        // A bigger buffer, past `net.core.rmem_max` where the process may (CAP_NET_ADMIN,
        // before capabilities are dropped), else as far as the limit lets; the default still
        // works, with closes lost (and counted) in bursts the buffer cannot hold.
        if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
        }
        let destroy = !force_poll
            && bind(fd.as_raw_fd(), &NetlinkAddr::new(0, TCP_DESTROY_GROUPS))
                .inspect_err(|e| {
                    tracing::warn!(error = %e, ?poll, "kernel refuses the TCP-destroy groups; polling instead");
                })
                .is_ok();
        if !destroy {
            bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        }
        let mode = if destroy {
            Mode::Destroy
        } else {
            Mode::Poll(poll)
        };
        Ok(Self { fd, mode })
    }

    /// How this socket learns of closes.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// The connection-id prefix tcp-info uses: `<hostname>_<boot time in unix seconds>`.
pub fn id_prefix() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!("{host}_{boot}")
}

/// The watcher.
#[derive(Debug)]
pub struct HostSockets {
    config: HostSocketsConfig,
    counters: HostSocketsCounters,
    id_prefix: String,
}

impl HostSockets {
    /// A watcher; ids start with `id_prefix` (see [`id_prefix`]).
    pub fn new(
        config: HostSocketsConfig,
        counters: HostSocketsCounters,
        id_prefix: String,
    ) -> Self {
        Self {
            config,
            counters,
            id_prefix,
        }
    }

    fn count(&self, outcome: &'static str) {
        self.counters
            .sockets
            .get_or_create(&ReasonLabel { reason: outcome })
            .inc();
    }

    /// The close event for a destroyed socket, unless it is to be ignored.
    pub fn event(&self, d: &Destroyed) -> Option<RawEvent> {
        // Listeners and sockets that never connected have no remote end.
        if d.dport == 0 || d.dst.is_unspecified() {
            self.count("not_connected");
            return None;
        }
        if self.config.exclude_local_ports.contains(&d.sport)
            || self
                .config
                .exclude_remote
                .iter()
                .any(|n| n.contains(&d.dst))
        {
            self.count("excluded");
            return None;
        }
        Some(RawEvent {
            connection_id: format!("{}_{:016X}", self.id_prefix, d.cookie),
            local_addr: d.src.to_string(),
            local_port: u32::from(d.sport),
            remote_addr: d.dst.to_string(),
            remote_port: u32::from(d.dport),
            close_time: None,
            labels: Default::default(),
        })
    }

    /// Learns of closes through `socket` until `stop`, and hands their events to `pipeline`
    /// without ever waiting on it.
    pub async fn run(
        self,
        socket: DiagSocket,
        pipeline: Arc<Pipeline>,
        stop: watch::Receiver<bool>,
    ) -> Result<(), WatchError> {
        let (events, mut intake) = mpsc::channel::<RawEvent>(self.config.queue.max(1));
        let feeder = tokio::spawn(async move {
            while let Some(event) = intake.recv().await {
                let _ = pipeline.report(event, Source::HostSockets).await;
            }
        });
        let result = self.watch(socket, &events, stop).await;
        drop(events);
        let _ = feeder.await;
        result
    }

    /// Learns of closes through `socket` until `stop` and sends their events to `events`.
    pub async fn watch(
        &self,
        socket: DiagSocket,
        events: &mpsc::Sender<RawEvent>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), WatchError> {
        let mode = socket.mode;
        // SAFETY: an `OwnedFd` owns one open descriptor for as long as it lives and always
        // returns that same descriptor from `as_raw_fd`; the `AsyncFd` owns the `OwnedFd`.
        let fd =
            unsafe { AsyncFd::register_with_interest(socket.fd, tokio::io::Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut buf = vec![0u8; 64 * 1024];
        let closed = |d: &Destroyed| {
            if let Some(event) = self.event(d) {
                if events.try_send(event).is_ok() {
                    self.count("reported");
                } else {
                    self.count("queue_full");
                }
            }
        };
        match mode {
            Mode::Destroy => loop {
                let mut ready = tokio::select! {
                    ready = fd.readable() => ready?,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                };
                match recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(n) => parse_datagram(&buf[..n]).iter().for_each(closed),
                    Err(nix::Error::EAGAIN) => ready.clear_ready(),
                    Err(nix::Error::EINTR) => {}
                    // The kernel dropped messages for a full buffer: counted, reading goes on.
                    Err(nix::Error::ENOBUFS) => self.count("kernel_overflow"),
                    Err(e) => return Err(e.into()),
                }
            },
            Mode::Poll(every) => {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut known: Option<HashMap<u64, Destroyed>> = None;
                let mut seq = 0u32;
                let mut failures = 0u64;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    }
                    let mut now = HashMap::new();
                    let mut round = Ok(());
                    for family in [2u8, 10] {
                        seq = seq.wrapping_add(1);
                        round = send(
                            fd.get_ref().as_raw_fd(),
                            &dump_request(family, seq),
                            MsgFlags::empty(),
                        )
                        .map(drop)
                        .map_err(WatchError::from);
                        if round.is_ok() {
                            round = read_dump(&fd, &mut buf, &mut now).await;
                        }
                        if round.is_err() {
                            break;
                        }
                    }
                    if let Err(e) = round {
                        // A partial list would report every socket missing from it as
                        // closed: the round is dropped, the last whole list kept, and the
                        // next round starts from an empty socket.
                        self.count("poll_failed");
                        failures += 1;
                        if failures.is_power_of_two() {
                            tracing::warn!(error = %e, failures, "host socket poll failed; trying again");
                        }
                        while recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                            .is_ok_and(|n| n > 0)
                        {}
                        continue;
                    }
                    // The first dump is the baseline: only later disappearances are closes.
                    if let Some(before) = known.take() {
                        before
                            .values()
                            .filter(|d| !now.contains_key(&d.cookie))
                            .for_each(closed);
                    }
                    known = Some(now);
                }
            }
        }
    }
}

/// Reads one dump's replies into `into` (by cookie), until its end; an error if the dump
/// failed part way (then `into` is not the whole list).
async fn read_dump(
    fd: &AsyncFd<OwnedFd>,
    buf: &mut [u8],
    into: &mut HashMap<u64, Destroyed>,
) -> Result<(), WatchError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut ready = tokio::time::timeout_at(deadline, fd.readable())
            .await
            .map_err(|_| std::io::Error::other("sock_diag dump did not finish in 5 s"))??;
        match recv(fd.get_ref().as_raw_fd(), buf, MsgFlags::empty()) {
            Ok(n) => {
                let bytes = &buf[..n];
                into.extend(parse_datagram(bytes).into_iter().map(|d| (d.cookie, d)));
                match dump_end(bytes) {
                    Some(DumpEnd::Done) => return Ok(()),
                    Some(DumpEnd::Failed) => {
                        return Err(
                            std::io::Error::other("sock_diag dump ended in an error").into()
                        );
                    }
                    None => {}
                }
            }
            Err(nix::Error::EAGAIN) => ready.clear_ready(),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message holding an `inet_diag_msg` (attributes omitted).
    fn message(family: u8, src: &[u8], sport: u16, dst: &[u8], dport: u16, cookie: u64) -> Vec<u8> {
        let mut m = vec![0u8; INET_DIAG_MSG];
        m[0] = family;
        m[1] = 7; // TCP_CLOSE
        m[4..6].copy_from_slice(&sport.to_be_bytes());
        m[6..8].copy_from_slice(&dport.to_be_bytes());
        m[8..8 + src.len()].copy_from_slice(src);
        m[24..24 + dst.len()].copy_from_slice(dst);
        m[44..48].copy_from_slice(&(cookie as u32).to_ne_bytes());
        m[48..52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDR + m.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        out.extend_from_slice(&[0u8; 10]);
        out.extend_from_slice(&m);
        out
    }

    fn watcher() -> HostSockets {
        HostSockets::new(
            HostSocketsConfig {
                exclude_local_ports: vec![22],
                exclude_remote: vec!["192.0.2.0/24".parse().expect("net")],
                queue: 8,
            },
            HostSocketsCounters::default(),
            "host_1700000000".into(),
        )
    }

    /// The groups joined are the TCP ones of both families: a closed IPv6 TCP connection (on
    /// ::1) is reported, a connected IPv4 UDP socket (nothing sent) is not.
    #[test]
    fn the_destroy_groups_are_tcp_of_both_families() {
        use std::net::{TcpListener, TcpStream, UdpSocket};
        let s = DiagSocket::open(std::time::Duration::from_millis(10), false).expect("open");
        if !matches!(s.mode, Mode::Destroy) {
            eprintln!("the kernel refuses the destroy groups here: nothing to check");
            return;
        }
        let listener = TcpListener::bind("[::1]:0").expect("listen on ::1");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let v6_port = client.local_addr().expect("addr").port();
        drop((client, server));
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
        udp.connect("127.0.0.1:53").expect("connect");
        let udp_port = udp.local_addr().expect("addr").port();
        drop(udp);
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        // Bounded: the destroy messages are queued by the time the sockets are closed.
        for _ in 0..50 {
            match recv(s.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => seen.extend(parse_datagram(&buf[..n])),
                Err(_) if seen.iter().any(|d: &Destroyed| d.sport == v6_port) => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        assert!(
            seen.iter().any(|d| d.sport == v6_port),
            "IPv6 TCP close missed"
        );
        assert!(
            !seen.iter().any(|d| d.sport == udp_port),
            "a UDP socket reported as TCP"
        );
    }

    #[test]
    fn datagrams_with_both_families_parse() {
        let v6dst: Ipv6Addr = "fd77:100::5".parse().expect("addr");
        let mapped: Ipv6Addr = "::ffff:10.77.100.9".parse().expect("addr");
        let bytes = [
            message(2, &[10, 77, 1, 1], 40000, &[10, 77, 100, 5], 443, 0x84FF),
            message(10, &mapped.octets(), 1, &v6dst.octets(), 80, 1 << 40),
        ]
        .concat();
        let found = parse_datagram(&bytes);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].dst, "10.77.100.5".parse::<IpAddr>().expect("addr"));
        assert_eq!(
            (found[0].sport, found[0].dport, found[0].cookie),
            (40000, 443, 0x84FF)
        );
        assert_eq!(
            found[1].src,
            "10.77.100.9".parse::<IpAddr>().expect("addr"),
            "canonical"
        );
        assert_eq!(found[1].dst, IpAddr::V6(v6dst));
        assert_eq!(found[1].cookie, 1 << 40);
    }

    #[test]
    fn truncated_and_lying_datagrams_never_panic() {
        let good = message(2, &[1, 2, 3, 4], 1, &[5, 6, 7, 8], 2, 3);
        for cut in 0..good.len() {
            assert!(parse_datagram(&good[..cut]).len() <= 1);
        }
        let mut lying = good.clone();
        lying[0..4].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(parse_datagram(&lying).is_empty());
        let mut tiny = good;
        tiny[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_datagram(&tiny).is_empty());
        // Deterministic noise.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..(x % 300) as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse_datagram(&bytes);
        }
    }

    #[test]
    fn ids_have_the_tcpinfo_shape_and_exclusions_apply() {
        let w = watcher();
        let d = |dst: &str, sport, dport| Destroyed {
            src: "10.77.1.1".parse().expect("addr"),
            sport,
            dst: dst.parse().expect("addr"),
            dport,
            cookie: 0x84FF,
        };
        let event = w.event(&d("10.77.100.5", 40000, 443)).expect("reported");
        assert_eq!(event.connection_id, "host_1700000000_00000000000084FF");
        assert_eq!(
            (event.remote_addr.as_str(), event.remote_port),
            ("10.77.100.5", 443)
        );
        assert!(w.event(&d("0.0.0.0", 443, 0)).is_none(), "a listener");
        assert!(
            w.event(&d("10.77.100.5", 22, 5000)).is_none(),
            "excluded port"
        );
        assert!(
            w.event(&d("192.0.2.9", 40000, 443)).is_none(),
            "excluded prefix"
        );
    }

    #[test]
    fn dump_requests_and_their_end() {
        let req = dump_request(10, 7);
        assert_eq!(req.len(), NLMSG_HDR + 56);
        assert_eq!(
            u32::from_ne_bytes(req[0..4].try_into().expect("4")) as usize,
            req.len()
        );
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), SOCK_DIAG_BY_FAMILY);
        assert_eq!(
            u16::from_ne_bytes([req[6], req[7]]),
            0x301,
            "request | dump"
        );
        assert_eq!((req[16], req[17]), (10, 6), "family, IPPROTO_TCP");
        let states = u32::from_ne_bytes(req[20..24].try_into().expect("4"));
        assert_eq!(states & (1 << 6), 0, "TIME_WAIT is not a live connection");
        assert_ne!(states & (1 << 1), 0, "ESTABLISHED is");
        let mut done = vec![0u8; NLMSG_HDR + 4];
        done[0..4].copy_from_slice(&((NLMSG_HDR + 4) as u32).to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        let socket = message(2, &[1, 2, 3, 4], 1, &[5, 6, 7, 8], 2, 3);
        assert_eq!(dump_end(&socket), None);
        assert_eq!(
            dump_end(&[socket.clone(), done.clone()].concat()),
            Some(DumpEnd::Done)
        );
        assert_eq!(dump_end(&socket[..10]), None);
        let mut error = done;
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(
            dump_end(&[socket.clone(), error].concat()),
            Some(DumpEnd::Failed),
            "a failed dump is not a whole list"
        );
        // A last message whose length is not a multiple of 4 ends the walk, no overflow.
        let mut odd = [socket.as_slice(), &[0, 0]].concat();
        let odd_len = odd.len() as u32;
        odd[0..4].copy_from_slice(&odd_len.to_ne_bytes());
        assert_eq!(dump_end(&odd), None);
        assert_eq!(parse_datagram(&odd).len(), 1);
    }

    #[test]
    fn the_id_prefix_is_host_and_boot_time() {
        let prefix = id_prefix();
        let (host, boot) = prefix.rsplit_once('_').expect("host_boot");
        assert!(!host.is_empty());
        assert!(boot.parse::<u64>().expect("number") > 1_000_000_000);
    }
}
