//! The engine's raw sockets: one set per engine, shared by every trace.
//!
//! | socket | sends | receives |
//! |---|---|---|
//! | IPv4 `IPPROTO_RAW` | every IPv4 probe, as [`encode`](super::encode) built it | — |
//! | IPv4 raw ICMP | — | ICMP errors and echo replies, IP header included |
//! | IPv4 raw TCP | — | the destination's RST / SYN-ACK (a BPF filter keeps only those) |
//! | IPv6 raw UDP | UDP probes (L4 part; hop limit per packet) | — (buffer of 0) |
//! | IPv6 raw ICMPv6 | echo probes (kernel checksum) | ICMPv6 errors and echo replies |
//! | IPv6 raw TCP | SYN probes | RST / SYN-ACK (same filter) |
//!
//! Receive sockets get a large `SO_RCVBUF`, are read in batches (`recvmmsg`), either when the
//! engine's event loop sees them readable ([`Reader::read_ready`]) or blocking for a short
//! timeout ([`Reader::read`], for a thread of its own), and report the kernel's own count of
//! packets dropped for want of buffer space (`SO_RXQ_OVFL`) and when the kernel received each
//! packet (`SO_TIMESTAMPNS`), so RTTs do not include the time a reply waited to be read. Send
//! sockets are non-blocking: a full send queue is a lost probe (counted), never a stalled trace.
//!
//! # Namespaces
//!
//! [`ProbeSockets::open_in`] opens the sockets on a thread that joined the given network
//! namespace, and before creating any socket checks (device and inode of
//! `/proc/thread-self/ns/net` against the namespace file) that the thread really is in it: a
//! socket keeps the namespace it was created in, so every probe sent through it leaves from
//! there, whichever thread sends.

use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn6, SockaddrStorage,
    recvmmsg, sendmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};

use super::{EncodeError, Flow};
use crate::{NetNs, Probe};

/// Receive buffer asked for on each receive socket (the kernel caps it at `net.core.rmem_max`
/// unless the process may override that, which root can).
pub const RECV_BUFFER: usize = 8 << 20;
/// Read timeout of the receive sockets: the longest [`Reader::read`] blocks.
pub const RECV_POLL: Duration = Duration::from_millis(20);
/// Most packets read per `recvmmsg`.
pub const RECV_BATCH: usize = 64;
/// Fewest packets a `recvmmsg` asks for (see [`Reader`]).
const MIN_BATCH: usize = 8;
/// Largest packet read; longer ones are truncated (still enough for every header we decode).
const RECV_LEN: usize = 1280;

/// Why the engine could not open its sockets or probe.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The opening thread is not in the namespace it was asked to open the sockets in.
    #[error(
        "refusing to open probe sockets: thread is in network namespace {found:?}, expected \
         {name} {expected:?}"
    )]
    WrongNamespace {
        /// The namespace's name.
        name: String,
        /// (dev, ino) of the namespace asked for.
        expected: (u64, u64),
        /// (dev, ino) of the thread's namespace.
        found: (u64, u64),
    },
    /// The namespace could not be entered.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// The namespace's name.
        name: String,
        /// What setns(2) said.
        source: nix::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A probe could not be encoded.
    #[error("cannot encode probe: {0}")]
    Encode(#[from] EncodeError),
    /// No route to the destination from the probe namespace.
    #[error("no route to {dst}: {source}")]
    NoRoute {
        /// The destination.
        dst: IpAddr,
        /// What connect(2) said.
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Io { what, source }
}

fn nix_io(what: &'static str) -> impl FnOnce(Errno) -> EngineError {
    move |e| EngineError::Io {
        what,
        source: e.into(),
    }
}

/// (dev, ino) of the network namespace of the calling thread.
pub fn thread_ns_id() -> Result<(u64, u64), EngineError> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(io("stat /proc/thread-self/ns/net"))?;
    Ok((meta.dev(), meta.ino()))
}

/// Ok if the calling thread is in `ns`, else [`EngineError::WrongNamespace`].
pub fn ensure_thread_in(ns: &NetNs) -> Result<(), EngineError> {
    let expected = ns.id().map_err(io("stat network namespace file"))?;
    let found = thread_ns_id()?;
    if found != expected {
        return Err(EngineError::WrongNamespace {
            name: ns.name().to_owned(),
            expected,
            found,
        });
    }
    Ok(())
}

/// Which receive socket a packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// IPv4 ICMP (IP header included).
    IcmpV4,
    /// IPv4 TCP (IP header included).
    TcpV4,
    /// ICMPv6 (no IP header).
    IcmpV6,
    /// TCP over IPv6 (no IP header).
    TcpV6,
}

