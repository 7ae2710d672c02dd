//! The prober: one thread that runs every trace of an [`Engine`](super::Engine), as scamper's
//! event loop does. It owns each running trace's state machine, the flow table, the probe
//! budget and the receive sockets, so a reply goes from `recvmmsg` to its trace without a lock,
//! a queue or a task wake-up; the caller's task is woken once, when its trace is over, and
//! writes the output itself.
//!
//! ```text
//!  Engine::trace ──Job──▶ Inbox ──eventfd──┐
//!                                           ▼
//!  prober: epoll_wait(receive sockets, eventfd, next wake-up)
//!            readable ─▶ recvmmsg ─▶ decode (keyed tag) ─▶ FlowTable ─▶ trace.on_reply
//!            due      ─▶ trace.poll ─▶ claim flows ─▶ Pacer + RouterPacing ─▶ encode ─▶ send
//!            over     ─▶ oneshot ─▶ Engine::trace (writes the JSON on the caller's task)
//! ```
//!
//! Every loop is bounded: a turn handles what is due and what arrived, then sleeps until the
//! next wake-up of any trace (epoll's millisecond resolution, as tokio's timer), a packet, or a
//! job. A trace whose caller went away (its future dropped) is dropped at its next
//! wait-for-replies wake-up. A reply's receive time is the kernel's (`SO_TIMESTAMPNS`), so how
//! long it waited to be read does not enter its RTT.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;

use super::dispatch::{FlowKey, FlowTable, Owner};
use super::icmpext;
use super::mda::{FlowIx, MdaProbe, MdaTrace, Step as MdaStep};
use super::pacer::Pacer;
use super::paris::{ParisTrace, Step as ParisStep};
use super::routers::RouterPacing;
use super::socket::{Listener, Packet, ProbeSockets, Reader};
use super::{
    EngineError, Flow, Keys, ProbeKey, Reply, StopReason, decode_icmp6, decode_tcp6, decode_v4,
    encode, json::probe_size,
};

/// Source ports (and echo identifiers) handed out when a request does not fix one.
const AUTO_PORTS: std::ops::Range<u32> = 33_000..61_000;
/// Busy automatic ports tried in one turn before a trace waits [`CLAIM_RETRY`].
const AUTO_TRIES: u32 = 64;
/// How long a trace waits before trying again for a flow another trace holds.
const CLAIM_RETRY: Duration = Duration::from_millis(1);
/// Poll / send rounds one trace gets per turn before the others get theirs.
const ROUNDS_PER_TURN: usize = 16;
/// The longest the prober sleeps with traces running (a bound, not a tick).
const MAX_SLEEP_MS: u16 = 1000;
/// Reads of one receive socket per loop turn (each up to [`RECV_BATCH`](super::socket)
/// packets); the rest waits for the next turn, after the traces had theirs.
const READS_PER_TURN: usize = 4;
/// The longest a reply is taken to have waited in its socket (see [`arrival`]).
const MAX_QUEUED: Duration = Duration::from_secs(1);
/// epoll data of the inbox's eventfd; the receive sockets use their index in [`Listener::ALL`].
const BELL: u64 = u64::MAX;

/// A trace's state machine.
#[derive(Debug)]
pub enum Machine {
    /// Single path.
    Paris(ParisTrace),
    /// Multipath.
    Mda(MdaTrace),
}

/// What a poll of a [`Machine`] decided.
enum Polled {
    /// Send what was appended, then poll again at `wake` or on a reply.
    Probe { wake: Instant },
    /// Over; single-path traces say why.
    Done(Option<StopReason>),
}

impl Machine {
    /// Polls at `now`, appending the probes to send to `out`.
    fn poll(&mut self, now: Instant, out: &mut Vec<MdaProbe>) -> Polled {
        match self {
            Machine::Paris(trace) => match trace.poll(now) {
                ParisStep::Done(reason) => Polled::Done(Some(reason)),
                ParisStep::Probe { send, wake } => {
                    out.extend(send.into_iter().map(|id| MdaProbe { flow: 0, id }));
                    Polled::Probe { wake }
                }
            },
            Machine::Mda(trace) => match trace.poll(now) {
                MdaStep::Done => Polled::Done(None),
                MdaStep::Probe { send, wake } => {
                    out.extend(send);
                    Polled::Probe { wake }
                }
            },
        }
    }

    /// How long the trace waits for the answer to one probe.
    fn wait(&self) -> Duration {
        match self {
            Machine::Paris(trace) => trace.config().wait,
            Machine::Mda(trace) => trace.config().wait,
        }
    }

