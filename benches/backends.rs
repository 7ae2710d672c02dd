//! Every backend side by side in one lab, in one run: the in-process engine (issue 3) and the
//! shared scamper daemon (issue 4) against scamper reading a target list, `ScamperProcess` (one
//! scamper per trace), and the kernel's own ceiling (a raw send/receive loop at the same TTLs).
//!
//! `cargo bench --bench backends` (needs root: it builds network namespaces). `BENCH_TRACES`
//! (default 10000) sets the traces per system and round, `BENCH_ROUNDS` (default 3) the rounds,
//! `BENCH_SYSTEMS` (comma-separated: list, daemon, process, engine, ceiling; default all) which
//! systems run (`engine` is both engine rows; `engine-budget` or `engine-free` one of them),
//! `BENCH_ENGINE_CONCURRENCY` (default 128) the engine's traces in flight, `BENCH_WORKERS`
//! (default: one per CPU, as `hoptrace serve`) the tokio worker threads. The method and the
//! results are in BENCHMARKS.md.
//!
//! Safety: the machine has a default route to the internet, so every scamper started here runs
//! inside the lab's client namespace (checked before the first probe), and the lab is removed
//! by `Lab`'s `Drop` on every exit path (this binary never calls `process::exit`).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/common/lab.rs"]
mod lab;
#[path = "../tests/common/requests.rs"]
mod requests;

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{env_count, load_average, median};
use hoptrace_backends::engine::{
    Engine, EngineOptions, Flow, Listener, ProbeId, ProbeKey, ProbeSockets, Reader, encode,
};
use hoptrace_backends::{
    DaemonOptions, NetNs, Probe, ScamperDaemon, ScamperOptions, ScamperProcess, TraceOutput,
    TraceRequest, Tracer, scamper::command,
};
use lab::{Lab, ns_id_of_pid};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeVal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::task::JoinSet;

/// Destinations 10.77.100.1 to .200, used round-robin.
const DESTINATIONS: usize = 200;
/// Probe rate of every scamper here (`-p`): the cap of Debian's build.
const PPS: u32 = 10_000;
/// Concurrent traces of the process-per-trace backend: the service's default.
const PROCESS_CONCURRENCY: usize = 16;
/// The daemon's session windows measured (128 is the service default).
const DAEMON_WINDOWS: [usize; 2] = [128, 512];
/// Deadline of each trace (the library kills or abandons it after this).
const TRACE_DEADLINE: Duration = Duration::from_secs(60);
/// Bound on one system's share of a round: traces still running then count as failures.
const SAMPLE_LIMIT: Duration = Duration::from_secs(120);
/// Bound on a fresh daemon opening its control socket.
const DAEMON_START_LIMIT: Duration = Duration::from_secs(15);
/// Defaults and bounds of the environment variables.
const DEFAULT_TRACES: usize = 10_000;
const MAX_TRACES: usize = 100_000;
const DEFAULT_ROUNDS: usize = 3;
const MAX_ROUNDS: usize = 20;
/// Failure messages kept per sample (the count is always complete).
const MESSAGES_KEPT: usize = 5;

/// One of the systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum System {
    /// `scamper -c "<command>" -f <targets>`: one scamper reading a target list.
    List,
    /// `ScamperDaemon` with this session window.
    Daemon(usize),
    /// `ScamperProcess`, [`PROCESS_CONCURRENCY`] traces at once.
    Process,
    /// The in-process engine with this probe budget (0: unlimited), [`ENGINE_CONCURRENCY`]
    /// traces at once.
    Engine(u32),
    /// Raw sockets alone: every probe of every trace (TTL 1..=5) sent back to back from one
    /// thread per CPU, replies counted without decoding: what the kernel and the lab carry.
    Ceiling,
}

/// Probe budgets the engine runs with: scamper's (the same as every peer) and none.
const ENGINE_PPS: [u32; 2] = [PPS, 0];
/// Engine traces in flight at once: where its rate peaks in this lab (64 and 128 give the
/// same; 1024 costs a tenth of the rate and 15% more CPU per trace, see BENCHMARKS.md).
const ENGINE_CONCURRENCY: usize = 128;
/// The hops of every lab path: routers at TTL 1..=4, the destination at 5.
const PATH_LENGTH: u8 = 5;

impl System {
    fn label(self) -> String {
        match self {
            System::List => "scamper target list (`-f`)".to_owned(),
            System::Daemon(window) => format!("hoptrace daemon, window {window}"),
            System::Process => format!("hoptrace process-per-trace, {PROCESS_CONCURRENCY} at once"),
            System::Engine(0) => "hoptrace engine, no probe budget".to_owned(),
            System::Engine(pps) => format!("hoptrace engine, {pps} probes/s"),
            System::Ceiling => "kernel ceiling (raw send/receive loop)".to_owned(),
        }
    }

