//! Intake benchmarks (issue 5): how soon a closed connection reaches the scheduler, and how
//! many close events per second the gRPC streaming intake takes.
//!
//! `cargo bench --bench intake` (root for the latency part: it builds a namespace lab).
//! Results go to BENCHMARKS.md by hand; the method is there too.
//!
//! 1. Close → scheduled latency. The real host watcher and the real pipeline; the backend is
//!    a stand-in that stamps the moment a trace is handed to it (the thing measured) and
//!    returns a recorded scamper trace. A connection from the lab's client namespace to a
//!    peer is held 25 ms and closed; the time from `close()` to the stamp is the latency.
//!    The peer is tcp-info's method, run in the same process on the same connections: a
//!    sock_diag dump every 10 ms (`Mode::Poll`). Rounds interleave the two.
//! 2. Intake rate. The real server on 127.0.0.1 with a scamper stand-in that prints a
//!    recorded trace (no probe is sent anywhere); 4 concurrent `ReportCloses` streams. First
//!    events the policy refuses (pure intake: validation, policy, counters), then repeats of
//!    traced destinations (the cache absorbs them, and each writes its own durable file).

#[path = "../tests/common/lab.rs"]
mod lab;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, TcpListener, TcpStream},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use clap::Parser;
use hoptrace::{
    cache::CacheConfig,
    cli::{Cli, Command},
    conn_id::ConnectionIds,
    event::InvalidEvent,
    hub::{Hub, HubConfig},
    metrics::Metrics,
    pipeline::{Pipeline, PipelineConfig, failure_reasons},
    policy::{Policy, Refusal},
    proto::{self, hoptrace_client::HoptraceClient},
    server,
    sources::host_sockets::{DiagSocket, HostSockets, HostSocketsConfig, Mode},
    store::TraceStore,
};
use hoptrace_backends::{
    Limits, Method, NetNs, Probe, TraceError, TraceOutput, TraceRequest, Tracer,
};
use tokio::sync::{mpsc, watch};

const RECORDED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/backends/tests/fixtures/scamper-20211212/trace-icmp-paris.json"
));

/// A backend that reports when a trace reaches it, and returns a recorded trace.
#[derive(Debug)]
struct Stamp(mpsc::UnboundedSender<(IpAddr, Instant)>);

#[async_trait]
impl Tracer for Stamp {
    fn name(&self) -> &'static str {
        "stamp"
    }

    async fn trace(&self, request: &TraceRequest) -> Result<TraceOutput, TraceError> {
        let _ = self.0.send((request.dst, Instant::now()));
        Ok(TraceOutput::from_lines(RECORDED.as_bytes().to_vec())?)
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// A pipeline with the stamping backend; returns it with the stamps and a stop switch.
fn stamp_pipeline(
    dir: &std::path::Path,
) -> (
    Arc<Pipeline>,
    mpsc::UnboundedReceiver<(IpAddr, Instant)>,
    watch::Sender<bool>,
) {
    let sources: Vec<_> = hoptrace::event::Source::ALL
        .iter()
        .map(|s| s.label())
        .collect();
    let refusals: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
    let failures: Vec<_> = failure_reasons().collect();
    let (metrics, _registry) = Metrics::new(&sources, &refusals, &failures, &InvalidEvent::LABELS);
    let metrics = Arc::new(metrics);
    let (stamps_tx, stamps) = mpsc::unbounded_channel();
    let (pipeline, queue) = Pipeline::new(
        Arc::new(Stamp(stamps_tx)),
        Arc::new(Policy::new(true, vec![], vec![])),
        ConnectionIds::default(),
        Arc::new(TraceStore::open(dir, "bench").expect("store")),
        Arc::new(Hub::new(
            1,
            HubConfig {
                queue: 1024,
                retention: 1024,
                max_subscribers: 64,
            },
            metrics.hub.clone(),
        )),
        Arc::clone(&metrics),
        PipelineConfig {
            method: Method::Paris(Probe::Udp),
            limits: Limits::default(),
            source_port: None,
            // Expire at once: every round traces the same destinations again.
            cache: CacheConfig {
                ttl: Duration::from_millis(1),
                failure_ttl: Duration::from_millis(1),
                capacity: NonZeroUsize::new(1024).expect("non-zero"),
                max_waiters: 16,
                max_waiters_total: 16 * 1024,
            },
            queue_capacity: 1024,
            concurrency: 16,
            cached_writes: 16,
            on_demand_prefix: "bench".into(),
            lookup_days: 1,
        },
    );
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(Arc::clone(&pipeline).run_workers(queue, stopped, Duration::from_secs(1)));
    (pipeline, stamps, stop)
}

/// One connection from `client` to `peer:8080` in `dst_ns`, held 25 ms; returns the instant
/// the client closed it.
fn connection(client: &NetNs, dst_ns: &NetNs, peer: IpAddr) -> Instant {
    let listener = dst_ns
        .run_inside(|| TcpListener::bind((peer, 8080)))
        .expect("enter dst namespace")
        .expect("listen");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).expect("read");
    });
    let mut conn = client
        .run_inside(|| TcpStream::connect_timeout(&(peer, 8080).into(), Duration::from_secs(5)))
        .expect("enter client namespace")
        .expect("connect");
    conn.write_all(b"x").expect("write");
    server.join().expect("peer");
    std::thread::sleep(Duration::from_millis(25));
    let closed = Instant::now();
    drop(conn);
    closed
}