    /// The latest a probe asked for at `now` may be held for its router's pacing, in a trace
    /// that must end by `deadline`. A Paris trace needs one wait after its last probe, so up to
    /// the deadline less a wait; a multipath trace goes in rounds, each decided once the one
    /// before is settled, so a round is held back by at most one wait, leaving the deadline to
    /// the rounds still to come.
    fn hold_until(&self, now: Instant, deadline: Instant) -> Instant {
        let last = deadline.checked_sub(self.wait()).unwrap_or(now);
        match self {
            Machine::Paris(_) => last,
            Machine::Mda(_) => last.min(now + self.wait()),
        }
    }

    fn sent(&mut self, probe: MdaProbe, at: Instant) {
        match self {
            Machine::Paris(trace) => trace.sent(probe.id, at),
            Machine::Mda(trace) => trace.sent(probe, at),
        }
    }

    /// Hands the trace a reply, with the ICMP extension structure its packet carried; false
    /// when the trace does not take it (a second answer to one probe, or one to an attempt
    /// never sent). Only single-path traces keep extensions: scamper prints them in `trace`
    /// hops, not in `tracelb` replies.
    fn on_reply(
        &mut self,
        flow: FlowIx,
        reply: Reply,
        rx: Instant,
        extension: Option<&[u8]>,
    ) -> bool {
        match self {
            Machine::Paris(trace) => {
                let taken = trace.on_reply(reply, rx);
                if let (true, Some(extension)) = (taken, extension) {
                    trace.add_extension(reply.id, extension);
                }
                taken
            }
            Machine::Mda(trace) => trace.on_reply(flow, reply, rx),
        }
    }
}

/// A trace handed to the prober.
#[derive(Debug)]
pub struct Job {
    /// Source, destination, transport and destination port of every flow of the trace (the
    /// prober fills in source port and salt).
    pub template: Flow,
    /// The first flow's source port (echo identifier), when the request fixes it; the next
    /// flows of a multipath trace take the ports after it.
    pub source_port: Option<u16>,
    /// The state machine, configured.
    pub machine: Machine,
    /// The trace is abandoned at this time.
    pub deadline: Instant,
    /// Where the result goes.
    pub done: oneshot::Sender<Result<Finished, Failure>>,
}

/// A trace that ended.
#[derive(Debug)]
pub struct Finished {
    /// Its state machine, with every answer.
    pub machine: Machine,
    /// Its flows, by flow number (the first one is the trace's).
    pub flows: Vec<Flow>,
    /// Its salt.
    pub salt: u32,
    /// The flow template it was given.
    pub template: Flow,
    /// Why a single-path trace stopped.
    pub stop: Option<StopReason>,
    /// When the prober took it.
    pub start: Instant,
    /// When it ended.
    pub end: Instant,
    /// One probe's IP length (0 if none was sent).
    pub probe_size: u16,
}

/// Why a trace did not finish.
#[derive(Debug)]
pub enum Failure {
    /// Its deadline passed.
    Deadline,
    /// A probe could not be sent.
    Send(EngineError),
}

/// The engine's counters, written by the prober and read by [`Engine::stats`](super::Engine).
#[derive(Debug, Default)]
pub struct Counters {
    pub probes_sent: AtomicU64,
    pub probes_lost: AtomicU64,
    pub replies: AtomicU64,
    pub strays: AtomicU64,
    pub late: AtomicU64,
    pub duplicates: AtomicU64,
    pub kernel_drops: [AtomicU32; 4],
    pub router_paced: AtomicU64,
    pub unstamped: AtomicU64,
    /// Routers the prober's pacing holds limited now.
    pub limited_routers: AtomicU64,
}

/// Jobs waiting for the prober, and the eventfd that wakes it.
#[derive(Debug)]
pub struct Inbox {
    /// `None` once the prober is gone: a job submitted then is dropped at once (its caller
    /// sees the engine stopped) rather than left waiting.
    jobs: Mutex<Option<Vec<Job>>>,
    bell: EventFd,
    /// The prober is about to sleep, or sleeps: a new job rings the bell.
    asleep: AtomicBool,
    stop: AtomicBool,
}

