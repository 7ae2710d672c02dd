//! Multipath (MDA) traces side by side in one lab, in one run: the in-process engine against
//! Debian scamper's `tracelb`, each driven through the library the service uses (`Engine`,
//! `ScamperProcess`). Issue 3's goals: probes per trace ≤ 1.0× scamper's, time per trace ≥ 19×
//! shorter.
//!
//! `cargo bench --bench multipath` (needs root: it builds network namespaces).
//! `BENCH_MDA_TRACES` (default 8) sets scamper's traces per variant, family and round (the
//! engine runs [`ENGINE_PER_SCAMPER`]× as many, one at a time), `BENCH_ROUNDS` (default 3) the
//! rounds, `BENCH_FAMILIES` (`v4`, `v6` or `v4,v6`, the default) the address families. The
//! method and the results are in BENCHMARKS.md.
//!
//! Safety: the machine has a default route to the internet, so the engine's sockets are opened
//! in the lab's client namespace (checked before the first probe) and every scamper runs there
//! through a guard script that refuses to start it anywhere else. The lab is removed by `Lab`'s
//! `Drop` on every exit path (this binary never calls `process::exit`).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/common/lab.rs"]
mod lab;

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::{env_count, load_average, median};
use hoptrace_backends::engine::{Engine, EngineOptions};
use hoptrace_backends::{
    Limits, Method, NetNs, Probe, ScamperOptions, ScamperProcess, TraceOutput, TraceRequest,
    Tracer, scamper::command,
};
use lab::{Lab, ns_id_of_pid};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeValLike;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

/// Engine traces run one at a time per scamper trace: scamper's traces take seconds each, the
/// engine's milliseconds, so it gets more samples for the same wall time.
const ENGINE_PER_SCAMPER: usize = 8;
/// The engine's throughput batch: this many traces, [`ENGINE_IN_FLIGHT`] at once.
const ENGINE_BATCH: usize = 256;
const ENGINE_IN_FLIGHT: usize = 32;
/// scamper's `-p`: the cap of Debian's build (tracelb's own gap between probes binds first).
const PPS: u32 = 10_000;
/// tracelb's `-W` for [`System::ScamperFastest`], in hundredths of a second: the smallest
/// Debian's build accepts. Without `-W` (the service's command) it waits 25 (250 ms).
const FASTEST_WAIT_PROBE: u8 = 15;
/// Deadline of each trace (the library kills or abandons it after this).
const TRACE_DEADLINE: Duration = Duration::from_secs(60);
/// Bound on one batch: traces still running then count as failures.
const BATCH_LIMIT: Duration = Duration::from_secs(90);
/// Defaults and bounds of the environment variables.
const DEFAULT_SCAMPER_TRACES: usize = 8;
const MAX_SCAMPER_TRACES: usize = 50;
const DEFAULT_ROUNDS: usize = 3;
const MAX_ROUNDS: usize = 20;
/// Bound on the traces that wait for a fresh lab to carry scamper's probes.
const WARM_UP_TRIES: usize = 20;
/// Failure messages kept per batch (the count is always complete).
const MESSAGES_KEPT: usize = 3;

/// One of the systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum System {
    /// `ScamperProcess`: one scamper per trace with the service's command, all of a batch at
    /// once, each to its own destination.
    Scamper,
    /// The same with tracelb's `-W` at its minimum ([`FASTEST_WAIT_PROBE`]).
    ScamperFastest,
    /// The engine, one trace at a time.
    Engine,
    /// The engine, [`ENGINE_IN_FLIGHT`] traces at once.
    EngineConcurrent,
}

impl System {
    const ALL: [System; 4] = [
        System::Scamper,
        System::ScamperFastest,
        System::Engine,
        System::EngineConcurrent,
    ];

    fn label(self) -> String {
        match self {
            System::Scamper => "scamper tracelb (service command, `-W` 25)".to_owned(),
            System::ScamperFastest => format!("scamper tracelb `-W {FASTEST_WAIT_PROBE}`"),
            System::Engine => "hoptrace engine, one at a time".to_owned(),
            System::EngineConcurrent => format!("hoptrace engine, {ENGINE_IN_FLIGHT} at once"),
        }
    }

