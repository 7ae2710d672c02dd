//! On-demand trace latency end to end through the gRPC API, the engine beside scamper in one
//! lab and one run. Issue 3, item 6: "one on-demand trace of a 7-hop path end to end through the
//! gRPC API — goal ≤ 1 ms". Every trace goes to one of the lab's far destinations, 7 hops away
//! (6 routers, the ECMP diamond among them, and the destination).
//!
//! `cargo bench --bench ondemand` (needs root: it builds network namespaces). Each system is
//! the real server, started in-process from a `serve` command line with `--netns <lab client>`
//! and one backend; a tonic client on 127.0.0.1 times sequential `Trace` RPCs (cached copies
//! not accepted), each to the next of 10.77.200.1..=200, from the request sent to the record
//! received. Rows:
//! - `--backend engine` through gRPC; alternating with each of its traces, one through
//!   `Pipeline::trace_now` (the same path without gRPC) and one bare store write of a trace
//!   file (temp file, fsync, rename, directory fsync) in the server's output directory, so the
//!   time splits into probing, pipeline and file, and tonic;
//! - the engine's `Tracer::trace` alone (`Engine::open` in the lab, the server's options), at most
//!   one trace per millisecond like the RPCs, so the probe budget never holds one back;
//! - `--backend scamper-daemon` and `--backend scamper` (a process per trace) through gRPC,
//!   both at `--scamper-pps 10000`, Debian scamper's cap.
//!
//! Rounds interleave the systems, their order reversed every other round; each system starts
//! afresh in each round and is warmed up before it is timed. Every result is checked to be a
//! whole lab trace (one hop per TTL 1..=7, the lab's routers, the destination last): anything
//! else panics, as a failure is not a sample. `BENCH_ENGINE_TRACES` (default 200),
//! `BENCH_SCAMPER_TRACES` (50) and `BENCH_ROUNDS` (3) change the counts. Method and results are
//! in BENCHMARKS.md.
//!
//! Safety: the machine has a default route to the internet. The engine opens its sockets in the
//! lab's client namespace (checked against this process's own before the first probe), and
//! every scamper runs there through a guard script that refuses to start it anywhere else
//! (checked to refuse here first). Every trace has a time limit, every loop a count. The lab
//! is removed by `Lab`'s `Drop` on every exit path (this binary never calls `process::exit`).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/common/lab.rs"]
mod lab;
// The harness's in-process server; this bench uses `start` and `TestServer` only.
#[allow(dead_code)]
#[path = "../tests/common/server.rs"]
mod server;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use common::{env_count, load_average};
use hoptrace::{
    cli::{Cli, Command as CliCommand},
    conn_id::ConnectionIds,
};
use hoptrace_backends::engine::{Engine, EngineOptions};
use hoptrace_backends::{NetNs, TraceRequest, Tracer};
use lab::{Lab, ns_id_of_pid};

/// Far destinations 10.77.200.1..=200 are timed; warm-up traces go to the ones above.
const DESTINATIONS: usize = 200;
/// Whole traces each system runs, untimed, before it is timed.
const WARM_UP: usize = 5;
/// Bound on the warm-up attempts (a freshly built lab may drop a first packet).
const WARM_UP_TRIES: usize = 20;
/// Limit on one trace, RPC or not: past it the bench panics.
const TRACE_LIMIT: Duration = Duration::from_secs(30);
/// Issue 3's goal for one on-demand trace.
const GOAL: Duration = Duration::from_millis(1);
/// The hops of the goal's path: the lab's path to its far destinations.
const PATH_HOPS: usize = 7;
/// At most one trace per this in the `Tracer::trace` row, about the RPC row's cadence: back to
/// back (a trace takes about 0.1 ms) the traces would spend the probe budget's burst and then
/// time the budget (10,000 probes/s), not the probing.
const DIRECT_SPACING: Duration = Duration::from_millis(1);
/// Times the scamper guard is run (and refuses) to measure what it adds to each process.
const GUARD_RUNS: usize = 20;

