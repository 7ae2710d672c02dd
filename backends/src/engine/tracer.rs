//! [`Engine`]: the in-process [`Tracer`]. One set of raw sockets, one flow table and one probe
//! budget serve every trace, all run by one prober thread (`prober.rs`); a call to
//! [`Tracer::trace`] hands its trace to the prober, waits for it to end, and writes the
//! scamper-shaped output on the caller's task.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::json::{Clock, HostName, TraceLine, TracelbLine, trace_output, tracelb_output};
use super::mda::{MdaConfig, MdaTrace};
use super::pacer::Pacer;
use super::paris::{ParisConfig, ParisTrace};
use super::prober::{self, Failure, Finished, Job, Machine, Shared};
use super::routers::{RouterLimits, RouterPacing};
use super::socket::ProbeSockets;
use super::{EngineError, Flow, StopReason};
use crate::{Method, NetNs, Probe, TraceError, TraceOutput, TraceRequest, Tracer};

/// scamper's default destination port for UDP Paris traces.
pub const UDP_DPORT: u16 = 33435;
/// scamper's default destination port for TCP traces (`trace -P tcp` uses the same base port
/// as UDP unless told otherwise), so both backends probe the same flow.
pub const TCP_DPORT: u16 = 33435;

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
    /// Replies to a probe its trace already has an answer for (or to an attempt it never
    /// sent): one answer per probe counts, the others are dropped here.
    pub duplicates: u64,
    /// Packets read that are not replies to our probes (failed to decode or to authenticate).
    /// A late reply to an earlier trace of a flow that a later trace runs now (the same
    /// destination and ports, as with a fixed `--source-port`) fails the later trace's tag and
    /// counts here too.
    pub strays: u64,
    /// Replies shaped like ours for a flow no trace is running (arrived after their trace
    /// ended, or another prober's); they cannot be authenticated, so they are not checked.
    pub late: u64,
    /// Packets the kernel dropped on the receive sockets (`SO_RXQ_OVFL`).
    pub kernel_drops: u64,
    /// Probes held back for a router that showed an ICMP rate limit.
    pub router_paced: u64,
    /// Replies delivered without the kernel's receive time: their RTT includes the time they
    /// waited to be read.
    pub unstamped: u64,
    /// Routers paced now.
    pub limited_routers: u64,
}