    /// tracelb's `wait_probe` (ms) in scamper's output, checked so a wrong guard script shows.
    fn wait_probe(self) -> Option<u64> {
        match self {
            System::Scamper => Some(250),
            System::ScamperFastest => Some(u64::from(FASTEST_WAIT_PROBE) * 10),
            System::Engine | System::EngineConcurrent => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The families `BENCH_FAMILIES` selects (both when unset); panics on an unknown word.
    fn selected() -> Vec<Family> {
        let Ok(words) = std::env::var("BENCH_FAMILIES") else {
            return vec![Family::V4, Family::V6];
        };
        let mut families: Vec<Family> = words
            .split(',')
            .map(|word| match word.trim() {
                "v4" => Family::V4,
                "v6" => Family::V6,
                other => panic!("BENCH_FAMILIES: unknown family {other:?} (v4, v6)"),
            })
            .collect();
        families.sort();
        families.dedup();
        families
    }

    fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4 UDP",
            Family::V6 => "IPv6 UDP",
        }
    }

    /// Lab destination `n` (1..=200) of this family.
    fn dst(self, lab: &Lab, n: usize) -> IpAddr {
        let n = u8::try_from(n).expect("lab destinations go to 200");
        match self {
            Family::V4 => lab.dst_v4(n),
            Family::V6 => lab.dst_v6(u16::from(n)),
        }
    }

    /// The six links of the lab's diamond to `dst`: r1→r2, r2→r3a, r2→r3b, r3a→r4, r3b→r4,
    /// r4→dst.
    fn diamond(self, lab: &Lab, dst: IpAddr) -> BTreeSet<(Option<IpAddr>, Option<IpAddr>)> {
        let hops = match self {
            Family::V4 => lab.hops_v4(),
            Family::V6 => lab.hops_v6(),
        };
        let (r1, r2, r4) = (hops[0][0], hops[1][0], hops[3][0]);
        let mut links = BTreeSet::from([(Some(r1), Some(r2)), (Some(r4), Some(dst))]);
        for &r3 in &hops[2] {
            links.insert((Some(r2), Some(r3)));
            links.insert((Some(r3), Some(r4)));
        }
        links
    }
}

/// The request every system runs: the service's defaults (`tracelb -P udp-sport -q 2 -w 2
/// -Q 3000`, 95% confidence, backend-chosen source ports) with a 60 s deadline.
fn mda_request(dst: IpAddr) -> TraceRequest {
    TraceRequest {
        dst,
        method: Method::Mda(Probe::Udp),
        limits: Limits {
            deadline: TRACE_DEADLINE,
            ..Limits::default()
        },
        source_port: None,
    }
}

/// One trace that returned, checked.
#[derive(Debug)]
struct Traced {
    /// `probec` of its tracelb line.
    probes: u64,
    /// From its start (its permit, for the engine) to its result.
    time: Duration,
    /// Found exactly the diamond's six links.
    whole: bool,
    /// Reported a link the lab does not have.
    false_link: bool,
}

/// One system's batch of traces in one round.
#[derive(Debug, Default)]
struct Batch {
    traced: Vec<Traced>,
    failures: usize,
    messages: Vec<String>,
    /// From the first start to the last result.
    wall: Duration,
    /// User and system CPU of the batch: scamper's children for scamper, this whole process
    /// for the engine.
    user: Duration,
    system: Duration,
    /// The engine's receive drops (none for scamper).
    drops: Option<u64>,
}

impl Batch {
    fn count(&self) -> usize {
        self.traced.len() + self.failures
    }

    fn fail(&mut self, count: usize, message: String) {
        self.failures += count;
        if count > 0 && self.messages.len() < MESSAGES_KEPT {
            self.messages.push(message);
        }
    }

    /// µs of `time` per trace.
    fn per_trace(&self, time: Duration) -> f64 {
        time.as_secs_f64() * 1e6 / self.count().max(1) as f64
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        // Not a failure: `cargo bench` as a normal user just has nothing to measure here.
        println!("multipath bench: needs root (it builds network namespaces); nothing measured.");
        return;
    }
    let scamper_traces = env_count(
        "BENCH_MDA_TRACES",
        DEFAULT_SCAMPER_TRACES,
        MAX_SCAMPER_TRACES,
    );
    let rounds = env_count("BENCH_ROUNDS", DEFAULT_ROUNDS, MAX_ROUNDS);
    let families = Family::selected();
    let load_before = load_average();
    let tools = tempfile::tempdir().expect("temporary directory for the scamper guards");
    let lab = Lab::up();
    // Declared after the lab so it is dropped first: dropping the runtime kills any scamper
    // still running before the lab's namespaces are removed.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let batches = measure(
        &lab,
        &runtime,
        tools.path(),
        &families,
        (scamper_traces, rounds),
    );
    let header = format!(
        "{}; load average before {load_before}, after {}\n\n{scamper_traces} scamper traces per \
         variant, family and round (all at once, one destination each), {} engine traces one \
         at a time and {ENGINE_BATCH} {ENGINE_IN_FLIGHT} at once; {rounds} rounds. Command: \
         `{}`.\n",
        machine(&lab),
        load_average(),
        scamper_traces * ENGINE_PER_SCAMPER,
        command(&mda_request(lab.dst_v4(1))),
    );
    println!("{header}\n{}", report(&batches));
}