/// One timed series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Row {
    EngineGrpc,
    EnginePipeline,
    EngineDirect,
    StoreWrite,
    ScamperDaemon,
    ScamperProcess,
}

impl Row {
    fn label(self) -> &'static str {
        match self {
            Row::EngineGrpc => "engine, Trace RPC (gRPC → pipeline → engine → file)",
            Row::EnginePipeline => "engine, `Pipeline::trace_now` (no gRPC)",
            Row::EngineDirect => "engine, `Tracer::trace` alone (no pipeline, no file)",
            Row::StoreWrite => "store write alone (temp file, fsync, rename, dir fsync)",
            Row::ScamperDaemon => "scamper-daemon, Trace RPC",
            Row::ScamperProcess => "scamper process per trace, Trace RPC",
        }
    }
}

/// What runs in one turn of a round.
#[derive(Debug, Clone, Copy)]
enum Turn {
    /// The server with `--backend engine`: rows EngineGrpc, EnginePipeline, StoreWrite.
    EngineServer,
    EngineDirect,
    ScamperDaemon,
    ScamperProcess,
}

/// Per row, the samples of each round.
type Samples = BTreeMap<Row, Vec<Vec<Duration>>>;

/// What the turns share.
struct Bench {
    lab: Lab,
    netns: NetNs,
    guard: PathBuf,
    engine_traces: usize,
    scamper_traces: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !nix::unistd::geteuid().is_root() {
        // Not a failure: `cargo bench` as a normal user just has nothing to measure here.
        println!("ondemand bench: needs root (it builds network namespaces); nothing measured.");
        return;
    }
    let engine_traces = env_count("BENCH_ENGINE_TRACES", 200, 5000);
    let scamper_traces = env_count("BENCH_SCAMPER_TRACES", 50, 1000);
    let rounds = env_count("BENCH_ROUNDS", 3, 20);
    let load_before = load_average();
    let tools = tempfile::tempdir().expect("temporary directory for the scamper guard");
    let lab = Lab::up();
    let client = lab.client_ns();
    // Safety: the namespace every probe leaves from is not this process's own (root) one.
    assert_ne!(
        Lab::ns_id(&client),
        ns_id_of_pid(std::process::id()),
        "the lab's client namespace is this process's own: probes would leave the machine"
    );
    let netns = NetNs::open(&client).expect("open the lab's client namespace");
    assert_eq!(
        netns.id().expect("stat the opened namespace"),
        Lab::ns_id(&client),
        "the opened namespace is not the lab's client namespace"
    );
    let (guard, guard_cost) = guarded_scamper(tools.path(), &client);
    let bench = Bench {
        lab,
        netns,
        guard,
        engine_traces,
        scamper_traces,
    };
    let mut samples = Samples::new();
    for round in 0..rounds {
        let mut turns = vec![
            Turn::EngineServer,
            Turn::EngineDirect,
            Turn::ScamperDaemon,
            Turn::ScamperProcess,
        ];
        if round % 2 == 1 {
            turns.reverse();
        }
        for turn in turns {
            for (row, times) in bench.turn(turn).await {
                eprintln!(
                    "round {}: {}: {} traces, median {}",
                    round + 1,
                    row.label(),
                    times.len(),
                    ms(percentile(&times, 0.5))
                );
                samples.entry(row).or_default().push(times);
            }
        }
    }
    println!(
        "{}; load average before {load_before}, after {}; commit {}\n\n{rounds} rounds; per \
         round {engine_traces} engine traces (each row) and {scamper_traces} per scamper \
         backend, one at a time, over the lab's {PATH_HOPS}-hop path. scamper's guard script \
         (sh, run once per scamper process) takes {} to refuse outside the lab: about what it \
         adds to each process-per-trace trace.\n\n{}",
        machine(),
        load_average(),
        commit(),
        ms(guard_cost),
        report(&samples)
    );
}