    /// The `BENCH_SYSTEMS` word that selects this system.
    fn word(self) -> &'static str {
        match self {
            System::List => "list",
            System::Daemon(_) => "daemon",
            System::Process => "process",
            System::Engine(_) => "engine",
            System::Ceiling => "ceiling",
        }
    }

    /// A word that selects this row alone, for a system with several rows.
    fn row_word(self) -> Option<&'static str> {
        match self {
            System::Engine(0) => Some("engine-free"),
            System::Engine(_) => Some("engine-budget"),
            _ => None,
        }
    }

    /// Whether one of `words` selects this system.
    fn chosen(self, words: &[&str]) -> bool {
        words
            .iter()
            .any(|w| *w == self.word() || Some(*w) == self.row_word())
    }

    /// Every system, in the order of round 0 (later rounds rotate it).
    fn all() -> Vec<System> {
        let mut systems = vec![System::List];
        systems.extend(DAEMON_WINDOWS.map(System::Daemon));
        systems.push(System::Process);
        systems.extend(ENGINE_PPS.map(System::Engine));
        systems.push(System::Ceiling);
        systems
    }

    /// The systems `BENCH_SYSTEMS` selects (all when unset); panics on an unknown word.
    fn selected() -> Vec<System> {
        let Ok(words) = std::env::var("BENCH_SYSTEMS") else {
            return System::all();
        };
        let words: Vec<&str> = words.split(',').map(str::trim).collect();
        for word in &words {
            assert!(
                System::all().iter().any(|s| s.chosen(&[word])),
                "BENCH_SYSTEMS: unknown system {word:?} (list, daemon, process, engine, \
                 engine-budget, engine-free, ceiling)"
            );
        }
        System::all()
            .into_iter()
            .filter(|s| s.chosen(&words))
            .collect()
    }
}

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    user: Duration,
    system: Duration,
}

