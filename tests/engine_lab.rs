//! The in-process engine against the namespace lab, as a [`Tracer`]: sockets opened inside the
//! lab's client namespace (checked before the first socket exists); Paris UDP, ICMP echo and
//! TCP SYN traces over IPv4 and IPv6 whose hops equal the lab's ground truth and scamper's for
//! the same flow; many concurrent traces sharing the engine; the namespace check refusing a
//! thread in the wrong namespace. Needs root (namespaces, raw sockets); fails in CI when it
//! cannot run.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::backends::{lab_engine as lab_engine_with, lab_scamper};
use common::lab::{Lab, ns_id_of_pid, require_root};
use common::requests::paris_request;
use hoptrace_backends::engine::{
    Engine, EngineError, EngineOptions, ensure_thread_in, thread_ns_id,
};
use hoptrace_backends::{
    Confidence, Method, NetNs, Probe, ReplyKind, ScamperProcess, TraceError, TraceOutput,
    TraceRequest, Tracer,
};

/// Bound on one trace (the lab answers in well under a millisecond).
const DEADLINE: Duration = Duration::from_secs(20);

/// Refuses any address outside the lab's 10.77.0.0/16 and fd77::/16.
fn assert_lab(addr: IpAddr) {
    let inside = match addr {
        IpAddr::V4(v4) => v4.octets()[..2] == [10, 77],
        IpAddr::V6(v6) => v6.segments()[0] == 0xfd77,
    };
    assert!(inside, "{addr} is not a lab address");
}

/// An engine in the client namespace of `lab` (checked), with no probe budget.
fn lab_engine(lab: &Lab) -> Engine {
    lab_engine_with(
        lab,
        EngineOptions {
            pps: 0,
            ..EngineOptions::default()
        },
    )
}

fn request(dst: IpAddr, probe: Probe) -> TraceRequest {
    assert_lab(dst);
    TraceRequest {
        method: Method::Paris(probe),
        source_port: Some(40000),
        ..paris_request(dst, DEADLINE)
    }
}

/// (ttl, address) of every hop.
fn hops(out: &TraceOutput) -> Vec<(u8, IpAddr)> {
    out.summary.hops.iter().map(|h| (h.ttl, h.addr)).collect()
}

/// The trace of `dst` is the lab's path: TTL 1..=n its routers (one of the `n` alternatives at
/// each), TTL n + 1 the destination answering as `probe` makes it answer, and nothing else.
fn assert_lab_path(out: &TraceOutput, dst: IpAddr, probe: Probe, alternatives: &[Vec<IpAddr>]) {
    let summary = &out.summary;
    assert_eq!(
        summary.stop_reason.as_deref(),
        Some("COMPLETED"),
        "{}",
        out.lines
    );
    assert_eq!(summary.dst, dst);
    let ttls: Vec<u8> = summary.hops.iter().map(|h| h.ttl).collect();
    let path = u8::try_from(alternatives.len() + 1).expect("a short path");
    assert_eq!(ttls, (1..=path).collect::<Vec<_>>(), "{}", out.lines);
    for (hop, choices) in summary.hops.iter().zip(alternatives) {
        assert!(
            choices.contains(&hop.addr),
            "ttl {}: {} not in {choices:?}",
            hop.ttl,
            hop.addr
        );
        assert_eq!(hop.kind, ReplyKind::TimeExceeded, "{}", out.lines);
    }
    let last = &summary.hops[alternatives.len()];
    assert_eq!(last.addr, dst);
    let kind = match probe {
        Probe::Udp => ReplyKind::Unreachable,
        Probe::Icmp => ReplyKind::EchoReply,
        Probe::Tcp => ReplyKind::Tcp,
    };
    assert_eq!(last.kind, kind, "{}", out.lines);
}