impl Bench {
    async fn turn(&self, turn: Turn) -> Vec<(Row, Vec<Duration>)> {
        match turn {
            Turn::EngineServer => self.engine_server().await,
            Turn::EngineDirect => vec![(Row::EngineDirect, self.engine_direct().await)],
            Turn::ScamperDaemon => {
                let times = self.scamper("scamper-daemon", self.scamper_traces).await;
                vec![(Row::ScamperDaemon, times)]
            }
            Turn::ScamperProcess => {
                let times = self.scamper("scamper", self.scamper_traces).await;
                vec![(Row::ScamperProcess, times)]
            }
        }
    }

    /// The real server, its probes leaving from the lab's client namespace.
    async fn server(&self, backend: &str) -> server::TestServer {
        let client = self.lab.client_ns();
        let guard = self.guard.to_str().expect("utf-8 path");
        server::start(&[
            "--netns",
            &client,
            "--allow-private",
            "--backend",
            backend,
            "--scamper-bin",
            guard,
            "--scamper-pps",
            "10000",
        ])
        .await
    }

    /// `count` Trace RPCs through a fresh server with `backend`, after the warm-up.
    async fn scamper(&self, backend: &str, count: usize) -> Vec<Duration> {
        let mut s = self.server(backend).await;
        self.warm_up(&mut s).await;
        let mut times = Vec::with_capacity(count);
        for i in 0..count {
            times.push(self.rpc(&mut s, self.dst(i)).await.expect("trace RPC"));
        }
        s.stop().await;
        times
    }

    /// The engine's server: each step times one Trace RPC, one `trace_now` and one store
    /// write of the last file's measurement, in that order.
    async fn engine_server(&self) -> Vec<(Row, Vec<Duration>)> {
        let mut s = self.server("engine").await;
        self.warm_up(&mut s).await;
        let pipeline = Arc::clone(&s.running.pipeline);
        let ids = ConnectionIds::default();
        let (mut grpc, mut direct, mut write) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..self.engine_traces {
            grpc.push(self.rpc(&mut s, self.dst(2 * i)).await.expect("trace RPC"));
            let dst = self.dst(2 * i + 1);
            let started = Instant::now();
            let record =
                tokio::time::timeout(TRACE_LIMIT, pipeline.trace_now(&dst.to_string(), "", false))
                    .await
                    .unwrap_or_else(|_| panic!("trace_now {dst}: no result in {TRACE_LIMIT:?}"))
                    .unwrap_or_else(|e| panic!("trace_now {dst}: {e}"));
            direct.push(started.elapsed());
            let hops: Vec<_> = record
                .summary
                .hops
                .iter()
                .map(|h| (h.ttl, h.addr))
                .collect();
            self.check(dst, &hops).unwrap_or_else(|e| panic!("{e}"));
            let id = ids
                .validate(&format!("storebench_{i:016X}"))
                .expect("a valid connection id");
            let measurement = record.file.contents.split_once('\n').expect("4 lines").1;
            let started = Instant::now();
            pipeline
                .store()
                .write(&id, measurement, record.summary.start_time, None)
                .expect("store write");
            write.push(started.elapsed());
        }
        s.stop().await;
        vec![
            (Row::EngineGrpc, grpc),
            (Row::EnginePipeline, direct),
            (Row::StoreWrite, write),
        ]
    }