impl Cpu {
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    fn add(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

/// What the traces of one sample came to.
#[derive(Debug, Default)]
struct Outcome {
    /// Traces that reached their destination (`stop_reason` COMPLETED).
    completed: usize,
    /// Probes sent by the completed traces (`probe_count` summed).
    probes: u64,
    /// Traces that failed or did not complete.
    failures: usize,
    /// The first few reasons.
    messages: Vec<String>,
}

impl Outcome {
    fn record(&mut self, result: Result<u64, String>) {
        match result {
            Ok(probes) => {
                self.completed += 1;
                self.probes += probes;
            }
            Err(message) => self.fail(message),
        }
    }

    fn fail(&mut self, message: String) {
        self.fail_many(1, message);
    }

    fn fail_many(&mut self, count: usize, message: String) {
        self.failures += count;
        if count > 0 && self.messages.len() < MESSAGES_KEPT {
            self.messages.push(message);
        }
    }
}

/// One system's run of the workload in one round.
#[derive(Debug)]
struct Sample {
    traces: usize,
    wall: Duration,
    /// CPU of the scamper process(es).
    scamper: Cpu,
    /// CPU of this process (the hoptrace backend's side); `None` for the list peer, which has
    /// no such side.
    hoptrace: Option<Cpu>,
    /// Replies the kernel dropped because a raw socket's receive buffer was full (daemon only:
    /// the other systems' sockets are gone before they can be read).
    raw_drops: Option<u64>,
    outcome: Outcome,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.traces as f64 / self.wall.as_secs_f64()
    }

    /// Microseconds of `time` per trace.
    fn per_trace(&self, time: Duration) -> f64 {
        time.as_secs_f64() * 1e6 / self.traces as f64
    }

    fn total_cpu(&self) -> Cpu {
        self.hoptrace
            .map_or(self.scamper, |own| self.scamper.add(own))
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        // Not a failure: `cargo bench` as a normal user just has nothing to measure here.
        println!("backends bench: needs root (it builds network namespaces); nothing measured.");
        return;
    }
    let (traces, rounds) = (
        env_count("BENCH_TRACES", DEFAULT_TRACES, MAX_TRACES),
        env_count("BENCH_ROUNDS", DEFAULT_ROUNDS, MAX_ROUNDS),
    );
    let load_before = load_average();
    let lab = Lab::up();
    // Declared after the lab so it is dropped first: dropping the runtime kills any scamper
    // still running before the lab's namespaces are removed.
    // One tokio worker per CPU, as `hoptrace serve` has; `BENCH_WORKERS` changes it.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = env_count("BENCH_WORKERS", cpus, 64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let samples = measure(&lab, &runtime, traces, rounds);
    println!("{}", report(&lab, (traces, rounds), &load_before, &samples));
}

/// Runs every system `rounds` times, rotating the order each round so no system always runs
/// first (cold caches) or last.
fn measure(
    lab: &Lab,
    runtime: &tokio::runtime::Runtime,
    traces: usize,
    rounds: usize,
) -> HashMap<System, Vec<Sample>> {
    let client = lab.client_ns();
    let client_id = Lab::ns_id(&client);
    // Safety: the namespace every scamper goes to is not this process's own (root) one.
    assert_ne!(
        client_id,
        ns_id_of_pid(std::process::id()),
        "the lab's client namespace is this process's own: probes would leave the machine"
    );
    let netns = Arc::new(NetNs::open(&client).expect("open the lab's client namespace"));
    assert_eq!(
        netns.id().expect("stat the opened namespace"),
        client_id,
        "the opened namespace is not the lab's client namespace"
    );
    let dsts: Vec<IpAddr> = (0..traces)
        .map(|i| lab.dst_v4(u8::try_from(i % DESTINATIONS + 1).expect("at most 200")))
        .collect();
    let systems = System::selected();
    let mut samples: HashMap<System, Vec<Sample>> = HashMap::new();
    for round in 0..rounds {
        for i in 0..systems.len() {
            let system = systems[(i + round) % systems.len()];
            let sample = match system {
                System::List => list_sample(&client, &dsts),
                System::Daemon(window) => {
                    runtime.block_on(daemon_sample(&netns, client_id, window, &dsts))
                }
                System::Process => runtime.block_on(process_sample(&netns, &dsts)),
                System::Engine(pps) => runtime.block_on(engine_sample(&netns, pps, &dsts)),
                System::Ceiling => ceiling_sample(&netns, &dsts),
            };
            eprintln!("round {}: {}", round + 1, describe(system, &sample));
            samples.entry(system).or_default().push(sample);
        }
    }
    samples
}

/// A one-line account of a sample, for stderr as the bench runs.
fn describe(system: System, sample: &Sample) -> String {
    let cpu = sample.total_cpu();
    let mut line = format!(
        "{}: {} traces in {:.3} s ({:.0}/s), CPU {:.1} µs user + {:.1} µs system per trace, \
         {} failed",
        system.label(),
        sample.traces,
        sample.wall.as_secs_f64(),
        sample.rate(),
        sample.per_trace(cpu.user),
        sample.per_trace(cpu.system),
        sample.outcome.failures
    );
    for message in &sample.outcome.messages {
        let _ = write!(line, "\n    {message}");
    }
    line
}

/// The request every system runs, per destination: the issue's Paris UDP trace.
fn paris_request(dst: IpAddr) -> TraceRequest {
    requests::paris_request(dst, TRACE_DEADLINE)
}

/// The backends' scamper command without its destination, for the list peer's `-c`: the
/// same text, so all systems do the same work.
fn list_command(example: IpAddr) -> String {
    let full = command(&paris_request(example));
    full.strip_suffix(&format!(" {example}"))
        .expect("scamper's command ends with the destination")
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// The three systems.

/// scamper reading the destinations from a file: `ip netns exec <client> scamper -O json
/// -o <file> -p 10000 -c "<command>" -f <targets>`, list-mode window (`-w`) left at its
/// default (0: no limit). The output goes to a file rather than /dev/null so its traces can be
/// checked like the backends'.
fn list_sample(client_ns: &str, dsts: &[IpAddr]) -> Sample {
    let dir = tempfile::tempdir().expect("temporary directory");
    let targets = dir.path().join("targets.txt");
    let output = dir.path().join("traces.json");
    let lines: String = dsts.iter().map(|dst| format!("{dst}\n")).collect();
    std::fs::write(&targets, lines).expect("write the target list");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", client_ns, "scamper", "-O", "json", "-o"])
        .arg(&output)
        .args(["-p", &PPS.to_string(), "-c", &list_command(dsts[0]), "-f"])
        .arg(&targets)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let before = rusage(UsageWho::RUSAGE_CHILDREN);
    let started = Instant::now();
    let status = run_bounded(&mut cmd, SAMPLE_LIMIT);
    let wall = started.elapsed();
    // `ip netns exec` execs scamper in place, so this is scamper's CPU (plus ip's set-up). The
    // privileged helper scamper forks is not reaped by it and is not counted: `perf stat` put
    // it within noise of zero.
    let scamper = rusage(UsageWho::RUSAGE_CHILDREN).since(before);
    let mut outcome = check_list_output(&output, dsts);
    if let Err(why) = status {
        outcome.fail(why);
    }
    Sample {
        traces: dsts.len(),
        wall,
        scamper,
        hoptrace: None,
        raw_drops: None,
        outcome,
    }
}

/// Runs `cmd` to its end, killing it after `limit`. Polls every millisecond: the wall time is
/// off by at most that, and this thread stays out of the CPU being measured (the child's).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(), String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start scamper: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("scamper exited with {status}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("scamper killed after {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(format!("cannot wait for scamper: {e}")),
        }
    }
}