/// Every probe kind to one destination: the engine's hops are the lab's and scamper's for the
/// scamper's trace of `request`. In a freshly built lab Debian's scamper sometimes sends no
/// probe at all for IPv6 TCP (`stop_reason` NONE, `probe_count` 0, after half a second): it
/// resolves the first hop's MAC with its own neighbour solicitation over a packet socket and
/// gives up; about a second after the lab is up it works (the kernel's neighbour cache and
/// MLD reports are not the cause; the root cause is not found). That is scamper not starting,
/// not a path: such a result is run again, at most 8 times.
async fn scamper_trace(scamper: &ScamperProcess, request: &TraceRequest) -> TraceOutput {
    for _ in 0..8 {
        let out = scamper.trace(request).await.expect("scamper trace");
        if !out.lines.contains(r#""probe_count":0}"#) {
            return out;
        }
        eprintln!("scamper sent no probe, running it again: {}", out.lines);
    }
    panic!("scamper sent no probe in 8 tries");
}

/// The widest limits the service accepts (`--probe-wait 20s`, `--attempts 10`,
/// `--probe-budget 1`) reach real scamper clamped into what it accepts: both `trace` and
/// `tracelb` run and reach the destination instead of scamper refusing the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scamper_runs_with_the_widest_limits_the_service_allows() {
    if !require_root("scamper_runs_with_the_widest_limits_the_service_allows") {
        return;
    }
    let lab = Lab::up();
    let tools = tempfile::tempdir().expect("tempdir");
    let scamper = lab_scamper(&lab, tools.path());
    let dst = lab.dst_v4(9);
    for method in [Method::Paris(Probe::Udp), Method::Mda(Probe::Udp)] {
        let mut wide = TraceRequest {
            method,
            ..request(dst, Probe::Udp)
        };
        wide.limits.wait = Duration::from_secs(20);
        wide.limits.attempts = 10;
        wide.limits.probe_budget = 1;
        wide.limits.deadline = Duration::from_secs(60);
        let out = scamper_trace(&scamper, &wide).await;
        assert_eq!(out.summary.dst, dst, "{}", out.lines);
        let reached = match method {
            Method::Paris(_) => out.summary.hops.iter().any(|h| h.addr == dst),
            Method::Mda(_) => out.summary.links.iter().any(|l| l.to == Some(dst)),
        };
        assert!(reached, "{method:?}: {}", out.lines);
    }
}

/// same flow (same destination, same ports).
async fn engine_matches_lab_and_scamper(lab: &Lab, dst: IpAddr, alternatives: Vec<Vec<IpAddr>>) {
    let engine = lab_engine(lab);
    let tools = tempfile::tempdir().expect("tempdir");
    let scamper = lab_scamper(lab, tools.path());
    for probe in [Probe::Udp, Probe::Icmp, Probe::Tcp] {
        let request = request(dst, probe);
        let ours = engine.trace(&request).await.expect("engine trace");
        eprintln!("{}", ours.lines);
        assert_lab_path(&ours, dst, probe, &alternatives);
        // The summary built with the lines is what reading the lines back gives.
        let read_back = hoptrace_backends::scamper_json::summarize(ours.lines.as_bytes());
        assert_eq!(read_back.expect("summarize"), ours.summary);
        assert_eq!(ours.summary.method, scamper_method(probe));
        let theirs = scamper_trace(&scamper, &request).await;
        assert_eq!(
            hops(&ours),
            hops(&theirs),
            "{probe:?}\nours {}\ntheirs {}",
            ours.lines,
            theirs.lines
        );
        // A second engine trace of the same flow takes the same path (Paris).
        let again = engine.trace(&request).await.expect("engine trace");
        assert_eq!(hops(&again), hops(&ours));
    }
    let stats = engine.stats();
    assert_eq!(stats.kernel_drops, 0, "{stats:?}");
    assert_eq!(
        stats.unstamped, 0,
        "every reply has the kernel's receive time: {stats:?}"
    );
    engine.shutdown().await;
}

fn scamper_method(probe: Probe) -> &'static str {
    match probe {
        Probe::Udp => "udp-paris",
        Probe::Icmp => "icmp-echo-paris",
        Probe::Tcp => "tcp",
    }
}

