//! Raw sockets for the engine, and a minimal blocking Paris trace (UDP or ICMP echo, IPv4 or
//! IPv6) over them.
//!
//! # Namespaces
//!
//! [`ProbeSockets::open_in`] opens the sockets on a thread that joined the given network
//! namespace, and before creating any socket checks (device and inode of
//! `/proc/thread-self/ns/net` against the namespace file) that the thread really is in it: a
//! socket keeps the namespace it was created in, so every probe sent through it leaves from there.
//!
//! # Async use
//!
//! Everything here is blocking, with bounded waits: the receive socket has a short read timeout
//! ([`RECV_POLL`]) and [`trace_paris`] stops at its deadline. From async code, run it
//! with `tokio::task::spawn_blocking` (the sockets are `Send + Sync`). One trace at a time per
//! [`ProbeSockets`] and family: a trace reads the shared receive socket itself, drains it before
//! sending and counts other traces' replies as strays, so concurrent traces would steal each
//! other's replies. A receive thread that dispatches replies to many traces, batched receive
//! (`recvmmsg`) and global pacing are later increments.

use std::collections::BTreeMap;
use std::io::{ErrorKind, IoSlice, IoSliceMut, Read};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, sendmsg, setsockopt,
    sockopt,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{EncodeError, Flow, Kind, ProbeId, ProbeKey, Reply, decode_icmp6, decode_v4, encode};
use crate::{NetNs, Probe};