/// Checks the list peer's output: one completed trace per target, each destination as often
/// as it was listed (the order of results is scamper's, not the list's).
fn check_list_output(path: &Path, dsts: &[IpAddr]) -> Outcome {
    let mut outcome = Outcome::default();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            outcome.fail(format!("cannot read scamper's output: {e}"));
            return outcome;
        }
    };
    let mut expected: HashMap<IpAddr, usize> = HashMap::new();
    for dst in dsts {
        *expected.entry(*dst).or_default() += 1;
    }
    for line in text.lines().filter(|l| l.contains(r#""type":"trace""#)) {
        let result =
            check_trace_line(line, None).and_then(|(dst, probes)| match expected.get_mut(&dst) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    Ok(probes)
                }
                _ => Err(format!("unexpected trace to {dst}")),
            });
        outcome.record(result);
    }
    let missing: usize = expected.values().sum();
    outcome.fail_many(missing, format!("{missing} listed traces have no result"));
    outcome
}

/// One `ScamperDaemon` at [`PPS`] with `window`, started fresh, all traces submitted at once.
/// Its start-up is not measured: the service starts it once. CPU is read from `/proc` for the
/// daemon's process group (scamper and its privileged helper) and from getrusage for this
/// process.
async fn daemon_sample(
    netns: &Arc<NetNs>,
    client_id: (u64, u64),
    window: usize,
    dsts: &[IpAddr],
) -> Sample {
    let options = DaemonOptions {
        binary: "scamper".into(),
        pps: PPS,
        window,
        ..DaemonOptions::default()
    };
    let daemon = Arc::new(ScamperDaemon::start(options, Some(Arc::clone(netns))).expect("daemon"));
    tokio::time::timeout(DAEMON_START_LIMIT, daemon.ready())
        .await
        .expect("the daemon answers in time")
        .expect("the daemon answers");
    let pid = daemon.pid().expect("a ready daemon has a pid");
    // Safety: the daemon has sent nothing yet (no command); it must be inside the lab.
    assert_eq!(
        ns_id_of_pid(pid),
        client_id,
        "the scamper daemon is not in the lab's client namespace"
    );
    let members = process_group(pid);
    let drops_before = raw_drops(pid);
    let (scamper_before, own_before) = (group_cpu(&members), rusage(UsageWho::RUSAGE_SELF));
    let tracer: Arc<dyn Tracer> = Arc::clone(&daemon) as Arc<dyn Tracer>;
    let returned = run_traces(tracer, dsts, None).await;
    let own = rusage(UsageWho::RUSAGE_SELF).since(own_before);
    let scamper = group_cpu(&members).since(scamper_before);
    let wall = returned.wall;
    let mut outcome = returned.check();
    let drops = raw_drops(pid)
        .zip(drops_before)
        .map(|(after, before)| after.saturating_sub(before));
    // A restart would put part of the CPU in a process we did not read.
    if daemon.restarts() > 0 {
        outcome.fail(format!("the daemon restarted {} times", daemon.restarts()));
    }
    daemon.shutdown().await;
    Sample {
        traces: dsts.len(),
        wall,
        scamper,
        hoptrace: Some(own),
        raw_drops: drops,
        outcome,
    }
}

/// Replies dropped by full raw socket receive buffers in the network namespace of `pid`: the
/// `drops` column of `/proc/PID/net/raw`, summed (in the lab's client namespace the only raw
/// sockets are scamper's).
fn raw_drops(pid: u32) -> Option<u64> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/raw")).ok()?;
    let drops = table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok());
    Some(drops.sum())
}

/// `ScamperProcess` at [`PPS`] per process, [`PROCESS_CONCURRENCY`] at once. The library reaps
/// every child before a trace returns, so RUSAGE_CHILDREN covers them all.
async fn process_sample(netns: &Arc<NetNs>, dsts: &[IpAddr]) -> Sample {
    let options = ScamperOptions {
        binary: "scamper".into(),
        pps: Some(PPS),
    };
    let tracer: Arc<dyn Tracer> = Arc::new(ScamperProcess::new(options, Some(Arc::clone(netns))));
    let children_before = rusage(UsageWho::RUSAGE_CHILDREN);
    let own_before = rusage(UsageWho::RUSAGE_SELF);
    let returned = run_traces(tracer, dsts, Some(PROCESS_CONCURRENCY)).await;
    let own = rusage(UsageWho::RUSAGE_SELF).since(own_before);
    let scamper = rusage(UsageWho::RUSAGE_CHILDREN).since(children_before);
    let wall = returned.wall;
    let outcome = returned.check();
    Sample {
        traces: dsts.len(),
        wall,
        scamper,
        hoptrace: Some(own),
        raw_drops: None,
        outcome,
    }
}