#[tokio::test]
async fn engine_v4_traces_equal_the_lab_and_scamper() {
    if !require_root("engine_v4_traces_equal_the_lab_and_scamper") {
        return;
    }
    let lab = Lab::up();
    let dst = lab.dst_v4(5);
    engine_matches_lab_and_scamper(&lab, dst, lab.hops_v4()).await;
    // Seven hops: more than one probing window (the gap limit, 5 TTLs).
    let far = lab.far_v4(5);
    engine_matches_lab_and_scamper(&lab, far, lab.far_hops_v4()).await;
}

#[tokio::test]
async fn engine_v6_traces_equal_the_lab_and_scamper() {
    if !require_root("engine_v6_traces_equal_the_lab_and_scamper") {
        return;
    }
    let lab = Lab::up();
    let dst = lab.dst_v6(5);
    engine_matches_lab_and_scamper(&lab, dst, lab.hops_v6()).await;
    let far = lab.far_v6(5);
    engine_matches_lab_and_scamper(&lab, far, lab.far_hops_v6()).await;
}

/// The lab's multipath ground truth: every link of the diamond (r4 answers from one address
/// whichever branch a probe came through), ending at `dst`.
fn diamond_links(truth: &[Vec<IpAddr>], dst: IpAddr) -> BTreeSet<(Option<IpAddr>, Option<IpAddr>)> {
    let mut hops: Vec<Vec<IpAddr>> = truth.to_vec();
    hops.push(vec![dst]);
    hops.windows(2)
        .flat_map(|w| {
            let (near, far) = (&w[0], &w[1]);
            near.iter()
                .flat_map(move |a| far.iter().map(move |b| (Some(*a), Some(*b))))
        })
        .collect()
}

/// An anonymous router beside a responsive one: r3b drops every Time Exceeded it would send
/// (nftables in its namespace), so half the flows are silent at TTL 3. MDA over UDP, IPv4 and
/// IPv6, 40 traces at once each (fixed ports, so the same flows every run): the silence never
/// hides r3a (found with its link from r2 in at least 90%: the rule's 95% assumes an even
/// split, and the lab's hash of these flows gives 40/40 on IPv4, 37/40 on IPv6; a silent first
/// probe used to end the search, missing r3a whenever the first flow took r3b), and nothing
/// is reported that the lab does not have — only, when every probe at TTL 3 happened to go
/// through r3b, r4 seen across one silent hop. Every round with a silent probe waits out its
/// attempts (2 s here), so these traces take 10–30 s: a 120 s deadline. r3a's answers also
/// show router pacing that it is not limited, though every retry at TTL 3 counts as its
/// silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipath_finds_the_router_beside_an_anonymous_one() {
    if !require_root("multipath_finds_the_router_beside_an_anonymous_one") {
        return;
    }
    let lab = Lab::up();
    lab.nft(
        "r3b",
        "table inet hoptrace_anonymous {\n\
         \tchain out {\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\ticmp type time-exceeded drop\n\
         \t\ticmpv6 type time-exceeded drop\n\
         \t}\n\
         }\n",
    );
    let engine = Arc::new(lab_engine(&lab));
    let runs: u16 = 40;
    for (dst, truth) in [
        (lab.dst_v4(9), lab.hops_v4()),
        (lab.dst_v6(9), lab.hops_v6()),
    ] {
        let [r1, r2, r3, r4] = [0, 1, 2, 3].map(|i| truth[i][0]);
        let allowed: BTreeSet<_> = [
            (r1, Some(r2)),
            (r2, Some(r3)),
            (r3, Some(r4)),
            (r4, Some(dst)),
            (r2, None),
        ]
        .into_iter()
        .map(|(a, b)| (Some(a), b))
        .chain([(None, Some(r4))])
        .collect();
        let mut beside = 0;
        for chunk in (0..runs).collect::<Vec<_>>().chunks(40) {
            let mut set = tokio::task::JoinSet::new();
            for &run in chunk {
                // Silent flows make MDA use more flows than elsewhere: 128 ports each (more
                // than the probe budget of 100), so no two traces share one.
                let mut request = TraceRequest {
                    method: Method::Mda(Probe::Udp),
                    source_port: Some(1_024 + run * 128),
                    ..request(dst, Probe::Udp)
                };
                request.limits.deadline = Duration::from_secs(120);
                let engine = Arc::clone(&engine);
                set.spawn(async move { (run, engine.trace(&request).await) });
            }
            while let Some(done) = set.join_next().await {
                let (run, out) = done.expect("trace task");
                let out = out.unwrap_or_else(|e| panic!("run {run}: {e}; {:?}", engine.stats()));
                let found: BTreeSet<_> = out.summary.links.iter().map(|l| (l.from, l.to)).collect();
                assert!(found.is_subset(&allowed), "run {run}: {}", out.lines);
                assert!(
                    found.contains(&(Some(r4), Some(dst))),
                    "run {run}: {}",
                    out.lines
                );
                beside += usize::from(found.contains(&(Some(r2), Some(r3))));
            }
        }
        eprintln!("{dst}: r3a found beside the anonymous r3b in {beside}/{runs}");
        assert!(
            beside * 100 >= usize::from(runs) * 90,
            "{dst}: {beside}/{runs}"
        );
    }
    assert_eq!(engine.stats().kernel_drops, 0);
}