/// Every family and system, `rounds` times: in even rounds the scamper batches go first, in
/// odd rounds the engine does, so neither always runs on a cold or a warm machine.
fn measure(
    lab: &Lab,
    runtime: &tokio::runtime::Runtime,
    tools: &Path,
    families: &[Family],
    (scamper_traces, rounds): (usize, usize),
) -> HashMap<(Family, System), Vec<Batch>> {
    let client = lab.client_ns();
    let client_id = Lab::ns_id(&client);
    // Safety: the namespace every probe leaves from is not this process's own (root) one.
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
    let scampers: HashMap<System, Arc<dyn Tracer>> = [System::Scamper, System::ScamperFastest]
        .into_iter()
        .map(|system| {
            let options = ScamperOptions {
                binary: guarded_scamper(tools, &client, system).into(),
                pps: Some(PPS),
            };
            let tracer: Arc<dyn Tracer> =
                Arc::new(ScamperProcess::new(options, Some(Arc::clone(&netns))));
            (system, tracer)
        })
        .collect();
    for &family in families {
        let scamper = &scampers[&System::ScamperFastest];
        runtime.block_on(await_scamper(scamper, family.dst(lab, 200)));
    }
    let mut batches: HashMap<(Family, System), Vec<Batch>> = HashMap::new();
    for round in 0..rounds {
        for &family in families {
            let mut turns = vec![System::Scamper, System::ScamperFastest, System::Engine];
            if round % 2 == 1 {
                turns.reverse();
            }
            for turn in turns {
                let done = match turn {
                    System::Engine => {
                        // The engine's destinations cycle over both scamper variants' ones.
                        let dsts = (0..scamper_traces * ENGINE_PER_SCAMPER)
                            .map(|i| family.dst(lab, i % (2 * scamper_traces) + 1))
                            .collect();
                        runtime.block_on(engine_turn(lab, &netns, family, dsts))
                    }
                    scamper => {
                        let first = if scamper == System::Scamper {
                            1
                        } else {
                            scamper_traces + 1
                        };
                        let dsts = (first..first + scamper_traces)
                            .map(|n| family.dst(lab, n))
                            .collect();
                        let tracer = Arc::clone(&scampers[&scamper]);
                        let batch = runtime.block_on(timed_batch(
                            lab,
                            (family, scamper),
                            tracer,
                            dsts,
                            scamper_traces,
                        ));
                        vec![(scamper, batch)]
                    }
                };
                for (system, batch) in done {
                    eprintln!(
                        "round {}, {}: {}",
                        round + 1,
                        family.label(),
                        describe(system, &batch)
                    );
                    batches.entry((family, system)).or_default().push(batch);
                }
            }
        }
    }
    batches
}