/// The engine, opened fresh in the lab's client namespace (the opening thread's namespace is
/// checked against it before any socket exists), [`ENGINE_CONCURRENCY`] traces at once
/// (`BENCH_ENGINE_CONCURRENCY` overrides it). Its
/// CPU is this process's (the engine runs in it); drops are the kernel's count on the engine's
/// receive sockets.
async fn engine_sample(netns: &Arc<NetNs>, pps: u32, dsts: &[IpAddr]) -> Sample {
    let options = EngineOptions {
        pps,
        ..EngineOptions::default()
    };
    let engine = Arc::new(Engine::open(Some(netns), options).expect("open the engine in the lab"));
    let own_before = rusage(UsageWho::RUSAGE_SELF);
    let tracer: Arc<dyn Tracer> = Arc::clone(&engine) as Arc<dyn Tracer>;
    let concurrency = env_count("BENCH_ENGINE_CONCURRENCY", ENGINE_CONCURRENCY, 65_536);
    let returned = run_traces(tracer, dsts, Some(concurrency)).await;
    let own = rusage(UsageWho::RUSAGE_SELF).since(own_before);
    let stats = engine.stats();
    engine.shutdown().await;
    let wall = returned.wall;
    let outcome = returned.check();
    Sample {
        traces: dsts.len(),
        wall,
        scamper: Cpu::default(),
        hoptrace: Some(own),
        raw_drops: Some(stats.kernel_drops),
        outcome,
    }
}