impl Inbox {
    fn new() -> Result<Self, EngineError> {
        let bell =
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| {
                EngineError::Io {
                    what: "create eventfd",
                    source: e.into(),
                }
            })?;
        Ok(Self {
            jobs: Mutex::new(Some(Vec::new())),
            bell,
            asleep: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`; wakes the prober if it sleeps (one eventfd write, only then). With the
    /// prober gone the job is dropped, which its caller sees as the engine stopped.
    pub fn submit(&self, job: Job) {
        match self.lock().as_mut() {
            Some(jobs) => jobs.push(job),
            None => return,
        }
        if self.asleep.swap(false, Ordering::SeqCst) {
            let _ = self.bell.write(1);
        }
    }

    /// Whether jobs are waiting.
    fn has_jobs(&self) -> bool {
        self.lock().as_ref().is_some_and(|jobs| !jobs.is_empty())
    }

    /// Moves the waiting jobs into `into` (empty).
    fn take(&self, into: &mut Vec<Job>) {
        if let Some(jobs) = self.lock().as_mut() {
            std::mem::swap(jobs, into);
        }
    }

    /// Drops the waiting jobs and every later one: the prober is gone.
    fn close(&self) {
        self.lock().take();
    }

    /// Asks the prober to stop (its running traces end with their callers seeing it stopped).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.bell.write(1);
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// What the engine's handle and its prober share.
#[derive(Debug)]
pub struct Shared {
    pub sockets: ProbeSockets,
    pub key: ProbeKey,
    pub counters: Counters,
    pub inbox: Inbox,
}

impl Shared {
    /// Shared state over `sockets`.
    pub fn new(sockets: ProbeSockets) -> Result<Self, EngineError> {
        Ok(Self {
            sockets,
            key: ProbeKey::random(),
            counters: Counters::default(),
            inbox: Inbox::new()?,
        })
    }
}

/// A trace's `unsent` and `pending` lists.
type ProbeLists = (Vec<MdaProbe>, Vec<(Instant, MdaProbe)>);

/// Spare [`ProbeLists`] kept at most.
const MAX_SPARE: usize = 4096;

/// One running trace.
#[derive(Debug)]
struct Running {
    machine: Machine,
    template: Flow,
    source_port: Option<u16>,
    salt: u32,
    flows: Vec<Flow>,
    /// Probes the machine asked for, waiting for their flows to be claimed.
    unsent: Vec<MdaProbe>,
    /// Probes reserved in the budget, each with when it may leave; latest first.
    pending: Vec<(Instant, MdaProbe)>,
    /// The wake-up in the timer heap that counts (older entries for this slot are stale).
    timer: Option<Instant>,
    /// In the ready list.
    ready: bool,
    start: Instant,
    deadline: Instant,
    probe_size: u16,
    done: oneshot::Sender<Result<Finished, Failure>>,
}

/// What a turn of a trace decided.
enum Turn {
    Wait(Instant),
    Done(Option<StopReason>),
    Failed(Failure),
    /// The caller went away.
    Gone,
}

/// The prober's sending side: what a trace's turn uses besides the trace itself.
struct Sender {
    shared: Arc<Shared>,
    flows: FlowTable,
    pacer: Pacer,
    routers: Option<RouterPacing>,
    packet: Vec<u8>,
    next_port: u32,
}

impl Sender {
    /// One turn of trace `r` (slot `ix`) at `now`, woken by its `timer` or by replies: sends
    /// what is due, claims flows, reserves budget, polls the machine, until it has to wait or
    /// is over. The machine is polled even while some of its probes wait for their turn (a
    /// router's pacing can hold one for most of the trace's deadline): the rest of the trace
    /// goes on meanwhile, and the machines wait for a probe asked for but not yet sent as for
    /// one in flight.
    fn turn(&mut self, r: &mut Running, ix: usize, now: Instant, timer: bool) -> Turn {
        // Checked when the trace's own timer wakes it (not on replies: the flag's memory is
        // cold by then, and checking on every wake-up was a twentieth of the prober's time),
        // so a trace whose caller left ends by its next timed wake-up, and its probes still
        // held for their turn are never sent.
        if timer && r.done.is_closed() {
            return Turn::Gone;
        }
        if now >= r.deadline {
            return Turn::Failed(Failure::Deadline);
        }
        for _ in 0..ROUNDS_PER_TURN {
            let held = match self.send_due(r, now) {
                Err(e) => return Turn::Failed(Failure::Send(e)),
                Ok(held) => held,
            };
            if !r.unsent.is_empty() {
                if !self.claim(r, ix) {
                    return Turn::Wait((now + CLAIM_RETRY).min(r.deadline));
                }
                self.reserve(r, now);
                continue;
            }
            match r.machine.poll(now, &mut r.unsent) {
                Polled::Done(stop) => return Turn::Done(stop),
                Polled::Probe { wake } if r.unsent.is_empty() => {
                    let wake = held.map_or(wake, |at| at.min(wake));
                    return Turn::Wait(wake.min(r.deadline));
                }
                Polled::Probe { .. } => {}
            }
        }
        Turn::Wait(now)
    }

    /// Sends the pending probes due at `now`; the time of the next one, if any.
    fn send_due(&mut self, r: &mut Running, now: Instant) -> Result<Option<Instant>, EngineError> {
        while let Some(&(at, probe)) = r.pending.last() {
            if at > now {
                return Ok(Some(at));
            }
            r.pending.pop();
            let flow = r.flows[usize::from(probe.flow)];
            self.packet.clear();
            let encoded = encode(&flow, probe.id, &self.shared.key, &mut self.packet)?;
            // Stamped before the send: a reply can be read before the send returns.
            let tx = Instant::now();
            let queued = self
                .shared
                .sockets
                .send(&flow, &self.packet, encoded.hop_limit)?;
            let counters = &self.shared.counters;
            let counter = if queued {
                &counters.probes_sent
            } else {
                &counters.probes_lost
            };
            counter.fetch_add(1, Ordering::Relaxed);
            r.probe_size = probe_size(flow.dst, encoded.bytes);
            r.machine.sent(probe, tx);
        }
        Ok(None)
    }

    /// Claims every flow up to the highest one `r.unsent` uses; false when one is taken (a
    /// fixed port another trace uses, or [`AUTO_TRIES`] busy automatic ones).
    fn claim(&mut self, r: &mut Running, ix: usize) -> bool {
        let newest = r
            .unsent
            .iter()
            .map(|p| usize::from(p.flow))
            .max()
            .unwrap_or(0);
        while r.flows.len() <= newest {
            let flow_ix = FlowIx::try_from(r.flows.len()).unwrap_or(FlowIx::MAX);
            // After the first flow, fixed ports go up one by one from the requested one.
            let want = match (r.source_port, r.flows.last()) {
                (Some(port), None) => Some(port),
                (Some(_), Some(last)) => Some(last.sport.wrapping_add(1).max(1)),
                (None, _) => None,
            };
            let tries = if want.is_some() { 1 } else { AUTO_TRIES };
            let owner = Owner {
                trace: ix,
                flow: flow_ix,
                salt: r.salt,
            };
            let claimed = (0..tries).find_map(|_| {
                let sport = want.unwrap_or_else(|| self.auto_port());
                let flow = Flow {
                    sport,
                    salt: r.salt,
                    ..r.template
                };
                self.flows
                    .insert(FlowKey::from(&flow), owner)
                    .then_some(flow)
            });
            match claimed {
                Some(flow) => r.flows.push(flow),
                None => return false,
            }
        }
        true
    }

    fn auto_port(&mut self) -> u16 {
        let n = self.next_port;
        self.next_port = self.next_port.wrapping_add(1);
        let span = AUTO_PORTS.end - AUTO_PORTS.start;
        u16::try_from(AUTO_PORTS.start + n % span).unwrap_or(u16::MAX)
    }

    /// Moves `r.unsent` into `r.pending`: the batch gets its time from the global budget, then
    /// each probe no earlier than its router's pacing allows (a retry is the sign a router is
    /// limited), unless that is too late for an answer before the trace's deadline.
    fn reserve(&mut self, r: &mut Running, now: Instant) {
        let n = u32::try_from(r.unsent.len()).unwrap_or(u32::MAX);
        let base = self.pacer.reserve(n, now);
        let dst = r.template.dst;
        let latest = r.machine.hold_until(now, r.deadline);
        // Reversed, so that after the stable sort (latest first) equal times pop in order.
        for probe in r.unsent.drain(..).rev() {
            let at = self.routers.as_mut().map_or(base, |routers| {
                let retry = probe.id.attempt > 0;
                if retry {
                    routers.silent(dst, probe.id.ttl, base);
                }
                routers.reserve(dst, probe.id.ttl, base, retry, latest)
            });
            if at > base {
                self.shared
                    .counters
                    .router_paced
                    .fetch_add(1, Ordering::Relaxed);
            }
            r.pending.push((at, probe));
        }
        r.pending.sort_by_key(|&(at, _)| Reverse(at));
        self.publish_limited(now);
    }

    /// Publishes how many routers the pacing holds limited at `now` (pruning those forgotten,
    /// at most once a second).
    fn publish_limited(&mut self, now: Instant) {
        if let Some(routers) = &mut self.routers {
            let limited = routers.prune(now);
            self.shared
                .counters
                .limited_routers
                .store(limited as u64, Ordering::Relaxed);
        }
    }

    /// Whether some router is held limited (the prober then wakes once a second to let the
    /// count fall when the holds pass).
    fn limits_held(&self) -> bool {
        self.routers
            .as_ref()
            .is_some_and(|r| r.limited_routers() > 0)
    }
}

/// Closes the inbox when the prober ends, by returning or by a panic.
struct CloseOnExit(Arc<Shared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.inbox.close();
    }
}

/// The prober thread's state.
struct Prober {
    sender: Sender,
    epoll: Epoll,
    readers: Vec<Reader>,
    traces: Vec<Option<Running>>,
    free: Vec<usize>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    ready: Vec<usize>,
    /// The ready list being worked through (kept to reuse its allocation).
    working: Vec<usize>,
    jobs: Vec<Job>,
    /// Probe lists of finished traces, emptied, for the next ones (allocating them per trace
    /// was a tenth of the prober's time).
    spare: Vec<ProbeLists>,
    next_salt: u32,
    /// Failed reads so far (logged at the first and every power of two).
    receive_failures: u32,
}

/// Starts the prober thread over `shared` (its sockets registered with epoll first, so a
/// failure is returned here).
pub fn spawn(
    shared: Arc<Shared>,
    pacer: Pacer,
    routers: Option<RouterPacing>,
) -> Result<JoinHandle<()>, EngineError> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| EngineError::Io {
        what: "create epoll",
        source: e.into(),
    })?;
    let register = |e: Errno| EngineError::Io {
        what: "register with epoll",
        source: e.into(),
    };
    for (i, which) in Listener::ALL.into_iter().enumerate() {
        let socket = shared.sockets.listener(which);
        epoll
            .add(socket, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
            .map_err(register)?;
    }
    epoll
        .add(
            &shared.inbox.bell,
            EpollEvent::new(EpollFlags::EPOLLIN, BELL),
        )
        .map_err(register)?;
    std::thread::Builder::new()
        .name("hoptrace-prober".to_owned())
        .spawn(move || {
            let _close = CloseOnExit(Arc::clone(&shared));
            let prober = Prober {
                sender: Sender {
                    shared,
                    flows: FlowTable::default(),
                    pacer,
                    routers,
                    packet: Vec::with_capacity(64),
                    next_port: std::process::id() % 1000,
                },
                epoll,
                // Built here: their receive headers hold pointers, which do not cross threads.
                readers: Listener::ALL.into_iter().map(Reader::new).collect(),
                traces: Vec::new(),
                free: Vec::new(),
                timers: BinaryHeap::new(),
                ready: Vec::new(),
                working: Vec::new(),
                jobs: Vec::new(),
                spare: Vec::new(),
                next_salt: 0,
                receive_failures: 0,
            };
            prober.run();
        })
        .map_err(|source| EngineError::Io {
            what: "start the prober thread",
            source,
        })
}

impl Prober {
    fn shared(&self) -> &Shared {
        &self.sender.shared
    }

    fn run(mut self) {
        let mut events = [EpollEvent::empty(); 8];
        let mut failures = 0u32;
        while !self.shared().inbox.stopped() {
            self.take_jobs();
            self.run_ready();
            self.run_timers();
            if self.sender.limits_held() {
                self.sender.publish_limited(Instant::now());
            }
            let timeout = self.sleep_for();
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(error = %e, failures, "engine epoll_wait failed");
                    }
                    std::thread::sleep(CLAIM_RETRY);
                    0
                }
            };
            self.shared().inbox.asleep.store(false, Ordering::SeqCst);
            for event in &events[..n] {
                match event.data() {
                    BELL => {
                        let _ = self.shared().inbox.bell.read();
                    }
                    i => self.receive(usize::try_from(i).unwrap_or(usize::MAX)),
                }
            }
        }
        // Dropping the running traces drops their senders: each caller learns the engine
        // stopped.
    }

    /// How long to sleep: not at all with work waiting, else until the earliest wake-up.
    /// Tells the inbox it sleeps first, then looks for jobs, so none is missed.
    fn sleep_for(&mut self) -> EpollTimeout {
        let inbox = &self.shared().inbox;
        inbox.asleep.store(true, Ordering::SeqCst);
        if !self.ready.is_empty() || inbox.has_jobs() || inbox.stopped() {
            inbox.asleep.store(false, Ordering::SeqCst);
            return EpollTimeout::ZERO;
        }
        let Some(&Reverse((at, _))) = self.timers.peek() else {
            // Idle; with routers held limited, a look once a second lets their count fall.
            return if self.sender.limits_held() {
                EpollTimeout::from(MAX_SLEEP_MS)
            } else {
                EpollTimeout::NONE
            };
        };
        let wait = at.saturating_duration_since(Instant::now());
        // Rounded up: waking early would only spin.
        let ms = wait.as_micros().div_ceil(1000);
        EpollTimeout::from(u16::try_from(ms).unwrap_or(MAX_SLEEP_MS).min(MAX_SLEEP_MS))
    }

    fn take_jobs(&mut self) {
        let mut jobs = std::mem::take(&mut self.jobs);
        self.sender.shared.inbox.take(&mut jobs);
        let now = Instant::now();
        for job in jobs.drain(..) {
            let salt = self.next_salt;
            self.next_salt = self.next_salt.wrapping_add(1);
            let (unsent, pending) = self.spare.pop().unwrap_or_default();
            let running = Running {
                machine: job.machine,
                template: job.template,
                source_port: job.source_port,
                salt,
                flows: Vec::new(),
                unsent,
                pending,
                timer: None,
                ready: true,
                start: now,
                deadline: job.deadline,
                probe_size: 0,
                done: job.done,
            };
            let ix = match self.free.pop() {
                Some(ix) => {
                    self.traces[ix] = Some(running);
                    ix
                }
                None => {
                    self.traces.push(Some(running));
                    self.traces.len() - 1
                }
            };
            self.ready.push(ix);
        }
        self.jobs = jobs;
    }

    fn run_ready(&mut self) {
        std::mem::swap(&mut self.ready, &mut self.working);
        let mut working = std::mem::take(&mut self.working);
        let now = Instant::now();
        for &ix in &working {
            if let Some(r) = self.traces.get_mut(ix).and_then(Option::as_mut) {
                r.ready = false;
                self.advance(ix, now, false);
            }
        }
        working.clear();
        self.working = working;
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((at, ix))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(r) = self.traces.get_mut(ix).and_then(Option::as_mut)
                && r.timer == Some(at)
            {
                r.timer = None;
                self.advance(ix, now, true);
            }
        }
    }

    /// A turn of trace `ix` at `now` (this loop turn's reading of the clock; sends stamp their
    /// own), woken by its `timer` or not, then what it decided: a wake-up, or its end.
    fn advance(&mut self, ix: usize, now: Instant, timer: bool) {
        let Some(r) = self.traces.get_mut(ix).and_then(Option::as_mut) else {
            return;
        };
        match self.sender.turn(r, ix, now, timer) {
            // Due already: the next loop turn, after the sockets are read.
            Turn::Wait(at) if at <= now => {
                if !r.ready {
                    r.ready = true;
                    self.ready.push(ix);
                }
            }
            Turn::Wait(at) => {
                if r.timer != Some(at) {
                    r.timer = Some(at);
                    self.timers.push(Reverse((at, ix)));
                }
            }
            Turn::Done(stop) => self.finish(ix, Ok(stop)),
            Turn::Failed(failure) => self.finish(ix, Err(failure)),
            // Nobody reads the result; finishing frees the flows.
            Turn::Gone => self.finish(ix, Err(Failure::Deadline)),
        }
    }

    /// Ends trace `ix`: its flows are freed and its result goes to its caller.
    fn finish(&mut self, ix: usize, result: Result<Option<StopReason>, Failure>) {
        let Some(r) = self.traces.get_mut(ix).and_then(Option::take) else {
            return;
        };
        self.free.push(ix);
        for flow in &r.flows {
            self.sender.flows.remove(&FlowKey::from(flow));
        }
        // Probes it booked but never sent (it failed or its caller left) go back to the budget,
        // and their routers' turns to the traces queued behind them.
        if !r.pending.is_empty() {
            let unsent = u32::try_from(r.pending.len()).unwrap_or(u32::MAX);
            self.sender.pacer.refund(unsent, Instant::now());
            if let Some(routers) = &mut self.sender.routers {
                // Earliest last: the latest turns are given back first.
                for &(at, probe) in &r.pending {
                    routers.release(r.template.dst, probe.id.ttl, at);
                }
            }
        }
        if self.spare.len() < MAX_SPARE {
            let (mut unsent, mut pending) = (r.unsent, r.pending);
            unsent.clear();
            pending.clear();
            self.spare.push((unsent, pending));
        }
        let result = result.map(|stop| Finished {
            machine: r.machine,
            flows: r.flows,
            salt: r.salt,
            template: r.template,
            stop,
            start: r.start,
            end: Instant::now(),
            probe_size: r.probe_size,
        });
        // The caller may have gone: nothing to tell then.
        let _ = r.done.send(result);
    }

    /// Reads receive socket `i` (a few batches at most, until one comes back short) and hands
    /// each reply to its trace.
    fn receive(&mut self, i: usize) {
        for _ in 0..READS_PER_TURN {
            let asked = self.readers.get(i).map_or(0, Reader::batch);
            if self.receive_batch(i) < asked {
                break;
            }
        }
    }

    /// Reads one batch from receive socket `i`; returns how many packets it read.
    fn receive_batch(&mut self, i: usize) -> usize {
        let Some((&which, reader)) = Listener::ALL.get(i).zip(self.readers.get_mut(i)) else {
            return 0;
        };
        let shared = &self.sender.shared;
        let flows = &self.sender.flows;
        let routers = &mut self.sender.routers;
        let traces = &mut self.traces;
        let ready = &mut self.ready;
        // One reading of the clocks per batch, taken when the batch is in: every packet of it
        // was queued before the read returned.
        let mut read_at = None;
        let read = reader.read_ready(&shared.sockets, |packet| {
            let rx = arrival(packet.arrived, *read_at.get_or_insert_with(clocks_now));
            let counters = &shared.counters;
            let counter = match decode(shared, flows, which, packet) {
                // Shaped like ours, for no running trace: late (or another prober's).
                Err(super::Stray::NoFlow) => &counters.late,
                Err(_) => &counters.strays,
                Ok((reply, owner)) => {
                    let running = traces
                        .get_mut(owner.trace)
                        .and_then(Option::as_mut)
                        .map(|r| (owner, r));
                    match running {
                        None => &counters.late,
                        Some((owner, r)) => {
                            if packet.arrived.is_none() {
                                counters.unstamped.fetch_add(1, Ordering::Relaxed);
                            }
                            let extension = reply
                                .kind
                                .is_icmp_error()
                                .then(|| icmpext::find(packet.bytes, which))
                                .flatten();
                            if r.machine.on_reply(owner.flow, reply, rx, extension) {
                                learn(routers.as_mut(), &reply);
                                if !r.ready {
                                    r.ready = true;
                                    ready.push(owner.trace);
                                }
                                &counters.replies
                            } else {
                                &counters.duplicates
                            }
                        }
                    }
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
        });
        shared.counters.kernel_drops[i].store(reader.kernel_drops(), Ordering::Relaxed);
        read.unwrap_or_else(|e| {
            self.receive_failures += 1;
            let failures = self.receive_failures;
            if failures == 1 || failures.is_power_of_two() {
                tracing::warn!(listener = which.name(), error = %e, failures, "engine receive failed");
            }
            0
        })
    }
}

/// Decodes `packet` from receive socket `which`, authenticating it with the salt of the trace
/// running the flow it quotes; returns the reply and that trace (one flow table lookup).
fn decode(
    shared: &Shared,
    flows: &FlowTable,
    which: Listener,
    packet: Packet<'_>,
) -> Result<(Reply, Owner), super::Stray> {
    let found = Cell::new(None);
    let salt_of = |dst, probe, sport, dport| {
        let key = FlowKey {
            dst,
            probe,
            sport,
            dport,
        };
        let owner = flows.owner(&key);
        found.set(owner.map(|owner| (key, owner)));
        owner.map(|owner| owner.salt)
    };
    let keys = Keys::new(&shared.key, &salt_of);
    let reply = match (which, packet.from) {
        (Listener::IcmpV4 | Listener::TcpV4, _) => decode_v4(packet.bytes, &keys),
        (Listener::IcmpV6, Some(from)) => decode_icmp6(packet.bytes, from, packet.hop_limit, &keys),
        (Listener::TcpV6, Some(from)) => match packet.to {
            Some(to) => decode_tcp6(packet.bytes, from, to, packet.hop_limit, &keys),
            None => Err(super::Stray::NotOurProbe),
        },
        (_, None) => Err(super::Stray::NotOurProbe),
    }?;
    // The tag was checked with the salt of the flow the reply names; looked up again only if
    // the decoder ever asked for another one.
    let key = FlowKey::of(&reply);
    let owner = match found.get() {
        Some((asked, owner)) if asked == key => Some(owner),
        _ => flows.owner(&key),
    };
    owner
        .map(|owner| (reply, owner))
        .ok_or(super::Stray::NoFlow)
}

/// The monotonic and the realtime clock (since the Unix epoch), read together.
fn clocks_now() -> (Instant, Duration) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (Instant::now(), wall)
}

/// When a packet was received, on the monotonic clock: the kernel's stamp `arrived` (realtime,
/// since the Unix epoch) placed before `read`, a reading of both clocks after the packet was
/// read. At most [`MAX_QUEUED`] before `read` (a step of the realtime clock must not make an
/// RTT absurd), never after it; `read`'s own instant without a stamp.
fn arrival(arrived: Option<Duration>, (mono, wall): (Instant, Duration)) -> Instant {
    let Some(arrived) = arrived else {
        return mono;
    };
    let waited = wall.saturating_sub(arrived).min(MAX_QUEUED);
    mono.checked_sub(waited).unwrap_or(mono)
}

/// Teaches the router pacing who answered an ICMP error (echo replies and TCP answers are not
/// rate limited).
fn learn(routers: Option<&mut RouterPacing>, reply: &Reply) {
    if let Some(routers) = routers
        && reply.kind.is_icmp_error()
    {
        routers.learn(reply.flow_dst, reply.id.ttl, reply.from);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::Probe;
    use crate::engine::paris::ParisConfig;

    fn job() -> (Job, oneshot::Receiver<Result<Finished, Failure>>) {
        let (done, finished) = oneshot::channel();
        let dst = IpAddr::V4(Ipv4Addr::new(10, 77, 100, 1));
        let job = Job {
            template: Flow {
                src: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
                dst,
                probe: Probe::Udp,
                sport: 0,
                dport: 33435,
                salt: 0,
            },
            source_port: None,
            machine: Machine::Paris(ParisTrace::new(ParisConfig {
                max_ttl: 8,
                attempts: 2,
                wait: Duration::from_secs(1),
                gap_limit: 5,
            })),
            deadline: Instant::now() + Duration::from_secs(5),
            done,
        };
        (job, finished)
    }

    #[test]
    fn a_kernel_stamp_places_the_arrival_before_the_read_within_bounds() {
        let mono = Instant::now() + Duration::from_secs(10);
        let wall = Duration::from_secs(1_700_000_000);
        let read = (mono, wall);
        assert_eq!(arrival(None, read), mono, "no stamp: when it was read");
        assert_eq!(
            arrival(Some(wall - Duration::from_micros(250)), read),
            mono - Duration::from_micros(250),
            "waited 250 µs in the socket"
        );
        assert_eq!(
            arrival(Some(wall + Duration::from_millis(3)), read),
            mono,
            "a stamp after the read (the clock stepped back) is the read"
        );
        assert_eq!(
            arrival(Some(wall - Duration::from_secs(3600)), read),
            mono - MAX_QUEUED,
            "a stamp long before (the clock stepped forward) is bounded"
        );
    }

    #[test]
    fn a_job_rings_the_bell_only_while_the_prober_sleeps() {
        let inbox = Inbox::new().expect("eventfd");
        let (first, _first) = job();
        inbox.submit(first);
        assert!(inbox.has_jobs());
        assert_eq!(
            inbox.bell.read(),
            Err(Errno::EAGAIN),
            "an awake prober is not rung"
        );
        inbox.asleep.store(true, Ordering::SeqCst);
        let (second, _second) = job();
        inbox.submit(second);
        assert_eq!(inbox.bell.read(), Ok(1), "a sleeping prober is rung once");
        assert!(!inbox.asleep.load(Ordering::SeqCst));
        let mut taken = Vec::new();
        inbox.take(&mut taken);
        assert_eq!(taken.len(), 2);
        assert!(!inbox.has_jobs());
    }

    #[test]
    fn once_closed_waiting_and_later_jobs_are_dropped_so_their_callers_do_not_hang() {
        let inbox = Inbox::new().expect("eventfd");
        let (waiting, mut waiting_rx) = job();
        inbox.submit(waiting);
        inbox.close();
        assert!(
            waiting_rx
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed),
            "a job waiting at close is dropped"
        );
        let (late, mut late_rx) = job();
        inbox.submit(late);
        assert!(!inbox.has_jobs());
        assert!(
            late_rx
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed),
            "a job submitted after close is dropped"
        );
    }

    #[test]
    fn a_single_path_trace_keeps_the_extension_of_a_reply_it_takes_and_no_other() {
        use crate::engine::mda::{Confidence, MdaConfig, MdaTrace};
        use crate::engine::tests::udp_reply;
        use crate::engine::{Kind, ProbeId};
        let (mut job, _finished) = job();
        let now = Instant::now();
        let mut probes = Vec::new();
        assert!(matches!(
            job.machine.poll(now, &mut probes),
            Polled::Probe { .. }
        ));
        for probe in &probes {
            job.machine.sent(*probe, now);
        }
        let id = ProbeId { ttl: 1, attempt: 0 };
        let reply = udp_reply(
            id,
            IpAddr::V4(Ipv4Addr::new(10, 77, 1, 2)),
            Kind::TimeExceeded,
        );
        let ext = [0x20, 0, 0, 0, 0, 8, 1, 1, 0, 1, 0, 1];
        assert!(job.machine.on_reply(0, reply, now, Some(&ext)));
        // The same probe answered again, with another extension: a duplicate, not kept.
        let other = [0x20, 0, 0, 0, 0, 8, 1, 1, 0, 2, 0, 1];
        assert!(!job.machine.on_reply(0, reply, now, Some(&other)));
        let Machine::Paris(trace) = &mut job.machine else {
            unreachable!()
        };
        let (_, extensions) = trace.answers_and_extensions();
        assert_eq!(extensions.get(id), Some(ext.as_slice()));
        assert_eq!(extensions.get(ProbeId { ttl: 2, attempt: 0 }), None);
        // A multipath trace takes the reply and has nowhere to print the extension.
        let mut mda = Machine::Mda(MdaTrace::new(MdaConfig {
            confidence: Confidence::P95,
            max_ttl: 8,
            attempts: 2,
            wait: Duration::from_secs(1),
            gap_limit: 5,
            max_probes: 100,
        }));
        let mut probes = Vec::new();
        mda.poll(now, &mut probes);
        let first = probes[0];
        mda.sent(first, now);
        let reply = udp_reply(
            first.id,
            IpAddr::V4(Ipv4Addr::new(10, 77, 1, 2)),
            Kind::TimeExceeded,
        );
        assert!(mda.on_reply(first.flow, reply, now, Some(&ext)));
    }
}