async fn latency(per_round: usize, rounds: usize) {
    let lab = lab::Lab::up();
    let client = NetNs::open(&lab.client_ns()).expect("client namespace");
    let dst_ns = NetNs::open(&lab.ns("dst")).expect("dst namespace");
    assert_ne!(
        lab::Lab::ns_id(&lab.client_ns()),
        lab::ns_id_of_pid(std::process::id()),
        "the watched namespace must be the lab's"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut results: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut missed: BTreeMap<&str, usize> = BTreeMap::new();
    for round in 0..rounds {
        let modes = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for poll in modes {
            let name = if poll {
                "poll 10 ms (tcp-info's method)"
            } else {
                "destroy groups (hoptrace)"
            };
            let (pipeline, mut stamps, stop) = stamp_pipeline(dir.path());
            let socket = client
                .run_inside(|| DiagSocket::open(Duration::from_millis(10), poll))
                .expect("enter client namespace")
                .expect("netlink");
            assert_eq!(socket.mode() == Mode::Destroy, !poll);
            let watcher = HostSockets::new(
                HostSocketsConfig {
                    exclude_local_ports: vec![],
                    exclude_remote: vec![],
                    queue: 1024,
                },
                Default::default(),
                "bench_1".into(),
            );
            let task = tokio::spawn(watcher.run(socket, Arc::clone(&pipeline), stop.subscribe()));
            tokio::time::sleep(Duration::from_millis(50)).await;
            for i in 0..per_round {
                let peer = lab.dst_v4((i % 200 + 1) as u8);
                let closed = tokio::task::block_in_place(|| connection(&client, &dst_ns, peer));
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                loop {
                    match tokio::time::timeout_at(deadline, stamps.recv()).await {
                        Ok(Some((dst, at))) if dst == peer => {
                            results
                                .entry(name)
                                .or_default()
                                .push(at.duration_since(closed));
                            break;
                        }
                        Ok(Some(_)) => continue,
                        _ => {
                            *missed.entry(name).or_default() += 1;
                            break;
                        }
                    }
                }
            }
            let _ = stop.send(true);
            let _ = task.await;
        }
    }
    println!(
        "\n## Close → scheduled latency ({rounds} rounds × {per_round} connections, interleaved)\n"
    );
    println!("| method | p50 | p90 | p99 | max | missed |");
    println!("|---|---|---|---|---|---|");
    let mut p50 = BTreeMap::new();
    for (name, mut v) in results {
        v.sort();
        p50.insert(name, percentile(&v, 0.5));
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            ms(percentile(&v, 0.5)),
            ms(percentile(&v, 0.9)),
            ms(percentile(&v, 0.99)),
            ms(*v.last().expect("samples")),
            missed.get(name).copied().unwrap_or(0)
        );
    }
    if let (Some(d), Some(p)) = (
        p50.get("destroy groups (hoptrace)"),
        p50.get("poll 10 ms (tcp-info's method)"),
    ) {
        println!(
            "\np50 ratio poll / destroy: {:.1}×",
            p.as_secs_f64() / d.as_secs_f64()
        );
    }
}