/// Waits until scamper's tracelb sends probes to `dst`: whole traces (untimed, at most
/// [`WARM_UP_TRIES`]; tracelb rejects a `-Q` small enough for a quick one). In a freshly built
/// lab, IPv6 tracelb sends no probe at all for about a second (it returns `probec` 0 after half
/// a second); the engine is unaffected.
async fn await_scamper(scamper: &Arc<dyn Tracer>, dst: IpAddr) {
    let request = mda_request(dst);
    for _ in 0..WARM_UP_TRIES {
        if let Ok(output) = scamper.trace(&request).await
            && check(&output, dst, System::ScamperFastest).is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("scamper's tracelb to {dst} sent no probe after {WARM_UP_TRIES} tries");
}

/// A scamper wrapper for `ScamperProcess` that refuses (exit 99) to run outside the lab's
/// client namespace, so the check stands in the probing path itself as in the lab tests'
/// `lab-guard`; for [`System::ScamperFastest`] it also adds `-W` to the tracelb command.
/// Checked to refuse here, in this process's own namespace, before it is used.
fn guarded_scamper(dir: &Path, client_ns: &str, system: System) -> PathBuf {
    let rewrite = if system == System::ScamperFastest {
        format!(
            "for arg; do\n  shift\n  case $arg in \"tracelb \"*) \
             arg=\"tracelb -W {FASTEST_WAIT_PROBE} ${{arg#tracelb }}\" ;; esac\n  \
             set -- \"$@\" \"$arg\"\ndone\n"
        )
    } else {
        String::new()
    };
    let script = format!(
        "#!/bin/sh\n# Written by benches/multipath.rs.\n\
         [ /proc/self/ns/net -ef /run/netns/{client_ns} ] || {{\n  \
         echo \"scamper guard: not in {client_ns}: refusing to probe\" >&2\n  exit 99\n}}\n\
         {rewrite}exec scamper \"$@\"\n"
    );
    let path = dir.join(format!("scamper-{system:?}").to_lowercase());
    std::fs::write(&path, script).expect("write the scamper guard");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the scamper guard executable");
    let status = Command::new(&path)
        .arg("-v")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the scamper guard");
    assert_eq!(
        status.code(),
        Some(99),
        "the scamper guard did not refuse outside the lab"
    );
    path
}

/// The engine's turn: opened fresh in the lab's client namespace (the opening thread is checked
/// against it before any socket exists), `dsts` one at a time, then [`ENGINE_BATCH`] traces
/// [`ENGINE_IN_FLIGHT`] at once.
async fn engine_turn(
    lab: &Lab,
    netns: &NetNs,
    family: Family,
    dsts: Vec<IpAddr>,
) -> Vec<(System, Batch)> {
    let options = EngineOptions {
        pps: 0,
        ..EngineOptions::default()
    };
    let engine = Arc::new(Engine::open(Some(netns), options).expect("open the engine in the lab"));
    let tracer: Arc<dyn Tracer> = Arc::clone(&engine) as Arc<dyn Tracer>;
    let one = timed_batch(lab, (family, System::Engine), Arc::clone(&tracer), dsts, 1).await;
    let many = (0..ENGINE_BATCH)
        .map(|i| family.dst(lab, i % 200 + 1))
        .collect();
    let key = (family, System::EngineConcurrent);
    let mut concurrent = timed_batch(lab, key, tracer, many, ENGINE_IN_FLIGHT).await;
    let stats = engine.stats();
    engine.shutdown().await;
    concurrent.drops = Some(stats.kernel_drops);
    if stats.kernel_drops > 0 {
        concurrent.fail(0, format!("engine stats: {stats:?}"));
    }
    vec![
        (System::Engine, one),
        (System::EngineConcurrent, concurrent),
    ]
}

/// Runs an MDA trace of every destination through `tracer`, `in_flight` at once, within
/// [`BATCH_LIMIT`], and reads the CPU it took: this process's for the engine, its reaped
/// children's for scamper (the library reaps every scamper before its trace returns). Results
/// are checked only after the CPU is read.
async fn timed_batch(
    lab: &Lab,
    (family, system): (Family, System),
    tracer: Arc<dyn Tracer>,
    dsts: Vec<IpAddr>,
    in_flight: usize,
) -> Batch {
    let who = match system {
        System::Engine | System::EngineConcurrent => UsageWho::RUSAGE_SELF,
        System::Scamper | System::ScamperFastest => UsageWho::RUSAGE_CHILDREN,
    };
    let cpu_before = cpu(who);
    let permits = Arc::new(Semaphore::new(in_flight));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for dst in dsts {
        let (tracer, permits) = (Arc::clone(&tracer), Arc::clone(&permits));
        set.spawn(async move {
            let _permit = permits
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let start = Instant::now();
            let result = tracer.trace(&mda_request(dst)).await;
            (dst, result.map_err(|e| e.to_string()), start.elapsed())
        });
    }
    let (mut returned, mut last) = (Vec::new(), started);
    let collect = async {
        while let Some(joined) = set.join_next().await {
            last = Instant::now();
            returned.push(joined.expect("trace task"));
        }
    };
    // Traces left at the limit are aborted when the set drops (the library kills scamper).
    let all_done = tokio::time::timeout_at(started + BATCH_LIMIT, collect).await;
    let unfinished = if all_done.is_ok() { 0 } else { set.len() };
    let (user, sys) = cpu(who);
    let mut batch = Batch {
        wall: last - started,
        user: user.saturating_sub(cpu_before.0),
        system: sys.saturating_sub(cpu_before.1),
        ..Batch::default()
    };
    batch.fail(
        unfinished,
        format!("{unfinished} traces not done after {BATCH_LIMIT:?}"),
    );
    for (dst, result, time) in returned {
        let diamond = family.diamond(lab, dst);
        match result.and_then(|output| check(&output, dst, system)) {
            Ok((probes, found)) => batch.traced.push(Traced {
                probes,
                time,
                whole: found == diamond,
                false_link: !found.is_subset(&diamond),
            }),
            Err(message) => batch.fail(1, format!("{dst}: {message}")),
        }
    }
    batch
}

type Links = BTreeSet<(Option<IpAddr>, Option<IpAddr>)>;

/// A trace's `probec` and links, after checking it is a tracelb of `dst` (and, for scamper,
/// that it ran with the variant's `-W`).
fn check(output: &TraceOutput, dst: IpAddr, system: System) -> Result<(u64, Links), String> {
    if output.summary.dst != dst {
        return Err(format!("result for {}", output.summary.dst));
    }
    let line = output.lines.lines().nth(1).ok_or("no tracelb line")?;
    let tracelb: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"))?;
    if tracelb["type"] != "tracelb" {
        return Err(format!("line 2 is a {}", tracelb["type"]));
    }
    if let Some(want) = system.wait_probe()
        && tracelb["wait_probe"].as_u64() != Some(want)
    {
        return Err(format!(
            "wait_probe {} (expected {want})",
            tracelb["wait_probe"]
        ));
    }
    let probes = tracelb["probec"].as_u64().ok_or("no probec")?;
    if probes == 0 {
        return Err("sent no probe".to_owned());
    }
    let links = output
        .summary
        .links
        .iter()
        .map(|l| (l.from, l.to))
        .collect();
    Ok((probes, links))
}

/// (user, system) CPU time of `who`.
fn cpu(who: UsageWho) -> (Duration, Duration) {
    let usage = getrusage(who).expect("getrusage cannot fail for SELF or CHILDREN");
    let micros = |tv: nix::sys::time::TimeVal| {
        Duration::from_micros(u64::try_from(tv.num_microseconds()).unwrap_or(0))
    };
    (micros(usage.user_time()), micros(usage.system_time()))
}

/// A one-line account of a batch, for stderr as the bench runs.
fn describe(system: System, batch: &Batch) -> String {
    let times = batch.traced.iter().map(|t| t.time.as_secs_f64() * 1e3);
    let probes = batch.traced.iter().map(|t| t.probes as f64);
    let whole = batch.traced.iter().filter(|t| t.whole).count();
    let mut line = format!(
        "{}: {} traces in {:.2} s, median {:.0} probes and {:.1} ms per trace, whole diamond \
         {whole}, {} failed",
        system.label(),
        batch.count(),
        batch.wall.as_secs_f64(),
        median(probes),
        median(times),
        batch.failures,
    );
    for message in &batch.messages {
        let _ = write!(line, "\n    {message}");
    }
    line
}

// ---------------------------------------------------------------------------------------------
// The report.

/// The median of `metric` over every trace of every round, and the lowest and highest of the
/// rounds' own medians.
fn pooled(batches: &[Batch], metric: impl Fn(&Traced) -> f64) -> (f64, f64, f64) {
    let all = median(batches.iter().flat_map(|b| b.traced.iter().map(&metric)));
    let mut rounds: Vec<f64> = batches
        .iter()
        .map(|b| median(b.traced.iter().map(&metric)))
        .filter(|m| !m.is_nan())
        .collect();
    rounds.sort_by(f64::total_cmp);
    match (rounds.first(), rounds.last()) {
        (Some(&low), Some(&high)) => (all, low, high),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}

/// Medians of one system's batches in one family.
#[derive(Debug)]
struct Summary {
    traces: usize,
    probes: (f64, f64, f64),
    /// Milliseconds.
    time: (f64, f64, f64),
    whole: usize,
    false_links: usize,
    /// µs per trace, median over the rounds.
    user: f64,
    system: f64,
    /// Traces per second of the batch, median over the rounds.
    rate: f64,
    drops: Option<u64>,
    failures: usize,
}

fn summarize(batches: &[Batch]) -> Summary {
    let count = |f: fn(&Traced) -> bool| -> usize {
        batches
            .iter()
            .map(|b| b.traced.iter().filter(|t| f(t)).count())
            .sum()
    };
    Summary {
        traces: batches.iter().map(Batch::count).sum(),
        probes: pooled(batches, |t| t.probes as f64),
        time: pooled(batches, |t| t.time.as_secs_f64() * 1e3),
        whole: count(|t| t.whole),
        false_links: count(|t| t.false_link),
        user: median(batches.iter().map(|b| b.per_trace(b.user))),
        system: median(batches.iter().map(|b| b.per_trace(b.system))),
        rate: median(
            batches
                .iter()
                .map(|b| b.count() as f64 / b.wall.as_secs_f64()),
        ),
        drops: batches.iter().map(|b| b.drops).sum(),
        failures: batches.iter().map(|b| b.failures).sum(),
    }
}

/// Per family: the table of medians, then the ratios against the goals.
fn report(batches: &HashMap<(Family, System), Vec<Batch>>) -> String {
    let mut families: Vec<Family> = batches.keys().map(|(family, _)| *family).collect();
    families.sort();
    families.dedup();
    let mut out = String::new();
    for family in families {
        let summaries: HashMap<System, Summary> = System::ALL
            .into_iter()
            .filter_map(|s| Some((s, summarize(batches.get(&(family, s))?))))
            .collect();
        let _ = writeln!(
            out,
            "### {}\n\n| System | Traces | Probes/trace | Time/trace (ms) | Whole diamond | \
             False links | User CPU µs/trace | Sys CPU µs/trace | Traces/s | Drops | Failures |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            family.label()
        );
        for system in System::ALL {
            let Some(s) = summaries.get(&system) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.1} ({:.1}–{:.1}) | {}/{} ({:.1}%) | {} | \
                 {:.0} | {:.0} | {:.2} | {} | {} |",
                system.label(),
                s.traces,
                s.probes.0,
                s.probes.1,
                s.probes.2,
                s.time.0,
                s.time.1,
                s.time.2,
                s.whole,
                s.traces,
                100.0 * s.whole as f64 / s.traces.max(1) as f64,
                s.false_links,
                s.user,
                s.system,
                s.rate,
                s.drops.map_or_else(|| "–".to_owned(), |d| d.to_string()),
                s.failures,
            );
        }
        // `-W` changes only when tracelb probes, not what: both variants' traces are one
        // sample of its probe counts.
        let scamper_probes = median(
            [System::Scamper, System::ScamperFastest]
                .iter()
                .filter_map(|s| batches.get(&(family, *s)))
                .flatten()
                .flat_map(|b| b.traced.iter().map(|t| t.probes as f64)),
        );
        out.push('\n');
        out.push_str(&ratios(&summaries, scamper_probes));
        out.push('\n');
    }
    out
}

