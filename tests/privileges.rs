//! The `hoptrace` binary drops every capability once the engine's sockets are open: read from
//! `/proc` for the process and each of its threads, with a trace through the lab proving the
//! dropped process still works. With a scamper backend nothing is dropped (it starts scamper
//! inside `--netns` for every trace). Needs root (namespaces); fails in CI when it cannot run.

mod common;

use std::{net::IpAddr, process::Stdio, time::Duration};

use common::lab::{Lab, require_root};
use hoptrace::proto::{self, hoptrace_client::HoptraceClient};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStderr, Command},
};

/// How long the server may take to start, trace or stop.
const LIMIT: Duration = Duration::from_secs(30);
/// `CAP_SYS_ADMIN`, which joining `--netns` needs.
const CAP_SYS_ADMIN: u64 = 1 << 21;

/// The real binary, serving with probes inside the lab's client namespace.
struct Served {
    child: Child,
    /// Its log lines, up to "hoptrace serving".
    log: Vec<String>,
    stderr: Lines<BufReader<ChildStderr>>,
    grpc: String,
    _dir: tempfile::TempDir,
}

async fn serve(lab: &Lab, backend: &str) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let ns = lab.client_ns();
    let mut command = Command::new(env!("CARGO_BIN_EXE_hoptrace"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOPTRACE_") {
            command.env_remove(key);
        }
    }
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--output-dir")
        .arg(&out)
        .args(["--netns", &ns, "--backend", backend, "--allow-private"])
        .args(["--max-ttl", "8", "--probe-wait", "1s", "--log", "info"])
        .args(["--log-format", "json"])
        // One tokio worker (`--worker-threads`): the service runs and traces with it.
        .args(["--worker-threads", "1"])
        // The host watcher stays on: opened inside the lab before the drop, it must still work.
        .args(["--scamper-bin", "/nonexistent/scamper"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("hoptrace starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut log = Vec::new();
    let grpc = tokio::time::timeout(LIMIT, async {
        while let Some(line) = stderr.next_line().await.expect("reads stderr") {
            log.push(line.clone());
            let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if json["fields"]["message"] == "hoptrace serving" {
                let addr = json["fields"]["grpc_addr"]
                    .as_str()
                    .expect("grpc_addr logged");
                return addr.to_owned();
            }
        }
        panic!("hoptrace exited before serving: {log:#?}")
    })
    .await
    .unwrap_or_else(|_| panic!("not serving within {LIMIT:?}"));
    Served {
        child,
        log,
        stderr,
        grpc: format!("http://{grpc}"),
        _dir: dir,
    }
}

impl Served {
    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.iter().any(|l| l.contains(needle))
    }

    /// `(name, Cap* and NoNewPrivs fields)` of the process and of every thread.
    fn statuses(&self) -> Vec<(String, Vec<(String, u64)>)> {
        let pid = self.pid();
        let mut paths = vec![format!("/proc/{pid}/status")];
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
            let task = task.expect("task").path();
            paths.push(task.join("status").to_string_lossy().into_owned());
        }
        paths
            .into_iter()
            .enumerate()
            .filter_map(|(i, path)| {
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    // A thread (tokio's blocking pool) that exited since the
                    // listing holds no capability any more; the process must not.
                    Err(e)
                        if i > 0
                            && (e.kind() == std::io::ErrorKind::NotFound
                                || e.raw_os_error() == Some(nix::libc::ESRCH)) =>
                    {
                        return None;
                    }
                    Err(e) => panic!("{path}: {e}"),
                };
                let fields = text
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(k, _)| k.starts_with("Cap") || *k == "NoNewPrivs")
                    .map(|(k, v)| {
                        let v = u64::from_str_radix(v.trim(), 16).expect("hex");
                        (k.to_owned(), v)
                    })
                    .collect();
                Some((path, fields))
            })
            .collect()
    }

    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        // Drain the log so a full pipe never blocks the shutdown.
        let drain = async { while let Ok(Some(_)) = self.stderr.next_line().await {} };
        let (status, ()) =
            tokio::time::timeout(LIMIT, async { tokio::join!(self.child.wait(), drain) })
                .await
                .expect("stops within the limit");
        assert!(status.expect("waits").success());
    }
}

/// One field of [`Served::statuses`].
fn field(fields: &[(String, u64)], name: &str) -> u64 {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in {fields:?}"))
        .1
}

/// A lab and the binary serving in it with `backend`, having logged `says`; `None` when the
/// test cannot run (not root).
async fn served_in_lab(test: &str, backend: &str, says: &str) -> Option<(Lab, Served)> {
    if !require_root(test) {
        return None;
    }
    let lab = Lab::up();
    let served = serve(&lab, backend).await;
    assert!(served.logged(says), "{:#?}", served.log);
    Some((lab, served))
}

#[tokio::test]
async fn with_the_engine_no_thread_keeps_a_capability_and_traces_still_run() {
    let test = "with_the_engine_no_thread_keeps_a_capability_and_traces_still_run";
    let Some((lab, served)) = served_in_lab(test, "engine", "capabilities dropped").await else {
        return;
    };
    assert!(!served.logged("not watching"), "{:#?}", served.log);

    let statuses = served.statuses();
    // The runtime's workers and the engine's receivers exist: the drop covered them all.
    assert!(statuses.len() > 3, "{statuses:#?}");
    for (path, fields) in &statuses {
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(fields, set), 0, "{path}: {set} {fields:?}");
        }
        assert_eq!(field(fields, "NoNewPrivs"), 1, "{path}");
    }

    let mut client = HoptraceClient::connect(served.grpc.clone())
        .await
        .expect("connects");
    let dst = lab.dst_v4(9);
    let record = tokio::time::timeout(
        LIMIT,
        client.trace(proto::TraceRequest {
            address: dst.to_string(),
            connection_id: String::new(),
            allow_cached: false,
        }),
    )
    .await
    .expect("traced within the limit")
    .expect("traced")
    .into_inner();
    assert_eq!(record.backend, "engine");
    let truth = lab.hops_v4();
    let seen: Vec<(u32, IpAddr)> = record
        .hops
        .iter()
        .map(|h| (h.ttl, h.address.parse().expect("hop address")))
        .collect();
    let expected = truth.len() + 1;
    assert_eq!(seen.len(), expected, "one reply per TTL: {seen:?}");
    for (i, (ttl, addr)) in seen.iter().enumerate() {
        assert_eq!(*ttl as usize, i + 1, "{seen:?}");
        let ok = truth.get(i).map_or(*addr == dst, |hop| hop.contains(addr));
        assert!(ok, "ttl {ttl}: {addr} is not the lab's");
    }

    // The client namespace's own address is refused: after the drop, the thread that stayed
    // in the namespace read its addresses.
    let own = client
        .trace(proto::TraceRequest {
            address: "10.77.1.1".into(),
            connection_id: String::new(),
            allow_cached: false,
        })
        .await
        .expect_err("own address refused");
    assert_eq!(own.code(), tonic::Code::FailedPrecondition, "{own:?}");
    assert!(own.message().contains("own"), "{own:?}");
    served.stop().await;
}

#[tokio::test]
async fn with_scamper_the_capabilities_are_kept_for_joining_the_namespace() {
    let test = "with_scamper_the_capabilities_are_kept_for_joining_the_namespace";
    let Some((_lab, served)) = served_in_lab(test, "scamper", "capabilities kept").await else {
        return;
    };
    let (path, fields) = &served.statuses()[0];
    assert_ne!(
        field(fields, "CapEff") & CAP_SYS_ADMIN,
        0,
        "{path}: {fields:?}"
    );
    served.stop().await;
}