/// One MDA trace's probe count (`probec`).
fn probec(out: &TraceOutput) -> u64 {
    let line: serde_json::Value =
        serde_json::from_str(out.lines.lines().nth(1).expect("tracelb line")).expect("json");
    line["probec"].as_u64().expect("probec")
}

/// MDA over UDP and TCP flows, IPv4 and IPv6: at 95% confidence at least 95% of the traces find
/// every node and link of the diamond, and none reports a node or link the lab does not have.
///
/// 1,000 traces per family and protocol rather than 200: at 95% confidence the rule's real miss
/// rate on a two-way diamond is 2 × 2⁻⁶ = 3.1%, so 200 traces miss more than 10 times in about
/// one set of flows out of twelve (the first IPv6 UDP set tried here missed 13 times); over
/// 1,000 the 95% bound holds with 3.5 standard deviations to spare. The ports are fixed (flows
/// take consecutive ports from a per-run base), so the outcome is the same on every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipath_finds_the_whole_diamond() {
    if !require_root("multipath_finds_the_whole_diamond") {
        return;
    }
    let lab = Lab::up();
    let engine = Arc::new(lab_engine(&lab));
    let runs: u16 = 1000;
    // Traces in flight at once; each has 64 ports from its base for its flows.
    let in_flight: u16 = 20;
    for (dst, truth, probe) in [
        (lab.dst_v4(9), lab.hops_v4(), Probe::Udp),
        (lab.dst_v4(9), lab.hops_v4(), Probe::Tcp),
        (lab.dst_v6(9), lab.hops_v6(), Probe::Udp),
        (lab.dst_v6(9), lab.hops_v6(), Probe::Tcp),
    ] {
        let expect = diamond_links(&truth, dst);
        let mut whole = 0;
        let mut probes = Vec::new();
        for chunk in (0..runs).collect::<Vec<_>>().chunks(usize::from(in_flight)) {
            let mut set = tokio::task::JoinSet::new();
            for &run in chunk {
                let request = TraceRequest {
                    method: Method::Mda(probe),
                    source_port: Some(1_024 + run * 64),
                    ..request(dst, probe)
                };
                let engine = Arc::clone(&engine);
                set.spawn(async move { (run, engine.trace(&request).await) });
            }
            while let Some(done) = set.join_next().await {
                let (run, out) = done.expect("trace task");
                let out = out.expect("engine MDA trace");
                let found: BTreeSet<_> = out.summary.links.iter().map(|l| (l.from, l.to)).collect();
                assert!(
                    found.is_subset(&expect),
                    "{probe:?} run {run}: {}",
                    out.lines
                );
                whole += usize::from(found == expect);
                probes.push(probec(&out));
            }
        }
        probes.sort_unstable();
        eprintln!(
            "{dst} {probe:?}: whole diamond in {whole}/{runs}, probes min {} median {} max {}",
            probes[0],
            probes[probes.len() / 2],
            probes[probes.len() - 1]
        );
        assert!(
            whole * 100 >= usize::from(runs) * 95,
            "{dst} {probe:?}: whole diamond in {whole}/{runs}"
        );
    }
    // ICMP echo flows (the echo identifier varies): whatever the routers' hashing makes of
    // them, every link found is the lab's and the destination is reached.
    for (dst, truth) in [
        (lab.dst_v4(9), lab.hops_v4()),
        (lab.dst_v6(9), lab.hops_v6()),
    ] {
        let expect = diamond_links(&truth, dst);
        let request = TraceRequest {
            method: Method::Mda(Probe::Icmp),
            source_port: Some(50_000),
            ..request(dst, Probe::Icmp)
        };
        let out = engine.trace(&request).await.expect("engine ICMP MDA trace");
        let found: BTreeSet<_> = out.summary.links.iter().map(|l| (l.from, l.to)).collect();
        assert!(found.is_subset(&expect), "{}", out.lines);
        assert!(
            found.iter().any(|(_, to)| *to == Some(dst)),
            "destination not reached: {}",
            out.lines
        );
        assert!(
            out.lines.contains(r#""method":"icmp-echo""#),
            "{}",
            out.lines
        );
    }
    // 99% confidence: more probes for the same flows.
    let dst = lab.dst_v4(9);
    let count = |confidence| {
        let mut request = TraceRequest {
            method: Method::Mda(Probe::Udp),
            source_port: Some(45_000),
            ..request(dst, Probe::Udp)
        };
        request.limits.confidence = confidence;
        let engine = Arc::clone(&engine);
        async move { probec(&engine.trace(&request).await.expect("trace")) }
    };
    let (p95, p99) = (count(Confidence::P95).await, count(Confidence::P99).await);
    assert!(p99 > p95, "99%: {p99} probes, 95%: {p95}");
    let stats = engine.stats();
    assert_eq!(stats.kernel_drops, 0, "{stats:?}");
    assert_eq!(
        stats.unstamped, 0,
        "every reply has the kernel's receive time: {stats:?}"
    );
    assert_eq!(engine.running(), 0);
}