/// The kernel's ceiling: the engine's sockets (opened in the lab, checked), every probe of
/// every trace (TTL 1..=[`PATH_LENGTH`] per destination, encoded as the engine encodes them)
/// sent back to back from one thread per CPU while one receive thread counts what comes back
/// with the engine's batched reader, without decoding. Stops when every probe was answered or after
/// [`SAMPLE_LIMIT`]. A "trace" completes here when its share of replies arrived (replies / 5).
fn ceiling_sample(netns: &Arc<NetNs>, dsts: &[IpAddr]) -> Sample {
    let sockets = Arc::new(ProbeSockets::open_in(netns).expect("open raw sockets in the lab"));
    let key = ProbeKey::random();
    let expected = dsts.len() * usize::from(PATH_LENGTH);
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (sockets, stop) = (Arc::clone(&sockets), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut reader = Reader::new(Listener::IcmpV4);
            let mut count = 0usize;
            let mut last = Instant::now();
            let deadline = Instant::now() + SAMPLE_LIMIT;
            while count < expected && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let n = reader.read(&sockets, |_| {}).expect("receive");
                if n > 0 {
                    count += n;
                    last = Instant::now();
                }
            }
            (count, last, reader.kernel_drops())
        })
    };
    let src = sockets.source_for(dsts[0]).expect("route to the lab");
    let own_before = rusage(UsageWho::RUSAGE_SELF);
    let started = Instant::now();
    // One sending thread per CPU, each with its share of the destinations.
    let senders = std::thread::available_parallelism().map_or(1, usize::from);
    let lost: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..senders)
            .map(|part| {
                let (sockets, key) = (&sockets, &key);
                scope.spawn(move || {
                    let mut packet = Vec::with_capacity(64);
                    let mut lost = 0u64;
                    for (i, &dst) in dsts.iter().enumerate().skip(part).step_by(senders) {
                        let flow = Flow {
                            src,
                            dst,
                            probe: Probe::Udp,
                            sport: 33_000 + u16::try_from(i % 20_000).expect("fits"),
                            dport: 33435,
                            salt: 0,
                        };
                        for ttl in 1..=PATH_LENGTH {
                            packet.clear();
                            let id = ProbeId { ttl, attempt: 0 };
                            let encoded = encode(&flow, id, key, &mut packet).expect("encode");
                            match sockets.send(&flow, &packet, encoded.hop_limit) {
                                Ok(true) => {}
                                Ok(false) => lost += 1,
                                Err(e) => panic!("send: {e}"),
                            }
                        }
                    }
                    lost
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .sum()
    });
    let (count, last, drops) = counter.join().expect("receive thread");
    stop.store(true, Ordering::Relaxed);
    let own = rusage(UsageWho::RUSAGE_SELF).since(own_before);
    let mut outcome = Outcome {
        completed: count / usize::from(PATH_LENGTH),
        probes: (count / usize::from(PATH_LENGTH) * usize::from(PATH_LENGTH)) as u64,
        ..Outcome::default()
    };
    let missing = dsts.len() - outcome.completed;
    outcome.fail_many(
        missing,
        format!(
            "{} of {expected} replies missing ({lost} probes not queued)",
            expected - count
        ),
    );
    Sample {
        traces: dsts.len(),
        wall: last - started,
        scamper: Cpu::default(),
        hoptrace: Some(own),
        raw_drops: Some(u64::from(drops)),
        outcome,
    }
}

/// What the traces of one run returned. They are checked only after the CPU is read, so the
/// checking (a JSON parse per trace) is not billed to the backend.
#[derive(Debug, Default)]
struct Returned {
    /// From the first call to the last result.
    wall: Duration,
    /// Per trace: its destination and output, or why it failed.
    results: Vec<Result<(IpAddr, TraceOutput), String>>,
    /// Traces not done within [`SAMPLE_LIMIT`].
    unfinished: usize,
}

impl Returned {
    fn check(self) -> Outcome {
        let mut outcome = Outcome::default();
        for result in self.results {
            outcome.record(result.and_then(|(dst, output)| check_output(&output.lines, dst)));
        }
        let left = self.unfinished;
        outcome.fail_many(
            left,
            format!("{left} traces not done after {SAMPLE_LIMIT:?}"),
        );
        outcome
    }
}

/// Traces every destination through `tracer`, at most `concurrency` at once (`None`: all at
/// once, left to the backend), within [`SAMPLE_LIMIT`]. With a bound, that many worker tasks
/// each take the next destination until none is left, so the driver adds no task, semaphore
/// or wake-up of its own per trace to the CPU it measures.
async fn run_traces(
    tracer: Arc<dyn Tracer>,
    dsts: &[IpAddr],
    concurrency: Option<usize>,
) -> Returned {
    let started = tokio::time::Instant::now();
    let dsts: Arc<[IpAddr]> = dsts.into();
    let next = Arc::new(AtomicUsize::new(0));
    let workers = concurrency.unwrap_or(dsts.len()).min(dsts.len());
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (tracer, dsts, next) = (Arc::clone(&tracer), Arc::clone(&dsts), Arc::clone(&next));
        set.spawn(async move {
            let mut done = Vec::with_capacity(dsts.len() / workers + 1);
            while let Some(&dst) = dsts.get(next.fetch_add(1, Ordering::Relaxed)) {
                let result = match tracer.trace(&paris_request(dst)).await {
                    Ok(output) => Ok((dst, output)),
                    Err(e) => Err(format!("{dst}: {e}")),
                };
                done.push((tokio::time::Instant::now(), result));
            }
            done
        });
    }
    let mut returned = Returned::default();
    let mut last = started;
    let deadline = started + SAMPLE_LIMIT;
    while !set.is_empty() {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(done))) => {
                for (at, result) in done {
                    last = last.max(at);
                    returned.results.push(result);
                }
            }
            Ok(Some(Err(e))) => returned.results.push(Err(format!("trace task: {e}"))),
            Ok(None) => break,
            Err(_) => {
                // Dropping the set aborts the rest (the library kills their processes); a
                // worker's finished traces are lost with it, and counted as unfinished.
                returned.unfinished = dsts.len().saturating_sub(returned.results.len());
                break;
            }
        }
    }
    returned.wall = last - started;
    returned
}

/// Checks a backend's three lines: the trace line reached `dst`. Returns its probe count.
fn check_output(lines: &str, dst: IpAddr) -> Result<u64, String> {
    let line = lines
        .lines()
        .find(|l| l.contains(r#""type":"trace""#))
        .ok_or_else(|| format!("{dst}: no trace line"))?;
    let (got, probes) = check_trace_line(line, Some(dst))?;
    if got == dst {
        Ok(probes)
    } else {
        Err(format!("{dst}: result for {got}"))
    }
}

/// Reads one scamper `trace` JSON line: its destination and `probe_count`, or why it did not
/// complete (reach the destination).
fn check_trace_line(line: &str, dst: Option<IpAddr>) -> Result<(IpAddr, u64), String> {
    let name = dst.map_or_else(|| "trace".to_owned(), |dst| dst.to_string());
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("{name}: bad JSON: {e}"))?;
    let got: IpAddr = value["dst"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{name}: no dst"))?;
    let stop = value["stop_reason"].as_str().unwrap_or("none");
    if stop != "COMPLETED" {
        return Err(format!("{got}: stop_reason {stop}"));
    }
    let probes = value["probe_count"]
        .as_u64()
        .ok_or_else(|| format!("{got}: no probe_count"))?;
    Ok((got, probes))
}

// ---------------------------------------------------------------------------------------------
// CPU time.

fn rusage(who: UsageWho) -> Cpu {
    let usage = getrusage(who).expect("getrusage cannot fail for SELF or CHILDREN");
    Cpu {
        user: timeval(usage.user_time()),
        system: timeval(usage.system_time()),
    }
}

fn timeval(tv: TimeVal) -> Duration {
    let micros = tv.tv_sec() * 1_000_000 + tv.tv_usec();
    Duration::from_micros(u64::try_from(micros).expect("CPU time is not negative"))
}

/// The live processes in process group `pgid` (the daemon runs as one: scamper and the
/// privileged helper it forks), read once so the measurement reads only their `stat`.
fn process_group(pgid: u32) -> Vec<u32> {
    let entries = std::fs::read_dir("/proc").expect("read /proc");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|stat| stat.pgrp == pgid))
        .collect()
}

