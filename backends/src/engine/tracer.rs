//! [`Engine`]: the in-process [`Tracer`]. One set of raw sockets, one receive thread per
//! receive socket, one flow table and one probe budget serve every trace; each trace is an
//! async task driving a [`ParisTrace`] state machine.
//!
//! ```text
//!  trace task ──reserve──▶ Pacer            receive threads (icmp4, tcp4, icmp6, tcp6)
//!      │  encode + send ──▶ ProbeSockets ──▶ lab / network ──▶ recvmmsg ─▶ decode (keyed tag)
//!      ◀──────────── mpsc ◀──── FlowTable::deliver ◀─────────────────────────┘
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::dispatch::{Arrival, Delivery, FlowKey, FlowTable, MDA_QUEUE, TRACE_QUEUE};
use super::json::{
    Clock, HostName, TraceLine, TracelbLine, probe_size, trace_output, tracelb_output,
};
use super::mda::{FlowIx, MdaConfig, MdaTrace, Step as MdaStep};
use super::pacer::Pacer;
use super::paris::{ParisConfig, ParisTrace, Step};
use super::routers::{RouterLimits, RouterPacing};
use super::socket::{Listener, Packet, ProbeSockets, Reader};
use super::{
    EngineError, Flow, Keys, ProbeId, ProbeKey, decode_icmp6, decode_tcp6, decode_v4, encode,
};
use crate::{Method, NetNs, Probe, TraceError, TraceOutput, TraceRequest, Tracer};

/// scamper's default destination port for UDP Paris traces.
pub const UDP_DPORT: u16 = 33435;
/// scamper's default destination port for TCP traces (`trace -P tcp` uses the same base port
/// as UDP unless told otherwise), so both backends probe the same flow.
pub const TCP_DPORT: u16 = 33435;
/// Source ports (and echo identifiers) handed out when a request does not fix one.
const AUTO_PORTS: std::ops::Range<u32> = 33_000..61_000;
/// Busy automatic ports tried in a row before a trace waits a millisecond.
const AUTO_TRIES: u64 = 64;

/// How the engine probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Probes per second across all traces (0: unlimited).
    pub pps: u32,
    /// Probes that may leave back to back after an idle spell.
    pub burst: u32,
    /// Consecutive silent TTLs that end a trace (scamper's `-g`, default 5).
    pub gap_limit: u8,
    /// Pacing of routers that show an ICMP rate limit (`None`: never paced).
    pub router_limits: Option<RouterLimits>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            pps: 10_000,
            burst: 100,
            gap_limit: 5,
            router_limits: Some(RouterLimits::default()),
        }
    }
}

/// Counters since the engine opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Probes handed to the kernel.
    pub probes_sent: u64,
    /// Probes the kernel would not queue (full send buffer): lost.
    pub probes_lost: u64,
    /// Replies delivered to a running trace.
    pub replies: u64,
    /// Packets read that are not replies to our probes (failed to decode or to authenticate).
    pub strays: u64,
    /// Replies shaped like ours for a flow no trace is running (arrived after their trace
    /// ended, or another prober's); they cannot be authenticated, so they are not checked.
    pub late: u64,
    /// Replies dropped because their trace's queue was full.
    pub overflow: u64,
    /// Packets the kernel dropped on the receive sockets (`SO_RXQ_OVFL`).
    pub kernel_drops: u64,
    /// Probes held back for a router that showed an ICMP rate limit.
    pub router_paced: u64,
    /// Routers paced now.
    pub limited_routers: u64,
}

#[derive(Debug, Default)]
struct Counters {
    probes_sent: AtomicU64,
    probes_lost: AtomicU64,
    replies: AtomicU64,
    strays: AtomicU64,
    late: AtomicU64,
    overflow: AtomicU64,
    kernel_drops: [AtomicU32; 4],
    router_paced: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    sockets: ProbeSockets,
    key: ProbeKey,
    flows: FlowTable,
    pacer: Pacer,
    routers: Option<RouterPacing>,
    counters: Counters,
    stop: AtomicBool,
    /// This host's name, escaped for the cycle lines.
    hostname: HostName,
    next_port: AtomicU32,
    running: AtomicUsize,
    /// The next trace's salt (see the module docs of `engine`).
    next_salt: AtomicU32,
    options: EngineOptions,
}

