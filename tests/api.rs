//! The gRPC API and the service's failure paths, without sending a probe: malformed and refused
//! events, health and reflection, oversized messages, a full disk, and a bad configuration. Real traces in a namespace lab are in `lab_traces.rs`.

mod common;

use std::process::Command as Process;

use common::{
    lab::require_root,
    server::{self, assert_accounted, event, fake_scamper, outcomes},
};
use hoptrace::proto::{self, Disposition};
use tonic::Code;

#[tokio::test]
async fn malformed_and_refused_events_get_clear_statuses_and_no_file() {
    // No trace may run in this test: a scamper that cannot start would fail it loudly.
    let mut s = server::start(&["--scamper-bin", "/nonexistent/scamper"]).await;
    let cases: Vec<(proto::CloseEvent, Code, &str)> = vec![
        (
            event("../../etc/x", "8.8.8.8"),
            Code::InvalidArgument,
            "connection id",
        ),
        (event("", "8.8.8.8"), Code::InvalidArgument, "empty"),
        (
            proto::CloseEvent {
                remote_addr: "not-an-address".into(),
                ..event("a_1_1", "8.8.8.8")
            },
            Code::InvalidArgument,
            "remote_addr",
        ),
        (
            proto::CloseEvent {
                remote_port: 70000,
                ..event("a_1_2", "8.8.8.8")
            },
            Code::InvalidArgument,
            "remote_port",
        ),
        (
            event("a_1_3", "127.0.0.1"),
            Code::FailedPrecondition,
            "loopback",
        ),
        (event("a_1_4", "::1"), Code::FailedPrecondition, "loopback"),
        (
            event("a_1_5", "10.1.2.3"),
            Code::FailedPrecondition,
            "private",
        ),
        (
            event("a_1_6", "192.0.2.1"),
            Code::FailedPrecondition,
            "documentation",
        ),
        (
            event("a_1_7", "::ffff:169.254.0.9"),
            Code::FailedPrecondition,
            "link-local",
        ),
        (
            event("a_1_8", "fe80::1"),
            Code::FailedPrecondition,
            "link-local",
        ),
        (
            event("a_1_9", "224.0.0.1"),
            Code::FailedPrecondition,
            "multicast",
        ),
    ];
    for (ev, code, needle) in cases {
        let id = ev.connection_id.clone();
        let err = s.client.report_close(ev).await.expect_err("refused");
        assert_eq!(err.code(), code, "{id}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{id}: {:?} lacks {needle:?}",
            err.message()
        );
    }

    // The streaming call never ends on a bad event: it counts and lists them.
    let events = vec![
        event("b_1_1", "127.0.0.2"),
        event("b/1/2", "8.8.8.8"),
        event("b_1_3", "100.64.1.1"),
    ];
    let summary = s
        .client
        .report_closes(futures::stream::iter(events))
        .await
        .expect("stream summary")
        .into_inner();
    assert_eq!(summary.received, 3);
    assert_eq!(summary.dispositions.get("REFUSED"), Some(&2));
    assert_eq!(summary.dispositions.get("INVALID"), Some(&1));
    let listed: Vec<u64> = summary.rejections.iter().map(|r| r.index).collect();
    assert_eq!(listed, [0, 1, 2]);
    assert_eq!(
        summary.rejections[1].disposition,
        Disposition::Invalid as i32
    );

    let status = s.status().await;
    let o = outcomes(&status);
    assert_eq!((o.accepted, o.refused, o.invalid), (9, 9, 5), "{o:?}");
    assert_eq!(status.refused_by_reason.get("loopback"), Some(&3));
    assert_eq!(status.refused_by_reason.get("shared_cgnat"), Some(&1));
    assert_eq!(status.events_by_source.get("grpc_stream"), Some(&2));
    assert_accounted(&status);
    let metrics = reqwest_metrics(s.running.admin_addr).await;
    assert!(
        metrics.contains("hoptrace_refusals_total{reason=\"loopback\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hoptrace_events_invalid_total{reason=\"connection_id\"} 3"),
        "{metrics}"
    );

    let files = s.files();
    assert!(files.iter().all(|f| !f.ends_with(".jsonl")), "{files:?}");
    s.stop().await;
}

/// GET /metrics from the admin server with a bare HTTP/1.0 request.
async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connects");
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut body = String::new();
    conn.read_to_string(&mut body).await.expect("read");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body
}

