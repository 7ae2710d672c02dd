//! The network-namespace lab for integration tests (built by `scripts/lab`, see its header for
//! the full topology).
//!
//! ```text
//! client --- r1 --- r2 ==< r3a >== r4 --- dst     destinations 10.77.100.0/24, fd77:100::/64
//!                      ==< r3b >==   \
//!                                     r5 --- r6 --- far    10.77.200.0/24, fd77:200::/64
//! ```
//!
//! Every probe a test sends must leave from [`Lab::client_ns`]: the machine has a default route
//! to the outside world, so a probe sent from the root namespace to a lab address would leave the
//! machine. Assert it with [`Lab::ns_id`] / [`ns_id_of_pid`] before the first packet.
//!
//! Cleanup: each [`Lab`] gets a per-run prefix and its namespaces are removed by `Drop`, which
//! runs on a normal return and on a panic (unwinding). For the exits that skip destructors
//! (SIGKILL, Ctrl-C / SIGINT, SIGTERM, `std::process::exit`, `panic = "abort"`), each lab also
//! has a small guard process in its own process group, blocked reading a pipe from the test
//! process: when the test process dies the pipe closes and the guard removes the lab. If even
//! that was killed (e.g. `kill -9` of the guard too), `scripts/lab down PREFIX` cleans up by
//! hand (`ip netns list` shows the prefix: the namespaces are `PREFIX-client`, `PREFIX-r1`...).
// Every test binary compiles this module (`mod common;`) but uses only part of it.
#![allow(dead_code)]

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `scripts/lab` of this repository; `HOPTRACE_LAB_SCRIPT` overrides it.
const DEFAULT_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lab");
/// Bounds on the script: `up` takes well under a second.
const UP_TIMEOUT: Duration = Duration::from_secs(60);
const DOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Labs built by this process, to make prefixes unique within it.
static LABS_BUILT: AtomicU32 = AtomicU32::new(0);

fn script() -> String {
    std::env::var("HOPTRACE_LAB_SCRIPT").unwrap_or_else(|_| DEFAULT_SCRIPT.to_string())
}

/// True when tests that need root can run. When not root: panics if the env var `CI` is set
/// (CI must run every test), else prints a skip reason to stderr and returns false.
pub fn require_root(test: &str) -> bool {
    if effective_uid() == Some(0) {
        return true;
    }
    let reason = format!("needs root: {test} builds network namespaces");
    if std::env::var_os("CI").is_some() {
        panic!("{reason} (CI is set, so it may not be skipped)");
    }
    eprintln!("skipping {test}: {reason}");
    false
}

/// The effective uid, from `/proc/self/status` (std has no `geteuid`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // "Uid:\treal\teffective\tsaved\tfs"
    line.split_whitespace().nth(2)?.parse().ok()
}

/// (st_dev, st_ino) of the network namespace of process `pid` (`/proc/PID/ns/net`).
pub fn ns_id_of_pid(pid: u32) -> (u64, u64) {
    ns_id_of_path(&format!("/proc/{pid}/ns/net"))
}

fn ns_id_of_path(path: &str) -> (u64, u64) {
    match std::fs::metadata(path) {
        Ok(m) => (m.dev(), m.ino()),
        Err(e) => panic!("cannot stat {path}: {e}"),
    }
}

/// `n` in base 36, zero-padded to `width` digits (`n` must fit).
fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).expect("ascii")
}

/// "ht" + 5 base-36 digits of the pid (pid_max is at most 2^22 < 36^5) + 2 of a process-wide
/// counter + 3 of the clock's nanoseconds: 12 characters of [a-z0-9]. Concurrent test processes
/// differ by pid, labs of one process by the counter, and the clock keeps a reused pid from
/// meeting a lab left behind by a killed run.
fn unique_prefix() -> String {
    let pid = u64::from(std::process::id()) % 36u64.pow(5);
    let count = u64::from(LABS_BUILT.fetch_add(1, Ordering::Relaxed)) % 36u64.pow(2);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0)
        % 36u64.pow(3);
    format!(
        "ht{}{}{}",
        base36(pid, 5),
        base36(count, 2),
        base36(nanos, 3)
    )
}