impl Listener {
    /// Every receive socket.
    pub const ALL: [Listener; 4] = [
        Listener::IcmpV4,
        Listener::TcpV4,
        Listener::IcmpV6,
        Listener::TcpV6,
    ];

    /// A short name for thread names and logs.
    pub fn name(self) -> &'static str {
        match self {
            Listener::IcmpV4 => "icmp4",
            Listener::TcpV4 => "tcp4",
            Listener::IcmpV6 => "icmp6",
            Listener::TcpV6 => "tcp6",
        }
    }
}

/// One received packet, as the decoder needs it.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    /// The bytes (IPv4: from the IP header; IPv6: from the ICMPv6 / TCP header).
    pub bytes: &'a [u8],
    /// The sender (IPv6 only; IPv4 packets carry it in their header).
    pub from: Option<Ipv6Addr>,
    /// Our address it was sent to (IPv6 only, for the TCP checksum).
    pub to: Option<Ipv6Addr>,
    /// The hop limit it arrived with (IPv6 only).
    pub hop_limit: u8,
    /// When the kernel received it, since the Unix epoch (`SO_TIMESTAMPNS`, the realtime
    /// clock), if the kernel said.
    pub arrived: Option<Duration>,
}

/// The raw sockets of one engine (see the module docs).
#[derive(Debug)]
pub struct ProbeSockets {
    send_v4: Socket,
    icmp_v4: Socket,
    tcp_v4: Socket,
    udp_v6: Socket,
    icmp_v6: Socket,
    tcp_v6: Socket,
    /// Unconnected UDP sockets for route lookups (which source address the kernel would use).
    route_v4: Mutex<Socket>,
    route_v6: Mutex<Socket>,
}

/// Keeps TCP segments with RST set or with both SYN and ACK: the only ones a SYN probe's
/// destination sends back. `flags_at` loads the flags byte into the accumulator.
fn tcp_reply_filter(flags_at: impl IntoIterator<Item = SockFilter>) -> Vec<SockFilter> {
    const JSET: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const AND: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let mut program: Vec<SockFilter> = flags_at.into_iter().collect();
    program.extend([
        SockFilter::new(JSET, 2, 0, 0x04), // RST → accept
        SockFilter::new(AND, 0, 0, 0x12),
        SockFilter::new(JEQ, 0, 1, 0x12), // SYN|ACK → accept, else drop
        SockFilter::new(RET, 0, 0, 0xffff),
        SockFilter::new(RET, 0, 0, 0),
    ]);
    program
}

fn receiver(domain: Domain, protocol: Protocol, what: &'static str) -> Result<Socket, EngineError> {
    let socket = Socket::new(domain, Type::RAW, Some(protocol)).map_err(io(what))?;
    // Above rmem_max when the process may (root); else whatever the kernel allows.
    if socket.set_recv_buffer_size(RECV_BUFFER).is_ok() {
        let _ = setsockopt(&socket, sockopt::RcvBufForce, &RECV_BUFFER);
    }
    socket
        .set_read_timeout(Some(RECV_POLL))
        .map_err(io("set SO_RCVTIMEO"))?;
    setsockopt(&socket, sockopt::RxqOvfl, &1).map_err(nix_io("set SO_RXQ_OVFL"))?;
    // Receive times from the kernel: a reply's RTT does not grow while it waits to be read.
    setsockopt(&socket, sockopt::ReceiveTimestampns, &true)
        .map_err(nix_io("set SO_TIMESTAMPNS"))?;
    Ok(socket)
}

fn sender(domain: Domain, protocol: Protocol, what: &'static str) -> Result<Socket, EngineError> {
    let socket = Socket::new(domain, Type::RAW, Some(protocol)).map_err(io(what))?;
    socket.set_nonblocking(true).map_err(io("set O_NONBLOCK"))?;
    Ok(socket)
}

impl ProbeSockets {
    /// Opens the sockets in `ns`, after checking the opening thread is in it.
    pub fn open_in(ns: &NetNs) -> Result<Self, EngineError> {
        ns.run_inside(|| {
            ensure_thread_in(ns)?;
            Self::open()
        })
        .map_err(|source| EngineError::Enter {
            name: ns.name().to_owned(),
            source,
        })?
    }