/// utime + stime of `pids` from `/proc/PID/stat` (clock ticks; a process that is gone counts
/// nothing, which the daemon never is while measured).
fn group_cpu(pids: &[u32]) -> Cpu {
    let tick = clock_tick();
    pids.iter()
        .filter_map(|&pid| proc_stat(pid))
        .fold(Cpu::default(), |sum, stat| {
            sum.add(Cpu {
                user: tick * stat.utime,
                system: tick * stat.stime,
            })
        })
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug)]
struct ProcStat {
    pgrp: u32,
    utime: u32,
    stime: u32,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime stime ...": comm may hold spaces and parentheses, so split after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(ProcStat {
        pgrp: fields.get(2)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// One clock tick of `/proc/PID/stat` (1/CLK_TCK s; 10 ms here).
fn clock_tick() -> Duration {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .expect("sysconf(CLK_TCK)")
        .expect("CLK_TCK is defined");
    Duration::from_secs(1) / u32::try_from(ticks).expect("CLK_TCK fits u32")
}

// ---------------------------------------------------------------------------------------------
// The report.

/// Median, minimum and maximum of `metric` over the samples.
fn spread(samples: &[Sample], metric: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let values: Vec<f64> = samples.iter().map(metric).collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(values), min, max)
}

/// Medians of one system's samples.
#[derive(Debug)]
struct Summary {
    rate: (f64, f64, f64),
    probes_per_trace: f64,
    scamper_user: f64,
    scamper_system: f64,
    own_user: Option<f64>,
    own_system: Option<f64>,
    total: (f64, f64, f64),
    total_user: f64,
    raw_drops: Option<u64>,
    failures: usize,
}

fn summarize(samples: &[Sample]) -> Summary {
    // This process's CPU: the same for every sample of a system (the list peer has none).
    let own = |field: fn(Cpu) -> Duration| -> Option<f64> {
        let values: Option<Vec<f64>> = samples
            .iter()
            .map(|s| s.hoptrace.map(|cpu| s.per_trace(field(cpu))))
            .collect();
        values.map(median)
    };
    Summary {
        rate: spread(samples, Sample::rate),
        probes_per_trace: median(
            samples
                .iter()
                .map(|s| s.outcome.probes as f64 / s.outcome.completed.max(1) as f64),
        ),
        scamper_user: median(samples.iter().map(|s| s.per_trace(s.scamper.user))),
        scamper_system: median(samples.iter().map(|s| s.per_trace(s.scamper.system))),
        own_user: own(|c| c.user),
        own_system: own(|c| c.system),
        total: spread(samples, |s| {
            let cpu = s.total_cpu();
            s.per_trace(cpu.user + cpu.system)
        }),
        total_user: median(samples.iter().map(|s| s.per_trace(s.total_cpu().user))),
        raw_drops: samples.iter().map(|s| s.raw_drops).sum(),
        failures: samples.iter().map(|s| s.outcome.failures).sum(),
    }
}

/// The markdown report: machine, results table, ratios against the goals.
fn report(
    lab: &Lab,
    (traces, rounds): (usize, usize),
    load_before: &str,
    samples: &HashMap<System, Vec<Sample>>,
) -> String {
    let summaries: HashMap<System, Summary> = samples
        .iter()
        .map(|(system, samples)| (*system, summarize(samples)))
        .collect();
    let mut out = String::new();
    // Anything else running skews both rate and CPU: the load average shows it.
    let _ = writeln!(
        out,
        "{}; load average before {load_before}, after {}\n",
        machine(lab),
        load_average()
    );
    let _ = writeln!(
        out,
        "{traces} Paris UDP traces per system and round (`{}`), {rounds} rounds, medians \
         (min–max); CPU in µs per trace; raw drops and failures summed over the rounds.\n",
        command(&paris_request(lab.dst_v4(1)))
    );
    out.push_str(&table(&summaries));
    out.push('\n');
    out.push_str(&ratios(&summaries));
    out
}