/// Runs `scripts/lab ARGS`, killed after `timeout`. Ok(stdout) on success, Err(description).
fn run_script(args: &[&str], timeout: Duration) -> Result<String, String> {
    let script = script();
    let what = format!("{script} {}", args.join(" "));
    let mut child = Command::new(&script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    // Read both pipes on threads so a chatty script cannot block while we wait on it.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{what}: no exit after {timeout:?}, killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("{what}: wait failed: {e}")),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Ok(s) if s.success() => Ok(stdout),
        Ok(s) => Err(format!("{what} failed ({s}):\n{stderr}{stdout}")),
        Err(e) => Err(format!("{e}\n{stderr}{stdout}")),
    }
}

/// Starts the guard that removes the lab if this process dies without running `Drop`. It
/// blocks reading its stdin, a pipe whose only writer is this process (std opens pipes
/// close-on-exec, so no other child holds it): EOF means this process is gone. It lives in its
/// own process group and ignores INT/TERM/HUP, so a Ctrl-C that kills the test does not kill it.
/// The second `down` catches an `up` that was still running when the test process died.
fn spawn_guard(prefix: &str) -> Option<Child> {
    let guard = r#"trap '' INT TERM HUP
read -r _
"$0" down "$1"
sleep 2
exec "$0" down "$1""#;
    Command::new("sh")
        .args(["-c", guard, &script(), prefix])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| eprintln!("warning: no cleanup guard for lab {prefix}: {e}"))
        .ok()
}

/// A running lab; dropping it removes its namespaces.
pub struct Lab {
    prefix: String,
    guard: Option<Child>,
}

impl Lab {
    /// Builds the lab with ICMP rate limits off in every router and in the destination.
    /// Panics with the script's stderr if it fails.
    pub fn up() -> Lab {
        Lab::build(false)
    }

    /// Builds the lab keeping the kernel's default ICMP rate limits (one Time Exceeded per
    /// second per peer after a burst of 6 for IPv4, one per 100 ms for IPv6).
    pub fn up_with_ratelimit() -> Lab {
        Lab::build(true)
    }