    /// Opens the sockets in the calling thread's namespace. Probes leave from there: tests must
    /// use [`ProbeSockets::open_in`] with a lab namespace instead.
    pub fn open() -> Result<Self, EngineError> {
        // Receivers first, so no reply to the first probe can arrive before they exist.
        let icmp_v4 = receiver(Domain::IPV4, Protocol::ICMPV4, "open raw ICMP socket")?;
        let tcp_v4 = receiver(Domain::IPV4, Protocol::TCP, "open raw TCP socket")?;
        // ldxb 4*([0]&0xf); ldb [x+13]
        tcp_v4
            .attach_filter(&tcp_reply_filter([
                SockFilter::new(0xb1, 0, 0, 0),
                SockFilter::new(0x50, 0, 0, 13),
            ]))
            .map_err(io("attach TCP filter"))?;
        let icmp_v6 = receiver(Domain::IPV6, Protocol::ICMPV6, "open raw ICMPv6 socket")?;
        let tcp_v6 = receiver(Domain::IPV6, Protocol::TCP, "open raw IPv6 TCP socket")?;
        // IPv6 raw sockets filter from the transport header: ldb [13]
        tcp_v6
            .attach_filter(&tcp_reply_filter([SockFilter::new(0x30, 0, 0, 13)]))
            .map_err(io("attach TCP filter"))?;
        for s in [&icmp_v6, &tcp_v6] {
            setsockopt(s, sockopt::Ipv6RecvHopLimit, &true)
                .map_err(nix_io("set IPV6_RECVHOPLIMIT"))?;
            setsockopt(s, sockopt::Ipv6RecvPacketInfo, &true)
                .map_err(nix_io("set IPV6_RECVPKTINFO"))?;
        }

        let send_v4 = sender(
            Domain::IPV4,
            Protocol::from(nix::libc::IPPROTO_RAW),
            "open IPPROTO_RAW socket",
        )?;
        let udp_v6 = sender(Domain::IPV6, Protocol::UDP, "open raw IPv6 UDP socket")?;
        // Nothing reads it: the smallest buffer.
        udp_v6
            .set_recv_buffer_size(0)
            .map_err(io("set SO_RCVBUF"))?;
        let route_v4 =
            Socket::new(Domain::IPV4, Type::DGRAM, None).map_err(io("open UDP socket"))?;
        let route_v6 =
            Socket::new(Domain::IPV6, Type::DGRAM, None).map_err(io("open UDP socket"))?;
        Ok(Self {
            send_v4,
            icmp_v4,
            tcp_v4,
            udp_v6,
            icmp_v6,
            tcp_v6,
            route_v4: Mutex::new(route_v4),
            route_v6: Mutex::new(route_v6),
        })
    }

    /// The source address the kernel picks for `dst` in the sockets' namespace.
    pub fn source_for(&self, dst: IpAddr) -> Result<IpAddr, EngineError> {
        let lock = match dst {
            IpAddr::V4(_) => &self.route_v4,
            IpAddr::V6(_) => &self.route_v6,
        };
        let socket = lock.lock().unwrap_or_else(|p| p.into_inner());
        let no_route = |source| EngineError::NoRoute { dst, source };
        // Connecting a UDP socket sends nothing: it resolves the route. Connecting again
        // replaces the association, so the socket serves every lookup.
        socket
            .connect(&SockAddr::from(SocketAddr::new(dst, 9)))
            .map_err(no_route)?;
        let local = socket
            .local_addr()
            .map_err(no_route)?
            .as_socket()
            .ok_or_else(|| no_route(std::io::Error::other("no socket address")))?;
        Ok(local.ip())
    }

    /// Sends one probe of `flow` (as [`encode`](super::encode) built it). `Ok(false)` when
    /// the send queue is full (the probe is lost, not retried here).
    pub fn send(&self, flow: &Flow, packet: &[u8], hop_limit: u8) -> Result<bool, EngineError> {
        let sent = match flow.dst {
            IpAddr::V4(_) => self
                .send_v4
                .send_to(packet, &SockAddr::from(SocketAddr::new(flow.dst, 0)))
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0))),
            IpAddr::V6(dst) => {
                let socket = match flow.probe {
                    Probe::Udp => &self.udp_v6,
                    Probe::Icmp => &self.icmp_v6,
                    Probe::Tcp => &self.tcp_v6,
                };
                let addr = SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, 0));
                let limit = nix::libc::c_int::from(hop_limit);
                sendmsg(
                    socket.as_raw_fd(),
                    &[IoSlice::new(packet)],
                    &[ControlMessage::Ipv6HopLimit(&limit)],
                    MsgFlags::MSG_DONTWAIT,
                    Some(&addr),
                )
            }
        };
        match sent {
            Ok(n) if n == packet.len() => Ok(true),
            Ok(_) => Err(EngineError::Io {
                what: "send probe",
                source: std::io::Error::new(ErrorKind::WriteZero, "short send"),
            }),
            Err(Errno::EAGAIN | Errno::ENOBUFS) => Ok(false),
            Err(e) => Err(EngineError::Io {
                what: "send probe",
                source: e.into(),
            }),
        }
    }

    /// The receive socket `which`.
    pub fn listener(&self, which: Listener) -> &Socket {
        match which {
            Listener::IcmpV4 => &self.icmp_v4,
            Listener::TcpV4 => &self.tcp_v4,
            Listener::IcmpV6 => &self.icmp_v6,
            Listener::TcpV6 => &self.tcp_v6,
        }
    }
}