/// With every router and the destination at Linux's default ICMP rate limits (a burst of 6,
/// then one error per second on IPv4, per 100 ms on IPv6), 200 traces started at once still
/// get every hop: the first burst shows each router's limit, and the retries are paced to it.
/// TCP probes, so the destination's answer (a RST) is not rate limited; "complete" is the
/// strict reading: the destination reached *and* all four routers answered.
async fn rate_limited_routers_still_answer(lab: &Lab, v4: bool) {
    let engine = Arc::new(lab_engine(lab));
    let traces: u16 = 200;
    let mut set = tokio::task::JoinSet::new();
    for n in 1..=traces {
        let dst = if v4 {
            lab.dst_v4(u8::try_from(n).expect("fits"))
        } else {
            lab.dst_v6(n)
        };
        let mut request = TraceRequest {
            source_port: Some(40_000),
            ..request(dst, Probe::Tcp)
        };
        // IPv4 routers answer one trace a second: the last of 200 waits over three minutes.
        request.limits.deadline = Duration::from_secs(400);
        let engine = Arc::clone(&engine);
        set.spawn(async move { (dst, engine.trace(&request).await) });
    }
    let mut complete = 0;
    while let Some(done) = set.join_next().await {
        let (dst, out) = done.expect("trace task");
        let out = out.expect("engine trace");
        let ttls: Vec<u8> = out.summary.hops.iter().map(|h| h.ttl).collect();
        let whole = out.summary.stop_reason.as_deref() == Some("COMPLETED")
            && ttls.iter().copied().eq(1..=5);
        complete += usize::from(whole);
        if !whole {
            eprintln!("{dst}: ttls {ttls:?} {:?}", out.summary.stop_reason);
        }
    }
    let stats = engine.stats();
    eprintln!("v4={v4}: {complete}/{traces} complete; {stats:?}");
    assert!(stats.router_paced > 0, "nothing was paced: {stats:?}");
    assert!(
        complete * 100 >= usize::from(traces) * 95,
        "v4={v4}: {complete}/{traces} complete"
    );
}

