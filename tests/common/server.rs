//! An in-process hoptrace server on 127.0.0.1:0, configured through the real command line.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use hoptrace::{
    cli::{Cli, Command},
    proto::{self, hoptrace_client::HoptraceClient},
    server::{self, Running},
};
use tonic::transport::Channel;

pub struct TestServer {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub client: HoptraceClient<Channel>,
}

/// `serve` flags every test server gets; `extra` adds to or overrides them.
pub async fn start(extra: &[&str]) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    start_in(dir, extra).await
}

pub async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> TestServer {
    let out = dir.path().join("out");
    let out = out.to_str().expect("utf-8 path").to_owned();
    let mut argv = vec![
        "hoptrace",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--output-dir",
        &out,
        "--log",
        "warn",
    ];
    // The host watcher is on by default; here it would watch the test machine's own
    // namespace, so only tests about it turn it on.
    if !extra.contains(&"--watch-host-sockets") {
        argv.extend_from_slice(&["--watch-host-sockets", "false"]);
    }
    // The default backend (auto) would open the engine's raw sockets in this process's own
    // namespace, from where probes leave the machine: tests name the backend, scamper
    // (fake, or guarded inside the lab) unless they ask for another.
    if !extra.contains(&"--backend") {
        argv.extend_from_slice(&["--backend", "scamper"]);
    }
    argv.extend_from_slice(extra);
    let Command::Serve(args) = Cli::try_parse_from(argv).expect("flags parse").command else {
        unreachable!("serve parses to Serve")
    };
    let running = server::start(*args).await.expect("server starts");
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .expect("url")
        .connect()
        .await
        .expect("connects");
    TestServer {
        running,
        dir,
        client: HoptraceClient::new(channel).max_decoding_message_size(96 << 20),
    }
}

impl TestServer {
    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Every file under the output root, relative paths, sorted.
    pub fn files(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let rel = path.strip_prefix(root).expect("under root");
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.out(), &self.out(), &mut files);
        files.sort();
        files
    }

    pub async fn status(&mut self) -> proto::StatusResponse {
        self.client
            .status(proto::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    /// Polls status until `done` holds (every 20 ms, at most `limit`); panics with the last
    /// status otherwise.
    pub async fn wait_status(
        &mut self,
        limit: Duration,
        done: impl Fn(&proto::StatusResponse) -> bool,
    ) -> proto::StatusResponse {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached within {limit:?}; last status: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The stored record for a connection id.
    pub async fn get(&mut self, id: &str) -> proto::TraceRecord {
        self.client
            .get_trace(proto::GetTraceRequest {
                connection_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{id} not stored: {e}"))
            .into_inner()
    }

    /// An on-demand trace of `address`.
    pub async fn trace(
        &mut self,
        address: &str,
        allow_cached: bool,
    ) -> Result<proto::TraceRecord, tonic::Status> {
        self.client
            .trace(proto::TraceRequest {
                address: address.into(),
                connection_id: String::new(),
                allow_cached,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.running.shutdown().await;
        self.dir
    }
}

/// A close event from the lab client (10.77.1.1:443 or fd77:1::1) to `remote`.
pub fn event(id: &str, remote: &str) -> proto::CloseEvent {
    let remote: std::net::IpAddr = remote.parse().expect("remote parses");
    let v4 = remote.to_canonical().is_ipv4();
    proto::CloseEvent {
        connection_id: id.to_owned(),
        local_addr: if v4 { "10.77.1.1" } else { "fd77:1::1" }.to_owned(),
        local_port: 443,
        remote_addr: remote.to_string(),
        remote_port: 40000,
        close_time: None,
        labels: Default::default(),
    }
}

/// The outcome counters of a status.
pub fn outcomes(s: &proto::StatusResponse) -> proto::Outcomes {
    s.outcomes.expect("outcomes")
}

/// Every accepted event is in exactly one terminal state (or still pending).
pub fn assert_accounted(s: &proto::StatusResponse) {
    let o = outcomes(s);
    assert_eq!(
        o.accepted,
        o.traced + o.cached + o.refused + o.failed + o.aborted + o.pending,
        "{o:?}"
    );
}

/// A fake scamper from `tests/fixtures/fake-scamper`, linked into `dir` (it keeps its files
/// beside the path it is run by, `"$0.expect"` and the like); returns the link's path.
///
/// A link, not a copy: a file just written cannot be executed while another test thread's
/// fork still holds the writing descriptor (`ETXTBSY`, "Text file busy"), which made tests
/// running side by side fail now and then.
pub fn fake_scamper(name: &str, dir: &Path) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fake-scamper")
        .join(name);
    let dst = dir.join(name);
    if name == "replay" {
        // It finds the recorded trace relative to the repository, so it runs in place.
        return src.to_str().expect("utf-8").to_owned();
    }
    std::os::unix::fs::symlink(&src, &dst).expect("link fake scamper");
    dst.to_str().expect("utf-8").to_owned()
}

/// A `lab-guard` wrapper around scamper (it refuses to run outside `lab`'s client namespace),
/// placed in `dir`; returns its path.
pub fn lab_guarded_scamper(lab: &super::lab::Lab, dir: &Path) -> String {
    let guard = fake_scamper("lab-guard", dir);
    let (dev, ino) = super::lab::Lab::ns_id(&lab.client_ns());
    assert_ne!(
        super::lab::ns_id_of_pid(std::process::id()),
        (dev, ino),
        "the lab namespace must not be the test's own"
    );
    std::fs::write(format!("{guard}.expect"), format!("{dev} {ino}")).expect("write expect");
    guard
}

/// A server whose probes leave from the lab's client namespace. scamper runs through
/// `lab-guard`, which refuses to start it anywhere else: the assertion stands in the probing
/// path itself, before any packet.
pub async fn lab_server(lab: &super::lab::Lab, extra: &[&str]) -> (TestServer, tempfile::TempDir) {
    let tools = tempfile::tempdir().expect("tempdir");
    let guard = lab_guarded_scamper(lab, tools.path());
    let ns = lab.client_ns();
    let mut flags = vec![
        "--netns",
        ns.as_str(),
        "--allow-private",
        "--scamper-bin",
        guard.as_str(),
        "--scamper-pps",
        "200",
        "--probe-wait",
        "1s",
        "--max-ttl",
        "8",
        // Fixed flows: with the lab's fixed ECMP seed every run takes the same paths.
        "--source-port",
        "40000",
    ];
    flags.extend_from_slice(extra);
    (start(&flags).await, tools)
}