/// Receive buffer asked for on the receive socket (the kernel caps it at `net.core.rmem_max`).
pub const RECV_BUFFER: usize = 4 << 20;
/// Read timeout of the receive socket: the longest a receive blocks before the caller can check
/// its deadline again.
pub const RECV_POLL: Duration = Duration::from_millis(20);
/// Most packets one trace reads (replies, strays and stale ones together) before giving up,
/// whatever the time left: bounds a trace on a busy socket.
pub const MAX_READS_PER_TRACE: usize = 4096;
/// Largest packet read; longer ones are truncated (still enough for every header we decode).
const RECV_LEN: usize = 1500;

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
    /// This increment probes with UDP or ICMP echo only (TCP needs raw TCP receive sockets).
    #[error("only UDP and ICMP echo flows are supported for now")]
    Unsupported,
    /// Source and destination are of different families.
    #[error(transparent)]
    MixedFamilies(EncodeError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Io { what, source }
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

/// The raw sockets of one engine: IPv4 sends whole packets and receives ICMP with its IP
/// header; IPv6 sends the L4 part (hop limit per packet, `IPV6_HOPLIMIT`) and receives ICMPv6
/// without header (sender from the socket address, hop limit from `IPV6_RECVHOPLIMIT`).
#[derive(Debug)]
pub struct ProbeSockets {
    /// `IPPROTO_RAW`: implies `IP_HDRINCL`, sends [`encode`]'s packets as they are.
    send_v4: Socket,
    /// Raw ICMP: every ICMP packet to this namespace, IPv4 header included.
    recv_icmp_v4: Socket,
    /// Raw IPv6 UDP: sends UDP probes (checksum written by [`encode`]); never read (it would
    /// see every UDP datagram to this namespace; its buffer just fills and drops).
    send_udp6: Socket,
    /// Raw ICMPv6: receives every ICMPv6 message, and sends ICMPv6 echo probes (the kernel
    /// writes their checksum).
    icmp6: Socket,
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
        // Receive first, so no reply to the first probe can arrive before it exists.
        let recv_icmp_v4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .map_err(io("open raw ICMP socket"))?;
        recv_icmp_v4
            .set_recv_buffer_size(RECV_BUFFER)
            .map_err(io("set SO_RCVBUF"))?;
        recv_icmp_v4
            .set_read_timeout(Some(RECV_POLL))
            .map_err(io("set SO_RCVTIMEO"))?;
        let send_v4 = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(nix::libc::IPPROTO_RAW)),
        )
        .map_err(io("open IPPROTO_RAW socket"))?;

        let icmp6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
            .map_err(io("open raw ICMPv6 socket"))?;
        icmp6
            .set_recv_buffer_size(RECV_BUFFER)
            .map_err(io("set SO_RCVBUF"))?;
        icmp6
            .set_read_timeout(Some(RECV_POLL))
            .map_err(io("set SO_RCVTIMEO"))?;
        setsockopt(&icmp6, sockopt::Ipv6RecvHopLimit, &true).map_err(|e| EngineError::Io {
            what: "set IPV6_RECVHOPLIMIT",
            source: e.into(),
        })?;
        let send_udp6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::UDP))
            .map_err(io("open raw IPv6 UDP socket"))?;
        // Smallest buffer: nothing reads it.
        send_udp6
            .set_recv_buffer_size(0)
            .map_err(io("set SO_RCVBUF"))?;
        Ok(Self {
            send_v4,
            recv_icmp_v4,
            send_udp6,
            icmp6,
        })
    }

    /// Sends the L4 part of an IPv6 probe (as [`encode`] writes it) to `dst` with `hop_limit`,
    /// set per packet so concurrent senders cannot race on a socket option.
    fn send_v6(
        &self,
        probe: Probe,
        l4: &[u8],
        dst: Ipv6Addr,
        hop_limit: u8,
    ) -> Result<(), EngineError> {
        let socket = match probe {
            Probe::Udp => &self.send_udp6,
            Probe::Icmp => &self.icmp6,
            Probe::Tcp => return Err(EngineError::Unsupported),
        };
        let addr = SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, 0));
        let limit = nix::libc::c_int::from(hop_limit);
        let sent = sendmsg(
            socket.as_raw_fd(),
            &[IoSlice::new(l4)],
            &[ControlMessage::Ipv6HopLimit(&limit)],
            MsgFlags::empty(),
            Some(&addr),
        )
        .map_err(|e| EngineError::Io {
            what: "send probe",
            source: e.into(),
        })?;
        if sent != l4.len() {
            return Err(EngineError::Io {
                what: "send probe",
                source: std::io::Error::new(ErrorKind::WriteZero, "short send"),
            });
        }
        Ok(())
    }

    /// Receives one ICMPv6 message into `buf`: `Ok(None)` after [`RECV_POLL`] (or at once with
    /// `nonblocking`), else (length, sender, hop limit; 0 if the kernel did not say).
    fn recv_v6(
        &self,
        buf: &mut [u8],
        nonblocking: bool,
    ) -> Result<Option<(usize, Ipv6Addr, u8)>, EngineError> {
        let mut cmsg = nix::cmsg_space!(nix::libc::c_int);
        let mut iov = [IoSliceMut::new(buf)];
        let flags = if nonblocking {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        let msg = match recvmsg::<SockaddrIn6>(
            self.icmp6.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            flags,
        ) {
            Ok(msg) => msg,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(None),
            Err(e) => {
                return Err(EngineError::Io {
                    what: "receive reply",
                    source: e.into(),
                });
            }
        };
        let from = msg.address.map_or(Ipv6Addr::UNSPECIFIED, |a| a.ip());
        let mut hop_limit = 0;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::Ipv6HopLimit(h) = c {
                    hop_limit = u8::try_from(h).unwrap_or(u8::MAX);
                }
            }
        }
        Ok(Some((msg.bytes, from, hop_limit)))
    }

    /// Sends one probe of `flow`, whichever its family.
    fn send(&self, flow: &Flow, packet: &[u8], hop_limit: u8) -> Result<(), EngineError> {
        match flow.dst {
            IpAddr::V4(_) => self.send_v4(packet, flow.dst),
            IpAddr::V6(dst) => self.send_v6(flow.probe, packet, dst, hop_limit),
        }
    }

    /// Receives and decodes one packet from the IPv4 (`v4`) or IPv6 ICMP socket; `Ok(None)` on
    /// timeout.
    fn recv_decode(
        &self,
        v4: bool,
        buf: &mut [u8],
        key: &ProbeKey,
    ) -> Result<Option<Result<Reply, super::Stray>>, EngineError> {
        if v4 {
            Ok(self.recv_v4(buf)?.map(|n| decode_v4(&buf[..n], key)))
        } else {
            Ok(self
                .recv_v6(buf, false)?
                .map(|(n, from, hl)| decode_icmp6(&buf[..n], from, hl, key)))
        }
    }

    /// Discards what is queued on the IPv6 receive socket (at most [`MAX_READS_PER_TRACE`]).
    fn drain_v6(&self, buf: &mut [u8]) -> Result<usize, EngineError> {
        let mut drained = 0;
        while drained < MAX_READS_PER_TRACE && self.recv_v6(buf, true)?.is_some() {
            drained += 1;
        }
        Ok(drained)
    }

    /// Sends one whole IPv4 packet (as [`encode`] writes it) to `dst`.
    fn send_v4(&self, packet: &[u8], dst: IpAddr) -> Result<(), EngineError> {
        let addr = SockAddr::from(SocketAddr::new(dst, 0));
        let sent = self
            .send_v4
            .send_to(packet, &addr)
            .map_err(io("send probe"))?;
        if sent != packet.len() {
            return Err(EngineError::Io {
                what: "send probe",
                source: std::io::Error::new(ErrorKind::WriteZero, "short send"),
            });
        }
        Ok(())
    }

    /// Receives one packet into `buf`, waiting at most [`RECV_POLL`]. `Ok(None)` on timeout.
    fn recv_v4(&self, buf: &mut [u8]) -> Result<Option<usize>, EngineError> {
        match (&self.recv_icmp_v4).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(EngineError::Io {
                what: "receive reply",
                source: e,
            }),
        }
    }

    /// Reads and discards what is already queued (at most [`MAX_READS_PER_TRACE`] packets):
    /// late replies to an earlier trace would otherwise match this one.
    fn drain_v4(&self, buf: &mut [u8]) -> Result<usize, EngineError> {
        let fd = self.recv_icmp_v4.as_raw_fd();
        let mut drained = 0;
        while drained < MAX_READS_PER_TRACE {
            match nix::sys::socket::recv(fd, buf, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => drained += 1,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(EngineError::Io {
                        what: "drain replies",
                        source: e.into(),
                    });
                }
            }
        }
        Ok(drained)
    }
}

