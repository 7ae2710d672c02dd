//! The whole service against a real network: the namespace lab, real scamper started inside
//! the lab's client namespace through `--netns`, the gRPC server on 127.0.0.1:0 in the test's
//! own namespace. Needs root (namespaces); fails in CI when it cannot run.

mod common;

use std::{collections::HashSet, net::IpAddr, time::Duration};

use common::{
    lab::{Lab, require_root},
    server::{assert_accounted, event, lab_server, outcomes},
};
use hoptrace::proto::{self, Disposition, ReplyKind, subscribe_response::Event};

/// How long one lab condition may take before the test fails.
const LIMIT: Duration = Duration::from_secs(60);

/// The parsed lines of a trace file.
fn lines(contents: &str) -> Vec<serde_json::Value> {
    let pieces: Vec<&str> = contents.split('\n').collect();
    assert_eq!(
        pieces.len(),
        5,
        "not four newline-terminated lines: {contents:?}"
    );
    assert_eq!(pieces[4], "");
    pieces[..4]
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Checks a single-path record against the lab's ground truth.
fn assert_hops_match_the_lab(record: &proto::TraceRecord, truth: &[Vec<IpAddr>], dst: IpAddr) {
    let by_ttl: Vec<(u32, IpAddr)> = record
        .hops
        .iter()
        .map(|h| (h.ttl, h.address.parse().expect("hop address")))
        .collect();
    for (i, choices) in truth.iter().enumerate() {
        let ttl = i as u32 + 1;
        let at: Vec<_> = by_ttl.iter().filter(|(t, _)| *t == ttl).collect();
        assert_eq!(at.len(), 1, "ttl {ttl}: {by_ttl:?}");
        assert!(
            choices.contains(&at[0].1),
            "ttl {ttl}: {} not in {choices:?}",
            at[0].1
        );
    }
    let last = record.hops.last().expect("hops");
    assert_eq!(last.ttl, truth.len() as u32 + 1, "{by_ttl:?}");
    assert_eq!(last.address, dst.to_string());
    assert_eq!(
        last.kind,
        ReplyKind::Unreachable as i32,
        "UDP reaches a closed port"
    );
    assert!(
        record
            .hops
            .iter()
            .all(|h| !h.rtts_ms.is_empty() && h.rtts_ms[0] > 0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_trace_files_and_repeats_become_cached_copies() {
    if !require_root("events_become_trace_files_and_repeats_become_cached_copies") {
        return;
    }
    let lab = Lab::up();
    let (mut s, tools) = lab_server(&lab, &[]).await;
    let v4 = lab.dst_v4(5);
    let v6 = lab.dst_v6(5);

    for (id, dst) in [
        ("lab_1_000000000000A001", v4),
        ("lab_1_000000000000A002", v6),
    ] {
        let reply = s
            .client
            .report_close(event(id, &dst.to_string()))
            .await
            .expect("accepted")
            .into_inner();
        assert_eq!(reply.disposition, Disposition::Scheduled as i32);
    }
    s.wait_status(LIMIT, |st| outcomes(st).traced == 2).await;

    // The file: M-Lab path, four lines, the metadata line byte for byte.
    let files = s.files();
    assert_eq!(files.len(), 2, "{files:?}");
    let path_shape =
        regex::Regex::new(r"^\d{4}/\d{2}/\d{2}/\d{8}T\d{6}Z_lab_1_000000000000A00[12]\.jsonl$")
            .expect("regex");
    assert!(files.iter().all(|f| path_shape.is_match(f)), "{files:?}");
    let original = s.get("lab_1_000000000000A001").await;
    let on_disk = std::fs::read_to_string(s.out().join(&original.path)).expect("file");
    assert_eq!(on_disk, original.contents);
    let parsed = lines(&on_disk);
    assert_eq!(
        on_disk.lines().next().expect("line 1"),
        r#"{"UUID":"lab_1_000000000000A001","TracerouteCallerVersion":"hoptrace-0.1.0","CachedResult":false,"CachedUUID":""}"#
    );
    assert_eq!(parsed[1]["type"], "cycle-start");
    assert_eq!(parsed[2]["type"], "trace");
    assert_eq!(parsed[2]["method"], "udp-paris");
    assert_eq!(
        parsed[2]["src"], "10.77.1.1",
        "probes left from the lab client"
    );
    assert_eq!(parsed[2]["stop_reason"], "COMPLETED");
    assert_eq!(parsed[3]["type"], "cycle-stop");
    assert_hops_match_the_lab(&original, &lab.hops_v4(), v4);
    let six = s.get("lab_1_000000000000A002").await;
    assert_hops_match_the_lab(&six, &lab.hops_v6(), v6);

    // A repeat within the window, spelled either way, is a cached copy naming the original.
    for id in ["lab_1_000000000000A003", "lab_1_000000000000A004"] {
        let remote = if id.ends_with('3') {
            v4.to_string()
        } else {
            format!("::ffff:{v4}")
        };
        let reply = s
            .client
            .report_close(event(id, &remote))
            .await
            .expect("accepted")
            .into_inner();
        assert_eq!(reply.disposition, Disposition::Cached as i32, "{id}");
    }
    s.wait_status(LIMIT, |st| outcomes(st).cached == 2).await;
    for id in ["lab_1_000000000000A003", "lab_1_000000000000A004"] {
        let copy = s.get(id).await;
        let (meta, rest) = copy.contents.split_once('\n').expect("lines");
        assert_eq!(
            meta,
            format!(
                r#"{{"UUID":"{id}","TracerouteCallerVersion":"hoptrace-0.1.0","CachedResult":true,"CachedUUID":"lab_1_000000000000A001"}}"#
            )
        );
        assert_eq!(rest, original.contents.split_once('\n').expect("lines").1);
        assert!(copy.cached_result);
    }

    // Concurrent events for a new destination: one trace, the others wait for it.
    let burst: Vec<_> = (0..5)
        .map(|i| {
            event(
                &format!("lab_2_00000000000000B{i}"),
                &lab.dst_v4(6).to_string(),
            )
        })
        .collect();
    let summary = s
        .client
        .report_closes(futures::stream::iter(burst))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(
        summary.dispositions.get("SCHEDULED"),
        Some(&1),
        "{summary:?}"
    );
    assert_eq!(summary.dispositions.get("JOINED"), Some(&4), "{summary:?}");
    let status = s
        .wait_status(LIMIT, |st| {
            outcomes(st).traced == 3 && outcomes(st).cached == 6
        })
        .await;
    let cache = status.cache.expect("cache");
    assert_eq!(
        (cache.misses, cache.waits, cache.hits),
        (3, 4, 2),
        "{cache:?}"
    );
    assert_eq!(outcomes(&status).pending, 0);
    assert_accounted(&status);
    assert_eq!(s.files().len(), 3 + 6);

    // Every scamper ran inside the lab.
    let guard_runs = std::fs::read_to_string(tools.path().join("lab-guard.seen")).expect("seen");
    assert_eq!(guard_runs.lines().count(), 3);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_record_exactly_once_across_a_reconnect() {
    if !require_root("subscribers_get_every_record_exactly_once_across_a_reconnect") {
        return;
    }
    let lab = Lab::up();
    let (mut s, _tools) = lab_server(&lab, &[]).await;
    let subscribe = |after: &str| proto::SubscribeRequest {
        after_cursor: after.to_owned(),
        ..Default::default()
    };
    let mut steady = s
        .client
        .subscribe(subscribe(""))
        .await
        .expect("sub")
        .into_inner();
    let mut leaver = s
        .client
        .subscribe(subscribe(""))
        .await
        .expect("sub")
        .into_inner();
    // Only IPv6 records, to check filters on the same stream of events.
    let mut v6_only = s
        .client
        .subscribe(proto::SubscribeRequest {
            destination_prefix: "fd77:100::/64".into(),
            ..Default::default()
        })
        .await
        .expect("sub")
        .into_inner();
    s.wait_status(LIMIT, |st| st.subscribers == 3).await;

    let report = |first: u8, n: u8| {
        (first..first + n)
            .map(|i| {
                let dst = if i % 2 == 0 {
                    lab.dst_v4(i).to_string()
                } else {
                    lab.dst_v6(u16::from(i)).to_string()
                };
                event(&format!("sub_1_{i:016X}"), &dst)
            })
            .collect::<Vec<_>>()
    };
    async fn next_record(
        stream: &mut tonic::Streaming<proto::SubscribeResponse>,
    ) -> proto::TraceRecord {
        let message = tokio::time::timeout(LIMIT, stream.message())
            .await
            .expect("a record in time")
            .expect("stream ok")
            .expect("stream open");
        match message.event {
            Some(Event::Record(r)) => r,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    s.client
        .report_closes(futures::stream::iter(report(10, 4)))
        .await
        .expect("reported");
    let mut left_with = Vec::new();
    for _ in 0..2 {
        left_with.push(next_record(&mut leaver).await);
    }
    let cursor = left_with[1].cursor.clone();
    drop(leaver);

    s.client
        .report_closes(futures::stream::iter(report(20, 6)))
        .await
        .expect("reported");
    s.wait_status(LIMIT, |st| outcomes(st).traced == 10).await;

    let mut steady_got = Vec::new();
    for _ in 0..10 {
        steady_got.push(next_record(&mut steady).await);
    }
    let mut resumed = s
        .client
        .subscribe(subscribe(&cursor))
        .await
        .expect("resume")
        .into_inner();
    let mut resumed_got = Vec::new();
    for _ in 0..8 {
        resumed_got.push(next_record(&mut resumed).await);
    }
    // Nothing more is pending on the resumed stream: no duplicate.
    let extra = tokio::time::timeout(Duration::from_millis(300), resumed.message()).await;
    assert!(extra.is_err(), "unexpected extra message {extra:?}");

    let uuids = |rs: &[proto::TraceRecord]| rs.iter().map(|r| r.uuid.clone()).collect::<Vec<_>>();
    let all: HashSet<String> = uuids(&steady_got).into_iter().collect();
    assert_eq!(
        all.len(),
        10,
        "steady subscriber saw duplicates: {:?}",
        uuids(&steady_got)
    );
    let mut rejoined = uuids(&left_with);
    rejoined.extend(uuids(&resumed_got));
    assert_eq!(
        rejoined,
        uuids(&steady_got),
        "same records, same order, each once"
    );
    // Records replayed from the store carry the same contents as the live ones.
    for (a, b) in resumed_got.iter().zip(&steady_got[2..]) {
        assert_eq!(a.contents, b.contents);
        assert_eq!(a.cursor, b.cursor);
        assert_eq!(a.backend, "scamper");
    }

    let mut v6_got = Vec::new();
    for _ in 0..5 {
        v6_got.push(next_record(&mut v6_only).await);
    }
    assert!(
        v6_got
            .iter()
            .all(|r| r.destination.starts_with("fd77:100::")),
        "{:?}",
        uuids(&v6_got)
    );
    assert_accounted(&s.status().await);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_trace_returns_the_record_and_multipath_records_the_lab() {
    if !require_root("an_on_demand_trace_returns_the_record_and_multipath_records_the_lab") {
        return;
    }
    let lab = Lab::up();
    let (mut paris, _t1) = lab_server(&lab, &[]).await;
    let dst = lab.dst_v4(7);
    let record = paris.trace(&dst.to_string(), false).await.expect("traced");
    assert_hops_match_the_lab(&record, &lab.hops_v4(), dst);
    assert!(record.uuid.starts_with("trace-"), "{}", record.uuid);
    assert!(!record.cached_result);
    // Asked again with the cache allowed: the same measurement, as a cached copy.
    let again = paris.trace(&dst.to_string(), true).await.expect("cached");
    assert!(again.cached_result);
    assert_eq!(again.cached_uuid, record.uuid);
    paris.stop().await;

    let (mut mda, _t2) = lab_server(&lab, &["--method", "mda-udp"]).await;
    let record = mda.trace(&dst.to_string(), false).await.expect("traced");
    let parsed = lines(&record.contents);
    assert_eq!(parsed[2]["type"], "tracelb");
    assert_eq!(parsed[2]["method"], "udp-sport");
    assert_eq!(record.kind, proto::TraceKind::Multipath as i32);
    // Debian scamper's tracelb ignores `-s`: its flows follow its PID, so whether MDA at 95%
    // confidence sees both branches varies from run to run (it misses one a few percent of
    // the time). What is certain is that every node and link it reports is the lab's.
    let truth = lab.hops_v4();
    for hop in &record.hops {
        let addr: IpAddr = hop.address.parse().expect("address");
        let ttl = hop.ttl as usize;
        let expected = if ttl == truth.len() + 1 {
            vec![dst]
        } else {
            truth.get(ttl - 1).cloned().unwrap_or_default()
        };
        assert!(
            expected.contains(&addr),
            "ttl {ttl}: {addr} not in {expected:?}"
        );
    }
    let ttls: HashSet<u32> = record.hops.iter().map(|h| h.ttl).collect();
    assert_eq!(ttls, (1..=5).collect(), "{:?}", record.hops);
    let node_ttl = |a: &str| record.hops.iter().find(|h| h.address == a).map(|h| h.ttl);
    assert!(!record.links.is_empty());
    for link in &record.links {
        let (from, to) = (node_ttl(&link.from), node_ttl(&link.to));
        assert_eq!(
            from.map(|t| t + 1),
            to,
            "link {} -> {} skips or reverses",
            link.from,
            link.to
        );
    }
    mda.stop().await;
}

/// Reports 20 closes to lab destinations 1..=20 (ids `<tag>_1_<n>`), waits for 20 traces by
/// `backend`, checks the accounting, and returns the record for destination 7 and its lines.
async fn twenty_closes(
    s: &mut common::server::TestServer,
    lab: &Lab,
    backend: &str,
    tag: &str,
) -> (proto::TraceRecord, Vec<serde_json::Value>) {
    let burst: Vec<_> = (1..=20u8)
        .map(|i| event(&format!("{tag}_1_{i:016X}"), &lab.dst_v4(i).to_string()))
        .collect();
    s.client
        .report_closes(futures::stream::iter(burst))
        .await
        .expect("reported");
    let status = s.wait_status(LIMIT, |st| outcomes(st).traced == 20).await;
    assert_eq!(status.backend, backend);
    assert_accounted(&status);
    let record = s.get(&format!("{tag}_1_0000000000000007")).await;
    let parsed = lines(&record.contents);
    (record, parsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_daemon_backend_serves_the_same_pipeline() {
    if !require_root("the_shared_daemon_backend_serves_the_same_pipeline") {
        return;
    }
    let lab = Lab::up();
    let (mut s, _tools) = lab_server(&lab, &["--backend", "scamper-daemon"]).await;
    let (record, parsed) = twenty_closes(&mut s, &lab, "scamper-daemon", "dmn").await;
    // The daemon's own cycle lines, one pair per trace session.
    assert_eq!(parsed[1]["type"], "cycle-start");
    assert!(
        parsed[1]["list_name"]
            .as_str()
            .is_some_and(|n| n.contains(".sock:")),
        "{}",
        parsed[1]
    );
    assert_eq!(parsed[3]["type"], "cycle-stop");
    assert_eq!(parsed[2]["dst"], lab.dst_v4(7).to_string());
    assert_hops_match_the_lab(&record, &lab.hops_v4(), lab.dst_v4(7));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_backend_serves_the_same_pipeline() {
    if !require_root("the_engine_backend_serves_the_same_pipeline") {
        return;
    }
    let lab = Lab::up();
    // --netns names the lab's client namespace: the engine opens its sockets there (checked)
    // while the server stays in the test's namespace.
    let (mut s, _tools) = lab_server(&lab, &["--backend", "engine"]).await;
    let (record, parsed) = twenty_closes(&mut s, &lab, "engine", "eng").await;
    assert_eq!(parsed[1]["type"], "cycle-start");
    assert_eq!(parsed[1]["list_name"], "default");
    assert!(
        parsed[1]["hostname"]
            .as_str()
            .is_some_and(|h| !h.is_empty())
    );
    assert_eq!(parsed[2]["type"], "trace");
    assert_eq!(parsed[2]["method"], "udp-paris");
    assert_eq!(parsed[2]["dst"], lab.dst_v4(7).to_string());
    assert_eq!(parsed[3]["type"], "cycle-stop");
    assert_hops_match_the_lab(&record, &lab.hops_v4(), lab.dst_v4(7));

    let dst6 = lab.dst_v6(9);
    let record = s
        .trace(&dst6.to_string(), false)
        .await
        .expect("on-demand v6");
    assert_eq!(record.backend, "engine");
    assert_hops_match_the_lab(&record, &lab.hops_v6(), dst6);
    s.stop().await;
}