    /// The engine alone, opened in the lab with the options and request the server uses.
    async fn engine_direct(&self) -> Vec<Duration> {
        let Ok(CliCommand::Serve(args)) =
            Cli::try_parse_from(["hoptrace", "serve"]).map(|c| c.command)
        else {
            panic!("`serve` with its defaults parses")
        };
        let options = EngineOptions {
            pps: args.engine_pps,
            ..EngineOptions::default()
        };
        let engine = Engine::open(Some(&self.netns), options).expect("open the engine in the lab");
        let request = |dst| TraceRequest {
            dst,
            method: args.method,
            limits: args.limits(),
            source_port: args.source_port,
        };
        let trace = |dst: IpAddr| {
            let (engine, request) = (&engine, request(dst));
            async move {
                let started = Instant::now();
                let output = tokio::time::timeout(TRACE_LIMIT, engine.trace(&request))
                    .await
                    .map_err(|_| format!("engine trace {dst}: no result in {TRACE_LIMIT:?}"))?
                    .map_err(|e| format!("engine trace {dst}: {e}"))?;
                let took = started.elapsed();
                let hops: Vec<_> = output
                    .summary
                    .hops
                    .iter()
                    .map(|h| (h.ttl, h.addr))
                    .collect();
                self.check(dst, &hops).map(|()| took)
            }
        };
        let warm = (0..WARM_UP).map(|i| self.lab.far_v4((DESTINATIONS + 1 + i) as u8));
        for dst in warm {
            trace(dst).await.unwrap_or_else(|e| panic!("warm-up: {e}"));
        }
        let mut times = Vec::with_capacity(self.engine_traces);
        for i in 0..self.engine_traces {
            let next = tokio::time::Instant::now() + DIRECT_SPACING;
            times.push(trace(self.dst(i)).await.unwrap_or_else(|e| panic!("{e}")));
            tokio::time::sleep_until(next).await;
        }
        engine.shutdown().await;
        times
    }