async fn serve_replay() -> (server::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let replay = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fake-scamper/replay"
    );
    let argv = [
        "hoptrace",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--output-dir",
        out.to_str().expect("utf-8"),
        "--backend",
        "scamper",
        "--scamper-bin",
        replay,
        "--allow-private",
        "--watch-host-sockets",
        "false",
        "--log",
        "error",
        "--queue-capacity",
        "4096",
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv).expect("flags").command else {
        unreachable!("serve")
    };
    (server::start(*args).await.expect("server"), dir)
}

/// Sends `events` over `streams` concurrent ReportCloses calls; returns the elapsed time.
async fn stream_events(url: &str, events: Vec<proto::CloseEvent>, streams: usize) -> Duration {
    let chunk = events.len().div_ceil(streams);
    let mut clients = Vec::new();
    for _ in 0..streams {
        clients.push(
            HoptraceClient::connect(url.to_owned())
                .await
                .expect("connect"),
        );
    }
    let started = Instant::now();
    let calls: Vec<_> = events
        .chunks(chunk)
        .map(<[proto::CloseEvent]>::to_vec)
        .zip(clients)
        .map(|(batch, mut client)| {
            tokio::spawn(async move {
                client
                    .report_closes(futures::stream::iter(batch))
                    .await
                    .expect("stream")
                    .into_inner()
                    .received
            })
        })
        .collect();
    let mut received = 0;
    for call in calls {
        received += call.await.expect("task");
    }
    assert_eq!(received as usize, events.len());
    started.elapsed()
}

fn event(i: usize, remote: &str) -> proto::CloseEvent {
    proto::CloseEvent {
        connection_id: format!("bench_1_{i:016X}"),
        local_addr: "10.77.1.1".into(),
        local_port: 443,
        remote_addr: remote.into(),
        remote_port: 40000,
        close_time: None,
        labels: Default::default(),
    }
}

async fn intake(refused: usize, cached: usize) {
    let (running, _dir) = serve_replay().await;
    let url = format!("http://{}", running.grpc_addr);
    let pipeline = Arc::clone(&running.pipeline);
    println!("\n## gRPC streaming intake (4 streams, client and server on the same 2 cores)\n");
    println!("| events | count | time | events/s |");
    println!("|---|---|---|---|");

    let events: Vec<_> = (0..refused).map(|i| event(i, "127.0.0.1")).collect();
    let took = stream_events(&url, events, 4).await;
    println!(
        "| refused by policy (pure intake) | {refused} | {:.2} s | {:.0} |",
        took.as_secs_f64(),
        refused as f64 / took.as_secs_f64()
    );

    // Trace 50 destinations once, then repeat them: every repeat is a cache hit.
    let mut client = HoptraceClient::connect(url.clone()).await.expect("connect");
    for d in 1..=50 {
        client
            .trace(proto::TraceRequest {
                address: format!("10.77.100.{d}"),
                ..Default::default()
            })
            .await
            .expect("prime");
    }
    let events: Vec<_> = (0..cached)
        .map(|i| event(refused + i, &format!("10.77.100.{}", i % 50 + 1)))
        .collect();
    let before = pipeline.metrics().outcome("cached");
    let took = stream_events(&url, events, 4).await;
    println!(
        "| cache hits, accepted | {cached} | {:.2} s | {:.0} |",
        took.as_secs_f64(),
        cached as f64 / took.as_secs_f64()
    );
    let started = Instant::now() - took;
    let limit = Instant::now() + Duration::from_secs(300);
    while pipeline.metrics().outcome("cached") < before + cached as u64 && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let written = pipeline.metrics().outcome("cached") - before;
    let all = started.elapsed();
    println!(
        "| cache hits, durable cached files written | {written} | {:.2} s | {:.0} |",
        all.as_secs_f64(),
        written as f64 / all.as_secs_f64()
    );
    running.shutdown().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let per_round = env_or("BENCH_CONNECTIONS", 100);
    let rounds = env_or("BENCH_ROUNDS", 4);
    if lab::require_root("intake latency benchmark") {
        latency(per_round, rounds).await;
    }
    intake(
        env_or("BENCH_REFUSED", 200_000),
        env_or("BENCH_CACHED", 20_000),
    )
    .await;
}