/// The in-process tracer (see the module docs).
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    /// This host's name, escaped for the cycle lines.
    hostname: HostName,
    options: EngineOptions,
    running: AtomicUsize,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Opens the raw sockets (inside `netns` when given, checked) and starts the prober
    /// thread. Needs `CAP_NET_RAW`.
    pub fn open(netns: Option<&NetNs>, options: EngineOptions) -> Result<Self, EngineError> {
        let sockets = match netns {
            Some(ns) => ProbeSockets::open_in(ns)?,
            None => ProbeSockets::open()?,
        };
        Self::start(sockets, options)
    }

    /// Starts the engine on sockets already open ([`ProbeSockets::open`] /
    /// [`ProbeSockets::open_in`]): needs no privilege, so a process can open the sockets, drop
    /// its capabilities, then start the engine, whose prober thread inherits none.
    pub fn start(sockets: ProbeSockets, options: EngineOptions) -> Result<Self, EngineError> {
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".to_owned());
        let shared = Arc::new(Shared::new(sockets)?);
        let thread = prober::spawn(
            Arc::clone(&shared),
            Pacer::new(options.pps, options.burst),
            options.router_limits.map(RouterPacing::new),
        )?;
        Ok(Self {
            shared,
            hostname: HostName::new(&hostname),
            options,
            running: AtomicUsize::new(0),
            thread: std::sync::Mutex::new(Some(thread)),
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
            duplicates: c.duplicates.load(Ordering::Relaxed),
            kernel_drops: c
                .kernel_drops
                .iter()
                .map(|d| u64::from(d.load(Ordering::Relaxed)))
                .sum(),
            router_paced: c.router_paced.load(Ordering::Relaxed),
            unstamped: c.unstamped.load(Ordering::Relaxed),
            limited_routers: c.limited_routers.load(Ordering::Relaxed),
        }
    }

    /// Traces currently running.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    fn stop_prober(&self) {
        self.shared.inbox.stop();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// Hands a trace to the prober and waits for its end.
    async fn run(
        &self,
        request: &TraceRequest,
        probe: Probe,
        machine: Machine,
    ) -> Result<Finished, TraceError> {
        let _running = RunningGuard::new(&self.running);
        let src = self.shared.sockets.source_for(request.dst)?;
        let dport = match probe {
            Probe::Udp => UDP_DPORT,
            Probe::Tcp => TCP_DPORT,
            Probe::Icmp => 0,
        };
        let deadline = request.limits.deadline;
        let (done, finished) = oneshot::channel();
        self.shared.inbox.submit(Job {
            template: Flow {
                src,
                dst: request.dst,
                probe,
                sport: 0,
                dport,
                salt: 0,
            },
            source_port: request.source_port,
            machine,
            // A deadline past what `Instant` holds is as good as none.
            deadline: crate::request::instant_after(Instant::now(), deadline),
            done,
        });
        match finished.await {
            Ok(Ok(finished)) => Ok(finished),
            Ok(Err(Failure::Deadline)) => Err(TraceError::Timeout(deadline)),
            Ok(Err(Failure::Send(e))) => Err(e.into()),
            Err(_) => Err(shut_down()),
        }
    }

    async fn paris(&self, request: &TraceRequest, probe: Probe) -> Result<TraceOutput, TraceError> {
        let limits = request.limits;
        let machine = Machine::Paris(ParisTrace::new(ParisConfig {
            max_ttl: limits.max_ttl,
            attempts: limits.attempts,
            wait: limits.wait,
            gap_limit: self.options.gap_limit,
        }));
        let clock = Clock::now();
        let mut finished = self.run(request, probe, machine).await?;
        let flow = finished.first_flow();
        let Machine::Paris(trace) = &mut finished.machine else {
            unreachable!("the prober returns the machine it was given");
        };
        let icmp_sum = if probe == Probe::Icmp {
            super::probe::Tags::echo_checksum(&self.shared.key, flow.salt, flow.dst, flow.sport)
        } else {
            0
        };
        let (hop_count, probe_count) = (trace.hop_count(), trace.probes_sent());
        let config = *trace.config();
        let (answers, extensions) = trace.answers_and_extensions();
        let line = TraceLine {
            flow: &flow,
            icmp_sum,
            stop: finished.stop.unwrap_or(StopReason::GapLimit),
            start: finished.start,
            hop_count,
            attempts: config.attempts,
            wait: config.wait,
            probe_size: finished.probe_size,
            probe_count,
            answers,
            extensions,
        };
        Ok(trace_output(&line, &clock, &self.hostname, finished.end))
    }

    /// A multipath trace: flows differ in their source port (echo identifier for ICMP), each
    /// claimed in the flow table when the trace first uses it.
    async fn mda(&self, request: &TraceRequest, probe: Probe) -> Result<TraceOutput, TraceError> {
        let limits = request.limits;
        let machine = Machine::Mda(MdaTrace::new(MdaConfig {
            confidence: limits.confidence,
            max_ttl: limits.max_ttl,
            attempts: limits.attempts,
            wait: limits.wait,
            gap_limit: self.options.gap_limit,
            max_probes: limits.probe_budget,
        }));
        let clock = Clock::now();
        let finished = self.run(request, probe, machine).await?;
        let Machine::Mda(trace) = &finished.machine else {
            unreachable!("the prober returns the machine it was given");
        };
        let first = finished.first_flow();
        let flow_ids: Vec<u16> = finished.flows.iter().map(|f| f.sport).collect();
        let line = TracelbLine {
            flow: &first,
            flow_ids: &flow_ids,
            start: finished.start,
            probe_size: finished.probe_size,
            gap_limit: self.options.gap_limit,
        };
        // The line is read back for the summary; a failure there is a bug in the writer.
        Ok(tracelb_output(
            &line,
            trace,
            &clock,
            &self.hostname,
            finished.end,
        )?)
    }
}

impl Finished {
    /// The trace's flow for its header: the first one (there is one unless it sent nothing).
    fn first_flow(&self) -> Flow {
        self.flows.first().copied().unwrap_or(Flow {
            sport: 0,
            salt: self.salt,
            ..self.template
        })
    }
}

fn shut_down() -> TraceError {
    TraceError::Unsupported("the engine was shut down".to_owned())
}

/// Counts a trace as running for as long as it lives.
struct RunningGuard<'a>(&'a AtomicUsize);

impl<'a> RunningGuard<'a> {
    fn new(running: &'a AtomicUsize) -> Self {
        running.fetch_add(1, Ordering::Relaxed);
        Self(running)
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_prober();
    }
}

#[async_trait]
impl Tracer for Engine {
    fn name(&self) -> &'static str {
        "engine"
    }

    async fn trace(&self, request: &TraceRequest) -> Result<TraceOutput, TraceError> {
        if self.shared.inbox.stopped() {
            return Err(shut_down());
        }
        // The deadline is kept by the prober (no timer per trace here).
        match request.method {
            Method::Paris(probe) => self.paris(request, probe).await,
            Method::Mda(probe) => self.mda(request, probe).await,
        }
    }

    async fn shutdown(&self) {
        self.stop_prober();
    }
}