/// Router pacing never costs a trace its result: 60 traces at once through IPv4 routers at
/// their default limits (one answer a second each), with an 8 s deadline. Pacing all of them
/// would queue the routers' probes a minute deep and fail most traces with a timeout; a probe
/// whose turn would come too late for its trace goes out at once instead. Every trace ends
/// before its deadline, at the destination (TCP: its RST is not rate limited), the late ones
/// with silent hops where the routers stayed quiet, as an unpaced tracer would see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_pacing_never_holds_a_probe_past_its_trace() {
    if !require_root("router_pacing_never_holds_a_probe_past_its_trace") {
        return;
    }
    let lab = Lab::up_with_ratelimit();
    let engine = Arc::new(lab_engine(&lab));
    let deadline = Duration::from_secs(8);
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for n in 1..=60u8 {
        let dst = lab.dst_v4(n);
        let mut request = request(dst, Probe::Tcp);
        request.limits.deadline = deadline;
        let engine = Arc::clone(&engine);
        set.spawn(async move { (dst, engine.trace(&request).await) });
    }
    let (mut whole, mut gaps) = (0, 0);
    while let Some(done) = set.join_next().await {
        let (dst, out) = done.expect("trace task");
        let out = out.unwrap_or_else(|e| panic!("{dst}: {e}"));
        assert_eq!(
            out.summary.stop_reason.as_deref(),
            Some("COMPLETED"),
            "{}",
            out.lines
        );
        let last = out.summary.hops.last().expect("hops");
        assert_eq!((last.ttl, last.addr), (5, dst), "{}", out.lines);
        if out.summary.hops.len() == 5 {
            whole += 1;
        } else {
            gaps += 1;
        }
    }
    let stats = engine.stats();
    eprintln!(
        "{whole} whole, {gaps} with silent hops, in {:?}; {stats:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < deadline, "{:?}", started.elapsed());
    assert!(stats.router_paced > 0, "nothing was paced: {stats:?}");
    assert!(
        gaps > 0,
        "every trace was whole: the routers were not limited? {stats:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_v6_routers_still_answer() {
    if !require_root("rate_limited_v6_routers_still_answer") {
        return;
    }
    let lab = Lab::up_with_ratelimit();
    rate_limited_routers_still_answer(&lab, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_v4_routers_still_answer() {
    if !require_root("rate_limited_v4_routers_still_answer") {
        return;
    }
    let lab = Lab::up_with_ratelimit();
    rate_limited_routers_still_answer(&lab, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_traces_share_one_engine() {
    if !require_root("concurrent_traces_share_one_engine") {
        return;
    }
    let lab = Lab::up();
    let engine = Arc::new(lab_engine(&lab));
    let mut tasks = tokio::task::JoinSet::new();
    // 400 traces at once: 200 IPv4 and 200 IPv6 destinations, mixed probe kinds, ports chosen
    // by the engine.
    for n in 1..=200u8 {
        for (dst, alternatives) in [
            (lab.dst_v4(n), lab.hops_v4()),
            (lab.dst_v6(u16::from(n)), lab.hops_v6()),
        ] {
            let probe = [Probe::Udp, Probe::Icmp, Probe::Tcp][usize::from(n) % 3];
            let engine = Arc::clone(&engine);
            let request = TraceRequest {
                source_port: None,
                ..request(dst, probe)
            };
            tasks.spawn(async move {
                let out = engine.trace(&request).await.expect("trace");
                assert_lab_path(&out, dst, probe, &alternatives);
            });
        }
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        result.expect("trace task");
        done += 1;
    }
    assert_eq!(done, 400);
    let stats = engine.stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.kernel_drops, 0, "{stats:?}");
    assert_eq!(
        stats.unstamped, 0,
        "every reply has the kernel's receive time: {stats:?}"
    );
    assert_eq!(engine.running(), 0);
}

/// Shutting the engine down ends the traces it runs and those waiting for it with an error,
/// promptly, and refuses new ones: no caller is left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_trace_with_an_error_and_refuses_new_ones() {
    if !require_root("shutdown_ends_every_trace_with_an_error_and_refuses_new_ones") {
        return;
    }
    const TRACES: u16 = 2000;
    let lab = Lab::up();
    // 2000 traces of 5 probes at 1000 probes/s need about 10 s: most are still running or
    // waiting when the engine stops.
    let engine = Arc::new(lab_engine_with(
        &lab,
        EngineOptions {
            pps: 1000,
            ..EngineOptions::default()
        },
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..TRACES {
        let engine = Arc::clone(&engine);
        let dst = lab.dst_v4(u8::try_from(n % 200 + 1).expect("fits"));
        let request = TraceRequest {
            source_port: None,
            ..request(dst, Probe::Udp)
        };
        tasks.spawn(async move { engine.trace(&request).await.map(|_| ()) });
    }
    // Bounded wait for the first probes.
    for _ in 0..500 {
        if engine.stats().probes_sent > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(engine.stats().probes_sent > 0, "no probe within 5 s");
    engine.shutdown().await;
    let (mut completed, mut stopped) = (0, 0);
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            match joined.expect("trace task") {
                Ok(()) => completed += 1,
                Err(TraceError::Unsupported(why)) if why.contains("shut down") => stopped += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .expect("every trace ends within 5 s of the shutdown");
    eprintln!("{completed} completed, {stopped} ended by the shutdown");
    assert_eq!(completed + stopped, usize::from(TRACES));
    assert!(stopped > 0, "the shutdown came before the end of the work");
    let after = engine
        .trace(&request(lab.dst_v4(1), Probe::Udp))
        .await
        .expect_err("a trace after the shutdown is refused");
    assert!(after.to_string().contains("shut down"), "{after}");
}

#[test]
fn sockets_are_refused_in_the_wrong_namespace() {
    if !require_root("sockets_are_refused_in_the_wrong_namespace") {
        return;
    }
    let lab = Lab::up();
    let client = NetNs::open(&lab.client_ns()).expect("open the lab client namespace");
    let r1 = NetNs::open(&lab.ns("r1")).expect("open the lab r1 namespace");

    // This thread is in the test's own namespace, not the lab's.
    let err = ensure_thread_in(&client).expect_err("test thread is not in the lab");
    assert!(matches!(err, EngineError::WrongNamespace { .. }), "{err}");
    // A thread in r1 is not in client, and the reverse.
    let err = r1
        .run_inside(|| ensure_thread_in(&client))
        .expect("enter r1")
        .expect_err("r1 is not client");
    assert!(matches!(err, EngineError::WrongNamespace { .. }), "{err}");
    assert!(err.to_string().contains(&lab.client_ns()), "{err}");
    // A thread inside the namespace passes, and sees the namespace's id.
    client
        .run_inside(|| ensure_thread_in(&client))
        .expect("enter client")
        .expect("a thread in client is in client");
    let inside = client
        .run_inside(thread_ns_id)
        .expect("enter client")
        .expect("thread namespace id");
    assert_eq!(inside, Lab::ns_id(&lab.client_ns()));
    assert_ne!(inside, ns_id_of_pid(std::process::id()));
}