/// CPU count, kernel and scamper version.
fn machine(lab: &Lab) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // `scamper -v` sends nothing, but like every scamper here it runs inside the lab. It
    // prints to stderr and exits 255.
    let version = Command::new("ip")
        .args(["netns", "exec", &lab.client_ns(), "scamper", "-v"])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_else(|e| format!("scamper version unknown ({e})"));
    format!("Machine: {cpus} CPUs, kernel {}, {version}", kernel.trim())
}

fn table(summaries: &HashMap<System, Summary>) -> String {
    let mut out = String::from(
        "| System | Traces/s | Probes/trace | Probes/s | scamper user | scamper sys | \
         hoptrace user | hoptrace sys | CPU total | Raw drops | Failures |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let optional = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"));
    for system in System::all() {
        let Some(s) = summaries.get(&system) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} ({:.0}–{:.0}) | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} ({:.0}–{:.0}) | {} | {} |",
            system.label(),
            s.rate.0,
            s.rate.1,
            s.rate.2,
            s.probes_per_trace,
            s.rate.0 * s.probes_per_trace,
            s.scamper_user,
            s.scamper_system,
            optional(s.own_user),
            optional(s.own_system),
            s.total.0,
            s.total.1,
            s.total.2,
            s.raw_drops
                .map_or_else(|| "–".to_owned(), |d| d.to_string()),
            s.failures
        );
    }
    out
}

fn ratios(summaries: &HashMap<System, Summary>) -> String {
    let mut out = String::new();
    if let Some(list) = summaries.get(&System::List) {
        out.push_str(&engine_ratios(list, summaries));
    }
    let (Some(list), Some(process)) = (
        summaries.get(&System::List),
        summaries.get(&System::Process),
    ) else {
        return out;
    };
    let _ = writeln!(
        out,
        "- list peer: {:.0} µs CPU per trace ({:.0} user + {:.0} system)",
        list.total.0, list.scamper_user, list.scamper_system
    );
    for window in DAEMON_WINDOWS {
        let Some(daemon) = summaries.get(&System::Daemon(window)) else {
            continue;
        };
        let rate = daemon.rate.0 / list.rate.0;
        let _ = writeln!(
            out,
            "- daemon (window {window}) rate / list rate: {rate:.3} (goal ≥ 0.95: {})\n\
             - daemon (window {window}) CPU per trace / process-per-trace: {:.3} total, {:.3} \
             user\n\
             - daemon (window {window}) CPU per trace / list: {:.2} total, {:.2} user",
            if rate >= 0.95 { "met" } else { "NOT met" },
            daemon.total.0 / process.total.0,
            daemon.total_user / process.total_user,
            daemon.total.0 / list.total.0,
            daemon.total_user / list.total_user,
        );
    }
    out
}

/// The engine against the list peer (issue 3's goals) and against the kernel's ceiling.
fn engine_ratios(list: &Summary, summaries: &HashMap<System, Summary>) -> String {
    let mut out = String::new();
    let per_probe = |s: &Summary| s.total_user / s.probes_per_trace;
    let ceiling = summaries.get(&System::Ceiling);
    for pps in ENGINE_PPS {
        let Some(engine) = summaries.get(&System::Engine(pps)) else {
            continue;
        };
        let label = System::Engine(pps).label();
        let rate = engine.rate.0 / list.rate.0;
        let cpu = per_probe(engine) / per_probe(list);
        let _ = writeln!(
            out,
            "- {label}: rate / list rate {rate:.2} (goal ≥ 7: {}); probes/s {:.0} vs {:.0}; \
             user CPU per probe {:.2} µs vs {:.2} µs = {cpu:.3} (goal ≤ 0.25: {}); raw drops {}",
            if rate >= 7.0 { "met" } else { "NOT met" },
            engine.rate.0 * engine.probes_per_trace,
            list.rate.0 * list.probes_per_trace,
            per_probe(engine),
            per_probe(list),
            if cpu <= 0.25 { "met" } else { "NOT met" },
            engine.raw_drops.unwrap_or(0),
        );
        if let Some(ceiling) = ceiling {
            let _ = writeln!(
                out,
                "- {label}: probes/s / kernel ceiling probes/s {:.3}",
                engine.rate.0 * engine.probes_per_trace
                    / (ceiling.rate.0 * ceiling.probes_per_trace)
            );
        }
    }
    out
}