#[tokio::test]
async fn health_and_both_reflection_versions_answer() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let s = server::start(&[]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", s.running.grpc_addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    for service in ["", "hoptrace.v1.Hoptrace"] {
        let reply = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{service:?}");
    }

    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("v1 reflection")
            .into_inner();
        let reply = replies.message().await.expect("reply").expect("one reply");
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reply {reply:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"hoptrace.v1.Hoptrace".to_owned()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_owned()),
            "{names:?}"
        );
    }
    {
        // grpcurl 1.8 speaks only v1alpha.
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "hoptrace.v1.Hoptrace".into(),
            )),
        };
        let mut replies = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("v1alpha reflection")
            .into_inner();
        let reply = replies.message().await.expect("reply").expect("one reply");
        let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
            panic!("unexpected reply {reply:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    s.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_keeps_serving() {
    let mut s = server::start(&["--max-request-bytes", "4096"]).await;
    let mut big = event("c_1_1", "8.8.8.8");
    big.labels.insert("blob".into(), "x".repeat(10_000));
    let err = s.client.report_close(big).await.expect_err("too large");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{:?}: {}",
        err.code(),
        err.message()
    );
    // Labels within the message limit but over the per-event bound are invalid, not fatal.
    let mut many = event("c_1_2", "127.0.0.1");
    many.labels = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let err = s
        .client
        .report_close(many)
        .await
        .expect_err("too many labels");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(outcomes(&s.status().await).invalid, 1);
    s.stop().await;
}

/// A tmpfs mount that is unmounted when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Process::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_is_a_counted_error_that_leaves_no_partial_file() {
    if !require_root("a_full_disk_is_a_counted_error_that_leaves_no_partial_file") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let ok = Process::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "hoptrace-test"])
        .arg(&out)
        .status()
        .expect("mount runs");
    assert!(ok.success(), "mount tmpfs failed");
    let _mount = Mount(out.clone());
    let replay = fake_scamper("replay", dir.path());
    let mut s = server::start_in(dir, &["--scamper-bin", &replay, "--allow-private"]).await;

    // Fill the disk.
    let filler = out.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 64 * 1024]);
    let err = s
        .client
        .trace(proto::TraceRequest {
            address: "10.77.100.5".into(),
            connection_id: "full_1_0000000000000001".into(),
            ..Default::default()
        })
        .await
        .expect_err("disk full");
    assert_eq!(err.code(), Code::Internal, "{}", err.message());
    assert!(err.message().contains("No space left"), "{}", err.message());
    let status = s.status().await;
    assert_eq!(status.store_write_failures, 1);
    assert_eq!(status.failed_by_reason.get("write_failed"), Some(&1));
    let leftovers: Vec<_> = s.files().into_iter().filter(|f| f != "filler").collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");

    // Space comes back: the service kept running and writes again.
    std::fs::remove_file(&filler).expect("free space");
    let record = s
        .client
        .trace(proto::TraceRequest {
            address: "10.77.100.5".into(),
            connection_id: "full_1_0000000000000002".into(),
            ..Default::default()
        })
        .await
        .expect("written once there is room")
        .into_inner();
    assert!(
        record.path.ends_with("_full_1_0000000000000002.jsonl"),
        "{}",
        record.path
    );
    assert_accounted(&s.status().await);
    s.stop().await;
}

#[test]
fn a_bad_configuration_exits_64_before_binding() {
    // Hold a port: a configuration error must be reported, not a bind error.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").to_string();
    let held_admin = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = held_admin.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("out");
    let out_dir = out_dir.to_str().expect("utf-8");
    let cases: &[(&[&str], &str)] = &[
        (&["--probe-wait", "0s"], "--probe-wait"),
        (&["--probe-wait", "soon"], "--probe-wait"),
        (&["--netns", "hoptrace-no-such-namespace"], "--netns"),
        (&["--netns", "../etc"], "--netns"),
        (&["--method", "paris-sctp"], "unknown method"),
        (&["--deny", "10.0.0.0/33"], "--deny"),
        (&["--concurrency", "0"], "--concurrency"),
        (&["--trace-timeout", "25h"], "--trace-timeout"),
        (&["--probe-budget", "20001"], "--probe-budget"),
        (&["--worker-threads", "0"], "--worker-threads"),
        (&["--conn-id-pattern", "(unclosed"], "--conn-id-pattern"),
        (&["--listen", "nowhere"], "--listen"),
        (&["--bogus-flag"], "--bogus-flag"),
    ];
    for (flags, needle) in cases {
        let out = Process::new(env!("CARGO_BIN_EXE_hoptrace"))
            .arg("serve")
            .args([
                "--listen",
                &port,
                "--admin-listen",
                &admin,
                "--output-dir",
                out_dir,
            ])
            .args(*flags)
            .env_remove("HOPTRACE_NETNS")
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flags:?}: {stderr}");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
    }
    let help = Process::new(env!("CARGO_BIN_EXE_hoptrace"))
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("HOPTRACE_NETNS"));
}