/// Batched reads from one receive socket, with buffers reused across reads. A read asks for
/// twice what the last one got (8 to 64 packets), so replies arriving one at a time do not pay
/// for setting up 64 slots each.
#[derive(Debug)]
pub struct Reader {
    which: Listener,
    buffers: Box<[[u8; RECV_LEN]; RECV_BATCH]>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Packets the next read asks for.
    batch: usize,
    /// The kernel's drop count for this socket, as last reported.
    drops: u32,
}

impl Reader {
    /// A reader for `which`.
    pub fn new(which: Listener) -> Self {
        let cmsg = nix::cmsg_space!(
            nix::libc::c_int,
            nix::libc::in6_pktinfo,
            u32,
            nix::libc::timespec
        );
        Self {
            which,
            buffers: Box::new([[0; RECV_LEN]; RECV_BATCH]),
            headers: MultiHeaders::preallocate(RECV_BATCH, Some(cmsg)),
            batch: MIN_BATCH,
            drops: 0,
        }
    }

    /// Packets the kernel dropped on this socket since it was opened (last reported value).
    pub fn kernel_drops(&self) -> u32 {
        self.drops
    }

    /// Waits up to `RECV_POLL` (20 ms) for packets and hands each one read (up to
    /// [`batch`](Self::batch)) to `each`; returns how many were read (0 on timeout).
    pub fn read(
        &mut self,
        sockets: &ProbeSockets,
        each: impl FnMut(Packet<'_>),
    ) -> Result<usize, EngineError> {
        self.read_with(sockets, MsgFlags::MSG_WAITFORONE, each)
    }

    /// Like [`read`](Self::read), but returns 0 at once when no packet is queued.
    pub fn read_ready(
        &mut self,
        sockets: &ProbeSockets,
        each: impl FnMut(Packet<'_>),
    ) -> Result<usize, EngineError> {
        self.read_with(sockets, MsgFlags::MSG_DONTWAIT, each)
    }

    /// Packets the next read asks for: a read that gets fewer has emptied the socket.
    pub fn batch(&self) -> usize {
        self.batch
    }

    fn read_with(
        &mut self,
        sockets: &ProbeSockets,
        flags: MsgFlags,
        mut each: impl FnMut(Packet<'_>),
    ) -> Result<usize, EngineError> {
        let fd = sockets.listener(self.which).as_raw_fd();
        let batch = self.batch;
        let mut iovs = self.buffers.each_mut().map(|b| [IoSliceMut::new(b)]);
        let slots = iovs.iter_mut().take(batch);
        let results = match recvmmsg(fd, &mut self.headers, slots, flags, None) {
            Ok(results) => results,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(0),
            Err(e) => {
                return Err(EngineError::Io {
                    what: "receive replies",
                    source: e.into(),
                });
            }
        };
        let mut count = 0;
        for msg in results {
            count += 1;
            let mut packet = Packet {
                bytes: &[],
                from: msg
                    .address
                    .as_ref()
                    .and_then(|a| a.as_sockaddr_in6())
                    .map(|a| a.ip()),
                to: None,
                hop_limit: 0,
                arrived: None,
            };
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::Ipv6HopLimit(h) => {
                            packet.hop_limit = u8::try_from(h).unwrap_or(u8::MAX);
                        }
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            packet.to = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
                        }
                        ControlMessageOwned::RxqOvfl(drops) => self.drops = drops,
                        ControlMessageOwned::ScmTimestampns(ts) => {
                            packet.arrived = Some(Duration::from(ts));
                        }
                        _ => {}
                    }
                }
            }
            let len = msg.bytes;
            if let Some(data) = msg.iovs().next() {
                packet.bytes = &data[..len.min(data.len())];
                each(packet);
            }
        }
        self.batch = (count * 2).clamp(MIN_BATCH, RECV_BATCH);
        Ok(count)
    }
}