    fn build(ratelimit: bool) -> Lab {
        let prefix = unique_prefix();
        // From here on Drop removes whatever exists, even if `up` fails or we panic below.
        let lab = Lab {
            guard: spawn_guard(&prefix),
            prefix,
        };
        let mut args = vec!["up", lab.prefix.as_str()];
        if ratelimit {
            args.push("--ratelimit");
        }
        if let Err(e) = run_script(&args, UP_TIMEOUT) {
            panic!("cannot build the lab: {e}");
        }
        // The namespace exists and is not ours: probes started there stay in the lab.
        assert_ne!(
            Lab::ns_id(&lab.client_ns()),
            ns_id_of_pid(std::process::id()),
            "lab client namespace is the test's own namespace"
        );
        lab
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace probes must leave from: `<prefix>-client`.
    pub fn client_ns(&self) -> String {
        self.ns("client")
    }

    /// The namespace of a lab node: "client", "r1", "r2", "r3a", "r3b", "r4", "dst", "r5", "r6"
    /// or "far" (in it, the veth towards node Y is named `to-Y`, e.g. `to-r2` in r3b).
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Loads nftables `rules` (an `nft -f` script) in lab node `node`'s namespace; they go
    /// with the namespace.
    pub fn nft(&self, node: &str, rules: &str) {
        let ns = self.ns(node);
        let mut nft = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft in the lab");
        {
            use std::io::Write;
            let mut stdin = nft.stdin.take().expect("nft stdin");
            stdin.write_all(rules.as_bytes()).expect("write the rules");
        }
        assert!(nft.wait().expect("nft").success(), "nft rules in {ns}");
    }

    /// Destination `n` (1..=254) inside the lab: 10.77.100.n.
    pub fn dst_v4(&self, n: u8) -> IpAddr {
        assert!((1..=254).contains(&n), "lab destination {n} not in 1..=254");
        IpAddr::V4(Ipv4Addr::new(10, 77, 100, n))
    }

    /// Destination fd77:100::n (n in 1..=255, i.e. fd77:100::1 to fd77:100::ff). The whole /64
    /// is local on dst, but only these are assigned addresses: for any other the kernel sends
    /// ICMPv6 errors (port unreachable) from fd77:5::1 rather than from the probed address.
    pub fn dst_v6(&self, n: u16) -> IpAddr {
        assert!((1..=255).contains(&n), "lab destination {n} not in 1..=255");
        IpAddr::V6(Ipv6Addr::new(0xfd77, 0x100, 0, 0, 0, 0, 0, n))
    }

    /// The hops (TTL 1..=4) a trace to any destination sees, with the alternatives per TTL:
    /// r1, r2, then r3a or r3b (ECMP on the 5-tuple; ICMP echo always takes one branch), then
    /// r4, which answers as 10.77.5.2 whichever branch the probe came through. The destination
    /// itself answers at TTL 5.
    pub fn hops_v4(&self) -> Vec<Vec<IpAddr>> {
        let v4 = |c: u8| IpAddr::V4(Ipv4Addr::new(10, 77, c, 2));
        vec![vec![v4(1)], vec![v4(2)], vec![v4(3), v4(4)], vec![v4(5)]]
    }

    /// The IPv6 twin of [`Lab::hops_v4`]: fd77:1::2, fd77:2::2, {fd77:3::2 | fd77:4::2},
    /// fd77:5::2.
    pub fn hops_v6(&self) -> Vec<Vec<IpAddr>> {
        let v6 = |c: u16| IpAddr::V6(Ipv6Addr::new(0xfd77, c, 0, 0, 0, 0, 0, 2));
        vec![vec![v6(1)], vec![v6(2)], vec![v6(3), v6(4)], vec![v6(5)]]
    }

    /// Far destination `n` (1..=254), seven hops away (behind r4, r5 and r6): 10.77.200.n.
    pub fn far_v4(&self, n: u8) -> IpAddr {
        assert!(
            (1..=254).contains(&n),
            "lab far destination {n} not in 1..=254"
        );
        IpAddr::V4(Ipv4Addr::new(10, 77, 200, n))
    }

    /// The hops (TTL 1..=6) a trace to a far destination sees: those of [`Lab::hops_v4`], then
    /// r5 (10.77.8.2) and r6 (10.77.9.2). The far destination answers at TTL 7.
    pub fn far_hops_v4(&self) -> Vec<Vec<IpAddr>> {
        let mut hops = self.hops_v4();
        hops.extend([8, 9].map(|c| vec![IpAddr::V4(Ipv4Addr::new(10, 77, c, 2))]));
        hops
    }

    /// The IPv6 twin of [`Lab::far_v4`]: fd77:200::n (n in 1..=255, the assigned addresses as
    /// for [`Lab::dst_v6`]).
    pub fn far_v6(&self, n: u16) -> IpAddr {
        assert!(
            (1..=255).contains(&n),
            "lab far destination {n} not in 1..=255"
        );
        IpAddr::V6(Ipv6Addr::new(0xfd77, 0x200, 0, 0, 0, 0, 0, n))
    }

    /// The IPv6 twin of [`Lab::far_hops_v4`]: then fd77:8::2 (r5) and fd77:9::2 (r6).
    pub fn far_hops_v6(&self) -> Vec<Vec<IpAddr>> {
        let mut hops = self.hops_v6();
        hops.extend([8, 9].map(|c| vec![IpAddr::V6(Ipv6Addr::new(0xfd77, c, 0, 0, 0, 0, 0, 2))]));
        hops
    }

    /// (st_dev, st_ino) of `/run/netns/<name>`, for asserting a process or socket is inside the
    /// lab (compare with [`ns_id_of_pid`], not with pid 1).
    pub fn ns_id(name: &str) -> (u64, u64) {
        ns_id_of_path(&format!("/run/netns/{name}"))
    }
}

impl Drop for Lab {
    /// Removes the lab. Never panics (a panic while unwinding would abort): failures are
    /// printed as warnings.
    fn drop(&mut self) {
        // Stop the guard first so it does not race this removal.
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.kill();
            let _ = guard.wait();
        }
        if let Err(e) = run_script(&["down", &self.prefix], DOWN_TIMEOUT) {
            eprintln!(
                "warning: lab {} not removed: {e}\nremove it by hand: {} down {}",
                self.prefix,
                script(),
                self.prefix
            );
        }
    }
}

/// An address family of the lab, and where its addresses are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The client's address on its link to r1 (`scripts/lab`).
    pub fn client(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 77, 1, 1).into(),
            Family::V6 => Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1).into(),
        }
    }

    /// Destination `n` of the network 5 hops away.
    pub fn dst(self, lab: &Lab, n: u8) -> IpAddr {
        match self {
            Family::V4 => lab.dst_v4(n),
            Family::V6 => lab.dst_v6(n.into()),
        }
    }

    /// The routers at each TTL of the path to [`dst`](Self::dst).
    pub fn hops(self, lab: &Lab) -> Vec<Vec<IpAddr>> {
        match self {
            Family::V4 => lab.hops_v4(),
            Family::V6 => lab.hops_v6(),
        }
    }
}