    /// [`WARM_UP`] whole traces through the server (untimed), within [`WARM_UP_TRIES`].
    async fn warm_up(&self, s: &mut server::TestServer) {
        let (mut whole, mut last) = (0, String::new());
        for i in 0..WARM_UP_TRIES {
            let dst = self.lab.far_v4((DESTINATIONS + 1 + i) as u8);
            match self.rpc(s, dst).await {
                Ok(_) => whole += 1,
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if whole == WARM_UP {
                return;
            }
        }
        panic!("warm-up: {whole} of {WARM_UP} whole traces in {WARM_UP_TRIES} tries; last: {last}");
    }

    /// One Trace RPC to `dst`, not accepting a cached copy: its wall time at the client once
    /// the record is checked.
    async fn rpc(&self, s: &mut server::TestServer, dst: IpAddr) -> Result<Duration, String> {
        let started = Instant::now();
        let record = tokio::time::timeout(TRACE_LIMIT, s.trace(&dst.to_string(), false))
            .await
            .map_err(|_| format!("Trace {dst}: no answer in {TRACE_LIMIT:?}"))?
            .map_err(|e| format!("Trace {dst}: {e}"))?;
        let took = started.elapsed();
        let hops = record
            .hops
            .iter()
            .map(|h| {
                let addr = h
                    .address
                    .parse()
                    .map_err(|_| format!("hop {:?}", h.address))?;
                Ok((
                    u8::try_from(h.ttl).map_err(|_| format!("ttl {}", h.ttl))?,
                    addr,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        self.check(dst, &hops).map(|()| took)
    }

    /// Whether `hops` (ttl, address) are a whole trace of the lab's path to `dst`: one hop per
    /// TTL 1..=7, the lab's router at 1..=6, `dst` at 7.
    fn check(&self, dst: IpAddr, hops: &[(u8, IpAddr)]) -> Result<(), String> {
        let routers = self.lab.far_hops_v4();
        let whole = hops.len() == PATH_HOPS
            && hops.iter().enumerate().all(|(i, &(ttl, addr))| {
                usize::from(ttl) == i + 1
                    && routers.get(i).map_or(addr == dst, |r| r.contains(&addr))
            });
        if whole {
            Ok(())
        } else {
            Err(format!("not a whole lab trace to {dst}: {hops:?}"))
        }
    }

    /// The `i`-th timed destination.
    fn dst(&self, i: usize) -> IpAddr {
        self.lab.far_v4((i % DESTINATIONS + 1) as u8)
    }
}

/// A scamper wrapper that refuses (exit 99) to run outside the lab's client namespace, checked
/// to refuse here, in this process's own namespace, before it is used; with the median time it
/// took to refuse (a shell's start and one test: what it adds to each scamper process).
fn guarded_scamper(dir: &Path, client_ns: &str) -> (PathBuf, Duration) {
    let script = format!(
        "#!/bin/sh\n# Written by benches/ondemand.rs.\n\
         [ /proc/self/ns/net -ef /run/netns/{client_ns} ] || {{\n  \
         echo \"scamper guard: not in {client_ns}: refusing to probe\" >&2\n  exit 99\n}}\n\
         exec scamper \"$@\"\n"
    );
    let path = dir.join("scamper");
    std::fs::write(&path, script).expect("write the scamper guard");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the scamper guard executable");
    let mut times: Vec<Duration> = (0..GUARD_RUNS)
        .map(|_| {
            let started = Instant::now();
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
            started.elapsed()
        })
        .collect();
    times.sort();
    (path, percentile(&times, 0.5))
}

// ---------------------------------------------------------------------------------------------
// The report.

/// The value at fraction `p` of `times` (nearest rank), which need not be sorted.
fn percentile(times: &[Duration], p: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// The table (pooled percentiles, and the range of the rounds' medians), then the ratios.
fn report(samples: &Samples) -> String {
    let mut out = String::from(
        "| Row | Traces | Median | Round medians | p90 | p99 | Max |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut medians = BTreeMap::new();
    for (&row, rounds) in samples {
        let all: Vec<Duration> = rounds.iter().flatten().copied().collect();
        let mut round_medians: Vec<Duration> = rounds.iter().map(|r| percentile(r, 0.5)).collect();
        round_medians.sort();
        let median = percentile(&all, 0.5);
        medians.insert(row, median);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}–{} | {} | {} | {} |",
            row.label(),
            all.len(),
            ms(median),
            ms(round_medians[0]),
            ms(round_medians[round_medians.len() - 1]),
            ms(percentile(&all, 0.9)),
            ms(percentile(&all, 0.99)),
            ms(percentile(&all, 1.0)),
        );
    }
    let secs = |row| medians.get(&row).map(Duration::as_secs_f64);
    let Some(engine) = secs(Row::EngineGrpc) else {
        return out;
    };
    let _ = writeln!(
        out,
        "\n- engine Trace RPC median ÷ the 1 ms goal: {:.2} ({})",
        engine / GOAL.as_secs_f64(),
        if engine <= GOAL.as_secs_f64() {
            "met"
        } else {
            "NOT met"
        }
    );
    for peer in [Row::ScamperDaemon, Row::ScamperProcess] {
        if let Some(peer_median) = secs(peer) {
            let _ = writeln!(
                out,
                "- {} median ÷ engine's: {:.1}×",
                peer.label(),
                peer_median / engine
            );
        }
    }
    if let (Some(pipeline), Some(direct), Some(write)) = (
        secs(Row::EnginePipeline),
        secs(Row::EngineDirect),
        secs(Row::StoreWrite),
    ) {
        let _ = writeln!(
            out,
            "- where the engine's median goes: probing (`Tracer::trace`) {:.3} ms, pipeline and \
             file {:.3} ms (of it the store write alone {:.3} ms), gRPC (tonic, loopback, \
             protobuf) {:.3} ms",
            direct * 1e3,
            (pipeline - direct) * 1e3,
            write * 1e3,
            (engine - pipeline) * 1e3,
        );
    }
    out
}

/// CPU count, kernel, the scamper package's version (from dpkg: nothing is run in the lab).
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let scamper = output("dpkg-query", &["-W", "-f", "${Version}", "scamper"]);
    format!(
        "Machine: {cpus} CPUs, kernel {}, scamper {scamper}",
        kernel.trim()
    )
}

/// The commit measured (`-dirty` when the tree has changes).
fn commit() -> String {
    output(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
            "--abbrev=12",
        ],
    )
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}