/// The in-process tracer (see the module docs).
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    /// Opens the raw sockets (inside `netns` when given, checked) and starts the receive
    /// threads. Needs `CAP_NET_RAW`.
    pub fn open(netns: Option<&NetNs>, options: EngineOptions) -> Result<Self, EngineError> {
        let sockets = match netns {
            Some(ns) => ProbeSockets::open_in(ns)?,
            None => ProbeSockets::open()?,
        };
        Self::start(sockets, options)
    }

    /// Starts the engine on sockets already open ([`ProbeSockets::open`] /
    /// [`ProbeSockets::open_in`]): needs no privilege, so a process can open the sockets, drop
    /// its capabilities, then start the engine, whose receive threads inherit none.
    pub fn start(sockets: ProbeSockets, options: EngineOptions) -> Result<Self, EngineError> {
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".to_owned());
        let hostname = HostName::new(&hostname);
        let shared = Arc::new(Shared {
            sockets,
            key: ProbeKey::random(),
            flows: FlowTable::default(),
            pacer: Pacer::new(options.pps, options.burst),
            routers: options.router_limits.map(RouterPacing::new),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            hostname,
            next_port: AtomicU32::new(AUTO_PORTS.start + std::process::id() % 1000),
            running: AtomicUsize::new(0),
            next_salt: AtomicU32::new(0),
            options,
        });
        let mut threads = Vec::new();
        for (i, which) in Listener::ALL.into_iter().enumerate() {
            let listener = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("hoptrace-rx-{}", which.name()))
                .spawn(move || listener.listen(which, i))
                .map_err(|source| EngineError::Io {
                    what: "start receive thread",
                    source,
                });
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.stop.store(true, Ordering::Relaxed);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Self {
            shared,
            threads: std::sync::Mutex::new(threads),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        EngineStats {
            probes_sent: c.probes_sent.load(Ordering::Relaxed),
            probes_lost: c.probes_lost.load(Ordering::Relaxed),
            replies: c.replies.load(Ordering::Relaxed),
            strays: c.strays.load(Ordering::Relaxed),
            late: c.late.load(Ordering::Relaxed),
            overflow: c.overflow.load(Ordering::Relaxed),
            kernel_drops: c
                .kernel_drops
                .iter()
                .map(|d| u64::from(d.load(Ordering::Relaxed)))
                .sum(),
            router_paced: c.router_paced.load(Ordering::Relaxed),
            limited_routers: self
                .shared
                .routers
                .as_ref()
                .map_or(0, |r| r.limited_routers() as u64),
        }
    }

    /// Traces currently running.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Relaxed)
    }

    fn stop_threads(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    async fn paris(&self, request: &TraceRequest, probe: Probe) -> Result<TraceOutput, TraceError> {
        let shared = &self.shared;
        let src = shared.sockets.source_for(request.dst)?;
        let mut registration = Registration::new(shared, TRACE_QUEUE);
        let flow = registration
            .claim(src, request, probe, request.source_port)
            .await;
        let limits = request.limits;
        let mut trace = ParisTrace::new(ParisConfig {
            max_ttl: limits.max_ttl,
            attempts: limits.attempts,
            wait: limits.wait,
            gap_limit: shared.options.gap_limit,
        });
        let clock = Clock::now();
        let start = Instant::now();
        let mut packet = Vec::with_capacity(64);
        let mut size = 0;
        let stop = loop {
            let (send, wake) = match trace.poll(Instant::now()) {
                Step::Done(reason) => break reason,
                Step::Probe { send, wake } => (send, wake),
            };
            if !send.is_empty() {
                let batch = send.into_iter().map(|id| (id, flow, id)).collect();
                shared
                    .send_batch(batch, &mut packet, |id, tx, bytes| {
                        size = bytes;
                        trace.sent(id, tx);
                    })
                    .await?;
                continue;
            }
            let open = registration
                .replies(wake, |Arrival { reply, rx }| {
                    trace.on_reply(reply, rx);
                })
                .await;
            if !open {
                break trace_abandoned();
            }
        };
        let answers = trace.answers();
        let icmp_sum = if probe == Probe::Icmp {
            super::probe::Tags::echo_checksum(&shared.key, flow.salt, flow.dst, flow.sport)
        } else {
            0
        };
        let line = TraceLine {
            flow: &flow,
            icmp_sum,
            stop,
            start,
            hop_count: trace.hop_count(),
            attempts: trace.config().attempts,
            wait: trace.config().wait,
            probe_size: size,
            probe_count: trace.probes_sent(),
            answers: &answers,
        };
        Ok(trace_output(
            &line,
            &clock,
            &shared.hostname,
            Instant::now(),
        ))
    }

    /// A multipath trace: flows differ in their source port (echo identifier for ICMP), each
    /// claimed in the flow table when the trace first uses it.
    async fn mda(&self, request: &TraceRequest, probe: Probe) -> Result<TraceOutput, TraceError> {
        let shared = &self.shared;
        let src = shared.sockets.source_for(request.dst)?;
        let mut registration = Registration::new(shared, MDA_QUEUE);
        let limits = request.limits;
        let mut trace = MdaTrace::new(MdaConfig {
            confidence: limits.confidence,
            max_ttl: limits.max_ttl,
            attempts: limits.attempts,
            wait: limits.wait,
            gap_limit: shared.options.gap_limit,
            max_probes: limits.probe_budget,
        });
        // Flow number -> its flow, and source port -> flow number.
        let mut flows: Vec<Flow> = Vec::new();
        let mut by_port: HashMap<u16, FlowIx> = HashMap::new();
        let clock = Clock::now();
        let start = Instant::now();
        let mut packet = Vec::with_capacity(64);
        let mut size = 0;
        loop {
            let (send, wake) = match trace.poll(Instant::now()) {
                MdaStep::Done => break,
                MdaStep::Probe { send, wake } => (send, wake),
            };
            if !send.is_empty() {
                let newest = send.iter().map(|p| usize::from(p.flow)).max().unwrap_or(0);
                while flows.len() <= newest {
                    // After the first flow, fixed ports go up one by one from the requested one.
                    let want = match (request.source_port, flows.last()) {
                        (Some(port), None) => Some(port),
                        (Some(_), Some(last)) => Some(last.sport.wrapping_add(1).max(1)),
                        (None, _) => None,
                    };
                    let flow = registration.claim(src, request, probe, want).await;
                    by_port.insert(flow.sport, u16::try_from(flows.len()).unwrap_or(u16::MAX));
                    flows.push(flow);
                }
                let batch = send
                    .into_iter()
                    .map(|p| (p, flows[usize::from(p.flow)], p.id))
                    .collect();
                shared
                    .send_batch(batch, &mut packet, |p, tx, bytes| {
                        size = bytes;
                        trace.sent(p, tx);
                    })
                    .await?;
                continue;
            }
            let open = registration
                .replies(wake, |Arrival { reply, rx }| {
                    if let Some(&flow) = by_port.get(&reply.sport) {
                        trace.on_reply(flow, reply, rx);
                    }
                })
                .await;
            if !open {
                break;
            }
        }
        // The header's flow: the first one (there is one unless the trace sent nothing).
        let first = flows.first().copied().unwrap_or(Flow {
            src,
            dst: request.dst,
            probe,
            sport: 0,
            dport: 0,
            salt: registration.salt,
        });
        let flow_ids: Vec<u16> = flows.iter().map(|f| f.sport).collect();
        let line = TracelbLine {
            flow: &first,
            flow_ids: &flow_ids,
            start,
            probe_size: size,
            gap_limit: shared.options.gap_limit,
        };
        // The line is read back for the summary; a failure there is a bug in the writer.
        Ok(tracelb_output(
            &line,
            &trace,
            &clock,
            &shared.hostname,
            Instant::now(),
        )?)
    }
}