/// scamper with no route to a destination prints only the cycle lines and says why on
/// stderr, exiting 0: the trace fails as `exited` with that reason, not as unreadable output.
#[tokio::test]
async fn a_destination_scamper_cannot_reach_fails_with_its_reason() {
    let tools = tempfile::tempdir().expect("tempdir");
    let unroutable = fake_scamper("unroutable", tools.path());
    let mut s = server::start(&["--scamper-bin", &unroutable, "--allow-private"]).await;
    let err = s
        .client
        .clone()
        .trace(proto::TraceRequest {
            address: "10.77.100.9".into(),
            ..Default::default()
        })
        .await
        .expect_err("no route");
    assert!(
        err.message().contains("Network is unreachable"),
        "{}",
        err.message()
    );
    let status = s.status().await;
    assert_eq!(
        status.failed_by_reason.get("exited"),
        Some(&1),
        "{status:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn shutdown_aborts_queued_and_running_traces_and_counts_them() {
    let tools = tempfile::tempdir().expect("tempdir");
    let hang = fake_scamper("hang", tools.path());
    let mut s = server::start(&[
        "--scamper-bin",
        &hang,
        "--trace-timeout",
        "60s",
        "--allow-private",
        "--concurrency",
        "1",
        "--shutdown-grace",
        "100ms",
    ])
    .await;
    for i in 1..=3 {
        let reply = s
            .client
            .report_close(event(&format!("e_1_{i}"), &format!("10.77.100.{i}")))
            .await
            .expect("accepted")
            .into_inner();
        assert_eq!(reply.disposition, Disposition::Scheduled as i32);
    }
    s.wait_status(std::time::Duration::from_secs(10), |st| {
        st.queue.is_some_and(|q| q.running == 1 && q.depth == 2)
    })
    .await;
    let pid =
        common::procs::read_pid_file(&format!("{hang}.pid"), std::time::Duration::from_secs(10))
            .await;
    let pipeline = std::sync::Arc::clone(&s.running.pipeline);
    let started = std::time::Instant::now();
    s.stop().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(pipeline.metrics().outcome("aborted"), 3);
    assert_eq!(pipeline.metrics().outcome("traced"), 0);
    assert_eq!(
        common::procs::live_in_group(pid),
        0,
        "the running scamper was stopped"
    );
}

/// A scamper in `dir` that takes 1 s, then prints a recorded trace; its path.
fn slow_scamper(dir: &std::path::Path) -> String {
    fake_scamper("slow", dir)
}

/// A trace that finishes during the shutdown grace is written, counted and streamed to the
/// subscribers before their streams end; a request that arrives during the grace is aborted
/// (not counted as a full queue).
#[tokio::test]
async fn records_of_the_shutdown_grace_reach_subscribers_before_streams_end() {
    let tools = tempfile::tempdir().expect("tempdir");
    let slow = slow_scamper(tools.path());
    let mut s = server::start(&[
        "--scamper-bin",
        &slow,
        "--allow-private",
        "--shutdown-grace",
        "10s",
    ])
    .await;
    let mut stream = s
        .client
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("subscribed")
        .into_inner();
    s.wait_status(std::time::Duration::from_secs(10), |st| st.subscribers == 1)
        .await;
    let reply = s
        .client
        .report_close(event("grace_1_1", "10.77.100.1"))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(reply.disposition, Disposition::Scheduled as i32);
    s.wait_status(std::time::Duration::from_secs(10), |st| {
        st.queue.is_some_and(|q| q.running == 1)
    })
    .await;
    let reader = tokio::spawn(async move {
        let mut records = Vec::new();
        while let Some(message) = stream.message().await.expect("the stream ends cleanly") {
            if let Some(proto::subscribe_response::Event::Record(r)) = message.event {
                records.push(r.uuid);
            }
        }
        records
    });
    let mut client = s.client.clone();
    let pipeline = std::sync::Arc::clone(&s.running.pipeline);
    let stopping = tokio::spawn(s.stop());
    // The stop has begun (the trace is still running): a new event is aborted.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let late = client
        .report_close(event("grace_1_2", "10.77.100.2"))
        .await
        .expect_err("aborted during shutdown");
    assert_eq!(late.code(), Code::Unavailable, "{late:?}");
    tokio::time::timeout(std::time::Duration::from_secs(15), stopping)
        .await
        .expect("stopped in time")
        .expect("stop task");
    let records = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
        .await
        .expect("the stream ended")
        .expect("reader task");
    assert_eq!(records, ["grace_1_1"]);
    assert_eq!(pipeline.metrics().outcome("traced"), 1);
    assert_eq!(pipeline.metrics().outcome("aborted"), 1);
    assert_eq!(pipeline.metrics().outcome("refused"), 0);
}

/// The cached copies of a trace's waiters are written and counted even when the shutdown
/// grace ends while they are being written: 1 s of tracing, then 5,000 copies (each a
/// durable file, about 0.7 s of writing against the 0.2 s left of the 1.2 s grace), and every
/// one of the 5,001 events ends traced or cached, with its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_trace_that_ends_in_the_grace_all_get_their_copies() {
    let tools = tempfile::tempdir().expect("tempdir");
    let slow = slow_scamper(tools.path());
    let s = server::start(&[
        "--scamper-bin",
        &slow,
        "--allow-private",
        "--shutdown-grace",
        "1200ms",
    ])
    .await;
    let waiters = 5000;
    let events = (0..=waiters).map(|i| event(&format!("wait_1_{i:016X}"), "10.77.100.1"));
    let started = std::time::Instant::now();
    s.client
        .clone()
        .report_closes(futures::stream::iter(events.collect::<Vec<_>>()))
        .await
        .expect("reported");
    let pipeline = std::sync::Arc::clone(&s.running.pipeline);
    let out = s.out();
    let dir = s.stop().await;
    let m = pipeline.metrics();
    eprintln!(
        "stopped after {:?}: traced {}, cached {}, aborted {}, failed {}",
        started.elapsed(),
        m.outcome("traced"),
        m.outcome("cached"),
        m.outcome("aborted"),
        m.outcome("failed")
    );
    assert_eq!(m.outcome("traced"), 1);
    assert_eq!(m.outcome("cached"), waiters);
    let files = walkdir_count(&out);
    assert_eq!(files, waiters as usize + 1, "one file per event");
    drop(dir);
}