/// What one trace saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParisTrace {
    /// The first reply at each TTL that answered, sorted by TTL (none past the destination).
    pub replies: Vec<Reply>,
    /// Packets read that were not replies to this trace's probes (other flows, other ICMP,
    /// duplicates, forged or corrupted ones).
    pub strays: usize,
    /// Packets already queued before the probes were sent (e.g. the destination's replies to
    /// an earlier trace's probes past it), discarded unread.
    pub stale: usize,
    /// Probes sent.
    pub sent: usize,
}

/// Whether `reply` ends the path: sent by the destination, or anything but time exceeded.
fn at_destination(reply: &Reply) -> bool {
    reply.from == reply.flow_dst || reply.kind != Kind::TimeExceeded
}

/// Paris traceroute of `flow` (UDP or ICMP echo, IPv4 or IPv6; the lab tests UDP):
/// sends TTL 1..=`max_ttl` at once, one attempt each, then reads replies until every TTL up to
/// the first one that reached the destination answered, or `wait` elapsed, or
/// [`MAX_READS_PER_TRACE`] packets were read. Blocking.
pub fn trace_paris(
    sockets: &ProbeSockets,
    flow: &Flow,
    key: &ProbeKey,
    max_ttl: u8,
    wait: Duration,
) -> Result<ParisTrace, EngineError> {
    let v4 = match (flow.src, flow.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => true,
        (IpAddr::V6(_), IpAddr::V6(_)) => false,
        _ => return Err(EngineError::MixedFamilies(EncodeError::MixedFamilies)),
    };
    if !matches!(flow.probe, Probe::Udp | Probe::Icmp) {
        return Err(EngineError::Unsupported);
    }
    let max_ttl = max_ttl.min(super::MAX_TTL);
    let mut buf = vec![0u8; RECV_LEN];
    let stale = if v4 {
        sockets.drain_v4(&mut buf)?
    } else {
        sockets.drain_v6(&mut buf)?
    };
    let mut out = ParisTrace {
        stale,
        ..ParisTrace::default()
    };

    let mut packet = Vec::with_capacity(64);
    for ttl in 1..=max_ttl {
        packet.clear();
        let encoded = encode(flow, ProbeId { ttl, attempt: 0 }, key, &mut packet)?;
        sockets.send(flow, &packet, encoded.hop_limit)?;
        out.sent += 1;
    }

    let deadline = Instant::now() + wait;
    let mut by_ttl: BTreeMap<u8, Reply> = BTreeMap::new();
    let mut reads = 0;
    while reads < MAX_READS_PER_TRACE && Instant::now() < deadline && !complete(&by_ttl) {
        let Some(decoded) = sockets.recv_decode(v4, &mut buf, key)? else {
            continue;
        };
        reads += 1;
        match decoded {
            Ok(reply)
                if reply.flow_dst == flow.dst
                    && reply.probe == flow.probe
                    && reply.sport == flow.sport
                    && reply.dport == flow.dport
                    && reply.id.attempt == 0
                    && reply.id.ttl <= max_ttl
                    && !by_ttl.contains_key(&reply.id.ttl) =>
            {
                by_ttl.insert(reply.id.ttl, reply);
            }
            _ => out.strays += 1,
        }
    }

    // Nothing past the first TTL that reached the destination (those are its duplicates).
    let end = by_ttl
        .values()
        .find(|r| at_destination(r))
        .map_or(max_ttl, |r| r.id.ttl);
    out.replies = by_ttl.into_values().filter(|r| r.id.ttl <= end).collect();
    Ok(out)
}

/// True when some TTL reached the destination and every TTL below it answered.
fn complete(by_ttl: &BTreeMap<u8, Reply>) -> bool {
    let Some(end) = by_ttl
        .values()
        .find(|r| at_destination(r))
        .map(|r| r.id.ttl)
    else {
        return false;
    };
    (1..end).all(|ttl| by_ttl.contains_key(&ttl))
}