/// The flow table never closes a running trace's queue; if it ever did, the trace ends as
/// silent from there on rather than hanging.
fn trace_abandoned() -> super::StopReason {
    super::StopReason::GapLimit
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// A trace's claim on its flows; unregisters them on drop, whatever way the trace ends.
struct Registration<'a> {
    shared: &'a Shared,
    /// This trace's salt, in every tag of its probes.
    salt: u32,
    keys: Vec<FlowKey>,
    sender: mpsc::Sender<Arrival>,
    replies: mpsc::Receiver<Arrival>,
    /// Wakes the trace when nothing arrives (see [`Registration::replies`]).
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<'a> Registration<'a> {
    /// A trace with no flow yet and a reply queue of `capacity`.
    fn new(shared: &'a Shared, capacity: usize) -> Self {
        let (sender, replies) = FlowTable::queue(capacity);
        shared.running.fetch_add(1, Ordering::Relaxed);
        Self {
            shared,
            salt: shared.next_salt.fetch_add(1, Ordering::Relaxed),
            keys: Vec::new(),
            sender,
            replies,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        }
    }

    /// Claims a flow to `request.dst` from `src`: source port `port` (waiting while another
    /// trace uses it; the caller's deadline bounds the wait), else the next free automatic one.
    async fn claim(
        &mut self,
        src: IpAddr,
        request: &TraceRequest,
        probe: Probe,
        port: Option<u16>,
    ) -> Flow {
        let dport = match probe {
            Probe::Udp => UDP_DPORT,
            Probe::Tcp => TCP_DPORT,
            Probe::Icmp => 0,
        };
        for attempt in 1u64.. {
            let sport = port.unwrap_or_else(|| self.shared.auto_port());
            let key = FlowKey {
                dst: request.dst,
                probe,
                sport,
                dport,
            };
            if self.shared.flows.insert(key, &self.sender, self.salt) {
                self.keys.push(key);
                return Flow {
                    src,
                    dst: request.dst,
                    probe,
                    sport,
                    dport,
                    salt: self.salt,
                };
            }
            // A fixed port waits for its trace to end; automatic ones move on, but every
            // AUTO_TRIES they wait too, so a destination with every port busy cannot spin
            // this task past its deadline (the deadline's timeout only fires at an await).
            if port.is_some() || attempt % AUTO_TRIES == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        unreachable!("the attempt counter does not run out")
    }

    /// Waits until `wake` or the next replies, handing every reply queued to `take`; false if
    /// the queue closed (never while the trace is registered).
    async fn replies(&mut self, wake: Instant, mut take: impl FnMut(Arrival)) -> bool {
        // Replies already queued need no timer.
        let mut queued = false;
        while let Ok(arrival) = self.replies.try_recv() {
            self.shared.learn(&arrival.reply);
            take(arrival);
            queued = true;
        }
        if queued {
            return true;
        }
        // One timer per trace, moved only when the wake-up moves (registering a new one in
        // tokio's wheel for every wait was a tenth of the engine's CPU).
        let wake = tokio::time::Instant::from_std(wake);
        if self.timer.deadline() != wake {
            self.timer.as_mut().reset(wake);
        }
        tokio::select! {
            arrival = self.replies.recv() => {
                let Some(arrival) = arrival else { return false };
                self.shared.learn(&arrival.reply);
                take(arrival);
                while let Ok(arrival) = self.replies.try_recv() {
                    self.shared.learn(&arrival.reply);
                    take(arrival);
                }
            }
            () = &mut self.timer => {}
        }
        true
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        for key in &self.keys {
            self.shared.flows.unregister(key);
        }
        self.shared.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Waits until the probe budget allows `n` more probes.
    async fn pace(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let now = Instant::now();
        let at = self.pacer.reserve(n, now);
        // tokio's timer ticks in milliseconds: a sleep, even until now, can cost up to one.
        if at > now {
            tokio::time::sleep_until(at.into()).await;
        }
    }

    /// Sends a batch of probes, each `(tag, flow, id)`, after the global budget allows it,
    /// each one no earlier than its router's pacing allows (a retry is the sign a router is
    /// limited); calls `sent(tag, when, IP length)` as each leaves.
    async fn send_batch<T: Copy>(
        &self,
        batch: Vec<(T, Flow, ProbeId)>,
        packet: &mut Vec<u8>,
        mut sent: impl FnMut(T, Instant, u16),
    ) -> Result<(), EngineError> {
        self.pace(batch.len()).await;
        let now = Instant::now();
        let mut slots: Vec<(Instant, T, Flow, ProbeId)> = batch
            .into_iter()
            .map(|(tag, flow, id)| {
                let at = self.routers.as_ref().map_or(now, |routers| {
                    if id.attempt > 0 {
                        routers.silent(flow.dst, id.ttl, now);
                    }
                    routers.reserve(flow.dst, id.ttl, now, id.attempt > 0)
                });
                (at, tag, flow, id)
            })
            .collect();
        slots.sort_by_key(|&(at, ..)| at);
        for (at, tag, flow, id) in slots {
            if at > now {
                self.counters.router_paced.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep_until(at.into()).await;
            }
            let (tx, bytes) = self.send_probe(&flow, id, packet)?;
            sent(tag, tx, bytes);
        }
        Ok(())
    }

    /// Teaches the router pacing who answered an ICMP error (echo replies and TCP answers are
    /// not rate limited).
    fn learn(&self, reply: &super::Reply) {
        if let Some(routers) = &self.routers
            && matches!(
                reply.kind,
                super::Kind::TimeExceeded | super::Kind::Unreachable { .. }
            )
        {
            routers.learn(reply.flow_dst, reply.id.ttl, reply.from);
        }
    }

    /// Encodes and sends probe `id` of `flow`; returns when it left and its IP length.
    fn send_probe(
        &self,
        flow: &Flow,
        id: ProbeId,
        packet: &mut Vec<u8>,
    ) -> Result<(Instant, u16), EngineError> {
        packet.clear();
        let encoded = encode(flow, id, &self.key, packet)?;
        // Stamped before the send: a reply can be read before the send returns.
        let tx = Instant::now();
        let queued = self.sockets.send(flow, packet, encoded.hop_limit)?;
        let counter = if queued {
            &self.counters.probes_sent
        } else {
            &self.counters.probes_lost
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok((tx, probe_size(flow.dst, encoded.bytes)))
    }

    fn auto_port(&self) -> u16 {
        let n = self.next_port.fetch_add(1, Ordering::Relaxed);
        let span = AUTO_PORTS.end - AUTO_PORTS.start;
        u16::try_from(AUTO_PORTS.start + n % span).unwrap_or(u16::MAX)
    }

    /// A receive thread: reads batches until the engine stops.
    fn listen(&self, which: Listener, index: usize) {
        let mut reader = Reader::new(which);
        let mut failures = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            match reader.read(&self.sockets, |packet| self.on_packet(which, packet)) {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(listener = which.name(), error = %e, failures, "engine receive failed");
                    }
                    std::thread::sleep(super::socket::RECV_POLL);
                }
            }
            self.counters.kernel_drops[index].store(reader.kernel_drops(), Ordering::Relaxed);
        }
    }

    fn on_packet(&self, which: Listener, packet: Packet<'_>) {
        let rx = Instant::now();
        let salt_of = |dst, probe, sport, dport| {
            self.flows.salt(&FlowKey {
                dst,
                probe,
                sport,
                dport,
            })
        };
        let keys = Keys::new(&self.key, &salt_of);
        let decoded = match (which, packet.from) {
            (Listener::IcmpV4 | Listener::TcpV4, _) => decode_v4(packet.bytes, &keys),
            (Listener::IcmpV6, Some(from)) => {
                decode_icmp6(packet.bytes, from, packet.hop_limit, &keys)
            }
            (Listener::TcpV6, Some(from)) => match packet.to {
                Some(to) => decode_tcp6(packet.bytes, from, to, packet.hop_limit, &keys),
                None => Err(super::Stray::NotOurProbe),
            },
            (_, None) => Err(super::Stray::NotOurProbe),
        };
        let counter = match decoded {
            // Shaped like ours, for no running trace: late (or another prober's).
            Err(super::Stray::NoFlow) => &self.counters.late,
            Err(_) => &self.counters.strays,
            Ok(reply) => match self.flows.deliver(reply, rx) {
                Delivery::Delivered => &self.counters.replies,
                Delivery::NoFlow => &self.counters.late,
                Delivery::Overflow => &self.counters.overflow,
            },
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Tracer for Engine {
    fn name(&self) -> &'static str {
        "engine"
    }

    async fn trace(&self, request: &TraceRequest) -> Result<TraceOutput, TraceError> {
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err(TraceError::Unsupported(
                "the engine was shut down".to_owned(),
            ));
        }
        let deadline = request.limits.deadline;
        let run = async {
            match request.method {
                Method::Paris(probe) => self.paris(request, probe).await,
                Method::Mda(probe) => self.mda(request, probe).await,
            }
        };
        tokio::time::timeout(deadline, run)
            .await
            .map_err(|_| TraceError::Timeout(deadline))?
    }

    async fn shutdown(&self) {
        self.stop_threads();
    }
}