/// Files under `dir`, recursively.
fn walkdir_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                walkdir_count(&path)
            } else {
                1
            }
        })
        .sum()
}

/// A message the server cannot read (here one over `--max-request-bytes`) ends an event
/// stream, but the events before it were accepted: the answer is still their summary, with the
/// break listed at its position.
#[tokio::test]
async fn an_unreadable_message_ends_the_stream_with_the_summary_so_far() {
    let s = server::start(&["--scamper-bin", "/nonexistent/scamper"]).await;
    let oversized = proto::CloseEvent {
        connection_id: "x".repeat(70_000),
        ..event("c_1_3", "127.0.0.2")
    };
    let events = vec![
        event("c_1_1", "127.0.0.2"),
        event("c_1_2", "127.0.0.3"),
        oversized,
        event("c_1_4", "127.0.0.4"),
    ];
    let summary = s
        .client
        .clone()
        .report_closes(futures::stream::iter(events))
        .await
        .expect("the summary of what was read")
        .into_inner();
    assert_eq!(summary.received, 2);
    assert_eq!(summary.dispositions.get("REFUSED"), Some(&2));
    let broke = summary.rejections.last().expect("the break is listed");
    assert_eq!(broke.index, 2);
    assert_eq!(broke.disposition, Disposition::Invalid as i32);
    assert!(broke.reason.contains("stream broke"), "{}", broke.reason);
    s.stop().await;
}

#[tokio::test]
async fn subscriptions_beyond_max_subscribers_are_refused() {
    let mut s = server::start(&[
        "--scamper-bin",
        "/nonexistent/scamper",
        "--max-subscribers",
        "1",
    ])
    .await;
    let first = s
        .client
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("the first is served");
    let second = s
        .client
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect_err("the second is refused");
    assert_eq!(second.code(), Code::ResourceExhausted, "{second:?}");
    assert!(second.message().contains("--max-subscribers"), "{second:?}");
    drop(first);
    s.stop().await;
}

#[tokio::test]
async fn the_cli_client_talks_to_a_server_and_ends_quietly_on_a_closed_pipe() {
    use std::process::Stdio;
    let s = server::start(&["--scamper-bin", "/nonexistent/scamper"]).await;
    let url = format!("http://{}", s.running.grpc_addr);
    let cli = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_hoptrace"));
        cmd.args(args)
            .args(["--server", &url])
            .env_remove("HOPTRACE_SERVER");
        cmd
    };

    let refused = cli(&[
        "report",
        "--id",
        "cli_1_1",
        "--local",
        "10.0.0.1:443",
        "--remote",
        "127.0.0.1:9",
    ])
    .output()
    .await
    .expect("runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("FailedPrecondition") && stderr.contains("loopback"),
        "{stderr}"
    );

    let status = cli(&["status"]).output().await.expect("runs");
    assert!(status.status.success());
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status is JSON");
    assert_eq!(json["outcomes"]["refused"], 1, "{json}");

    // `hoptrace status | head -0`: the reader is gone before anything is written.
    let mut child = cli(&["status"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    drop(child.stdout.take());
    let out = child.wait_with_output().await.expect("exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    s.stop().await;
}