/// The engine (one at a time) against each scamper variant, and its probes against every
/// scamper trace (median `scamper_probes`): issue 3's two goals.
fn ratios(summaries: &HashMap<System, Summary>, scamper_probes: f64) -> String {
    let mut out = String::new();
    let Some(engine) = summaries.get(&System::Engine) else {
        return out;
    };
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let probes = engine.probes.0 / scamper_probes;
    let _ = writeln!(
        out,
        "- engine probes/trace ÷ scamper's, both variants' traces pooled: {:.0} ÷ {:.0} = \
         {probes:.2} (goal ≤ 1.0: {})",
        engine.probes.0,
        scamper_probes,
        verdict(probes <= 1.0),
    );
    for peer in [System::Scamper, System::ScamperFastest] {
        let Some(scamper) = summaries.get(&peer) else {
            continue;
        };
        let probes = engine.probes.0 / scamper.probes.0;
        let time = scamper.time.0 / engine.time.0;
        let _ = writeln!(
            out,
            "- vs {}: engine probes/trace ÷ scamper's {probes:.2} (goal ≤ 1.0: {}); scamper \
             time/trace ÷ engine's {time:.0}× (goal ≥ 19: {}); user CPU per trace ÷ scamper's \
             {:.2}",
            peer.label(),
            verdict(probes <= 1.0),
            verdict(time >= 19.0),
            engine.user / scamper.user,
        );
    }
    out
}

/// CPU count, kernel and scamper version (`scamper -v` sends nothing, but runs in the lab
/// anyway; it prints to stderr).
fn machine(lab: &Lab) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = Command::new("ip")
        .args(["netns", "exec", &lab.client_ns(), "scamper", "-v"])
        .stdin(Stdio::null())
        .output()
        .map_or_else(
            |e| format!("scamper version unknown ({e})"),
            |o| String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        );
    format!("Machine: {cpus} CPUs, kernel {}, {version}", kernel.trim())
}
