//! The privileged part of `hoptrace serve`'s start-up, and dropping every capability after it.
//!
//! The engine needs CAP_NET_RAW only to open its raw sockets, and `--netns` needs CAP_SYS_ADMIN
//! only to join the namespace. So the binary opens everything that needs either — the probe
//! namespace, the engine's sockets, the host-socket watcher's netlink socket — in its main
//! thread before any other thread exists, then drops every capability (effective, permitted,
//! inheritable, ambient, and the bounding set when it holds CAP_SETPCAP) and sets
//! `no_new_privs`. Capabilities belong to threads, and a thread inherits its creator's: dropping
//! them while the main thread is the only one, before the runtime starts, leaves none anywhere.
//!
//! One thing keeps needing the namespace after start-up: this host's own addresses there are
//! re-read every 30 s so they are never traced. A thread that joined the namespace while it
//! could, then dropped its own capabilities ([`NamespaceThread`]), does that work.
//!
//! The scamper backends start `scamper` inside `--netns` for every trace (or restart their
//! daemon there), which needs CAP_SYS_ADMIN at any time: with them nothing is dropped.

use std::{
    os::fd::AsFd,
    sync::{Arc, Mutex, mpsc},
};

use hoptrace_backends::{NetNs, engine::ProbeSockets};
use nix::libc;

use crate::{
    backend,
    config::{BackendKind, ServeArgs},
    sources::host_sockets::{DiagSocket, WatchError},
};

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// A syscall refused.
    #[error("cannot drop capabilities: {what}: {source}")]
    Syscall {
        /// The step.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Another thread exists, which would keep its capabilities.
    #[error("cannot drop capabilities: {0} threads are running (the drop must come first)")]
    Threads(usize),
    /// A capability set is not empty after the drop.
    #[error("capabilities left after dropping them: {0}")]
    Left(String),
    /// The namespace thread could not start.
    #[error("cannot start the thread that stays in --netns: {0}")]
    NamespaceThread(String),
}

fn syscall(what: &'static str) -> impl FnOnce(std::io::Error) -> PrivilegeError {
    move |source| PrivilegeError::Syscall { what, source }
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// `CAP_SETPCAP`, needed to empty the bounding set.
const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's effective, permitted and inheritable sets.
fn capget() -> std::io::Result<[u64; 3]> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 makes the kernel write exactly two `CapData`, which `data` holds; both
    // pointers are valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[1])) << 32 | u64::from(f(&data[0]));
    Ok([
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ])
}

/// Empties the calling thread's effective, permitted and inheritable sets.
fn capset_empty() -> std::io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: version 3 makes the kernel read exactly two `CapData` from `data`; both pointers
    // are valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> std::io::Result<libc::c_int> {
    // SAFETY: the options used here take integer arguments only and touch no memory of ours.
    let rc = unsafe { libc::prctl(option, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// The names of the capabilities in `set` (`cap_net_raw`, ...; numbers for unknown ones).
pub fn names(set: u64) -> Vec<String> {
    const NAMES: [&str; 41] = [
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "kill",
        "setgid",
        "setuid",
        "setpcap",
        "linux_immutable",
        "net_bind_service",
        "net_broadcast",
        "net_admin",
        "net_raw",
        "ipc_lock",
        "ipc_owner",
        "sys_module",
        "sys_rawio",
        "sys_chroot",
        "sys_ptrace",
        "sys_pacct",
        "sys_admin",
        "sys_boot",
        "sys_nice",
        "sys_resource",
        "sys_time",
        "sys_tty_config",
        "mknod",
        "lease",
        "audit_write",
        "audit_control",
        "setfcap",
        "mac_override",
        "mac_admin",
        "syslog",
        "wake_alarm",
        "block_suspend",
        "audit_read",
        "perfmon",
        "bpf",
        "checkpoint_restore",
    ];
    (0..64)
        .filter(|bit| set >> bit & 1 == 1)
        .map(|bit| match NAMES.get(bit) {
            Some(name) => format!("cap_{name}"),
            None => format!("cap_{bit}"),
        })
        .collect()
}

/// What a thread held before [`drop_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// The permitted set (a superset of the effective one).
    pub permitted: u64,
    /// Whether the bounding set was emptied too (needs CAP_SETPCAP); without it
    /// `no_new_privs` still keeps `execve` from granting any.
    pub bounding_emptied: bool,
}

/// Drops every capability of the calling thread: the bounding set first (while CAP_SETPCAP
/// is still effective), then the ambient set, then effective, permitted and inheritable; and
/// sets `no_new_privs` so no `execve` grants any back.
pub fn drop_all() -> Result<Dropped, PrivilegeError> {
    let [effective, permitted, _] = capget().map_err(syscall("capget"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| syscall("PR_SET_NO_NEW_PRIVS")(e.into()))?;
    let bounding_emptied = effective >> CAP_SETPCAP & 1 == 1;
    if bounding_emptied {
        for cap in 0..=last_capability() {
            if prctl(libc::PR_CAPBSET_READ, cap.into()).map_err(syscall("PR_CAPBSET_READ"))? == 1 {
                prctl(libc::PR_CAPBSET_DROP, cap.into()).map_err(syscall("PR_CAPBSET_DROP"))?;
            }
        }
    }
    // Ambient capabilities are not in capset's sets; clearing them needs no privilege.
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .map_err(syscall("PR_CAP_AMBIENT_CLEAR_ALL"))?;
    capset_empty().map_err(syscall("capset"))?;
    Ok(Dropped {
        permitted,
        bounding_emptied,
    })
}

/// The capability sets of one thread, from its `/proc/.../status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCaps {
    /// `CapInh`.
    pub inheritable: u64,
    /// `CapPrm`.
    pub permitted: u64,
    /// `CapEff`.
    pub effective: u64,
    /// `CapBnd`.
    pub bounding: u64,
    /// `CapAmb`.
    pub ambient: u64,
}

impl StatusCaps {
    /// Reads the `Cap*` lines of a `status` file; a missing line reads as all ones, so it is
    /// never mistaken for an empty set.
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(u64::MAX)
        };
        Self {
            inheritable: field("CapInh"),
            permitted: field("CapPrm"),
            effective: field("CapEff"),
            bounding: field("CapBnd"),
            ambient: field("CapAmb"),
        }
    }

    /// Every set that still holds something, as `CapEff=cap_net_raw` lines.
    fn held(&self, with_bounding: bool) -> Vec<String> {
        let mut sets = vec![
            ("CapInh", self.inheritable),
            ("CapPrm", self.permitted),
            ("CapEff", self.effective),
            ("CapAmb", self.ambient),
        ];
        if with_bounding {
            sets.push(("CapBnd", self.bounding));
        }
        sets.into_iter()
            .filter(|&(_, set)| set != 0)
            .map(|(name, set)| format!("{name}={}", names(set).join(",")))
            .collect()
    }
}

/// Every thread of this process, with its capability sets.
pub fn threads() -> std::io::Result<Vec<(String, StatusCaps)>> {
    std::fs::read_dir("/proc/self/task")?
        .map(|entry| {
            let entry = entry?;
            let status = std::fs::read_to_string(entry.path().join("status"))?;
            Ok((
                entry.file_name().to_string_lossy().into_owned(),
                StatusCaps::parse(&status),
            ))
        })
        .collect()
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that joined the probe namespace while the process could, then dropped its own
/// capabilities; it runs work there for the rest of the process's life.
#[derive(Debug)]
pub struct NamespaceThread {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl NamespaceThread {
    /// Starts the thread: it joins `ns`, drops every capability, then waits for work.
    fn start(ns: &NetNs) -> Result<Self, PrivilegeError> {
        let file = ns
            .as_fd()
            .try_clone_to_owned()
            .map_err(syscall("dup the namespace"))?;
        let (ready, is_ready) = mpsc::sync_channel(1);
        let (jobs, next) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hoptrace-netns".into())
            .spawn(move || {
                let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| PrivilegeError::NamespaceThread(format!("setns: {e}")))
                    .and_then(|()| drop_all().map(|_| ()));
                drop(file);
                let go = entered.is_ok();
                let _ = ready.send(entered);
                if go {
                    while let Ok(job) = next.recv() {
                        job();
                    }
                }
            })
            .map_err(|e| PrivilegeError::NamespaceThread(e.to_string()))?;
        is_ready
            .recv()
            .map_err(|e| PrivilegeError::NamespaceThread(e.to_string()))??;
        Ok(Self {
            jobs: Mutex::new(jobs),
        })
    }

    /// Runs `f` in the namespace and returns its result; `None` if the thread is gone (a job
    /// panicked).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (done, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.jobs.lock().ok()?.send(job).ok()?;
        result.recv().ok()
    }
}

/// How work reaches the probe namespace after start-up.
#[derive(Debug, Clone)]
pub enum InNamespace {
    /// A new thread joins it for each call (needs CAP_SYS_ADMIN, so capabilities were kept).
    Join(Arc<NetNs>),
    /// The [`NamespaceThread`] does it (capabilities were dropped).
    Resident(Arc<NamespaceThread>),
}

impl InNamespace {
    /// Runs `f` in the namespace; `None` when it could not be entered.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        match self {
            Self::Join(ns) => ns.run_inside(f).ok(),
            Self::Resident(thread) => thread.run(f),
        }
    }
}

/// What `hoptrace serve` opens before it can drop its capabilities.
#[derive(Debug)]
pub struct Opened {
    /// `--netns`, opened (joined once to check it).
    pub netns: Option<Arc<NetNs>>,
    /// The engine's raw sockets, when the backend may be the engine (`engine`, `auto`); the
    /// error says why they could not be opened.
    pub sockets: Option<Result<ProbeSockets, String>>,
    /// The host-socket watcher's netlink socket (in `--netns` when given), when watching.
    pub host_socket: Option<Result<DiagSocket, WatchError>>,
    /// How to reach `--netns` once start-up is over.
    pub inside: Option<InNamespace>,
}

impl Opened {
    /// Opens what `args` names that needs a capability. The error is a configuration error
    /// (bad `--netns`, or `--backend engine` without raw sockets).
    pub fn open(args: &ServeArgs) -> Result<Self, String> {
        let netns = args
            .netns
            .as_deref()
            .map(NetNs::open)
            .transpose()
            .map_err(|e| format!("--netns: {e}"))?
            .map(Arc::new);
        let sockets = backend::open_sockets(args, netns.as_deref());
        if let (BackendKind::Engine, Some(Err(e))) = (args.backend, &sockets) {
            return Err(backend::engine_refused(e));
        }
        if args.watch_host_sockets == Some(true) && args.tcpinfo_eventsocket.is_some() {
            tracing::warn!(
                "--watch-host-sockets with --tcpinfo-eventsocket: both report every connection \
                 under the same id, so each second report ends as duplicate_id"
            );
        }
        let host_socket = args.watches_host_sockets().then(|| {
            // Opened in the namespace probes leave from: the connections of interest live there.
            let open = || DiagSocket::open(args.watch_poll, args.watch_poll_only);
            match netns.as_deref() {
                Some(ns) => ns
                    .run_inside(open)
                    .map_err(WatchError::from)
                    .and_then(|r| r),
                None => open(),
            }
        });
        Ok(Self {
            inside: netns.clone().map(InNamespace::Join),
            netns,
            sockets,
            host_socket,
        })
    }

    /// Whether the engine will run, so that nothing after start-up needs a capability.
    pub fn engine_chosen(&self) -> bool {
        matches!(self.sockets, Some(Ok(_)))
    }

    /// Drops every capability of this process, which must have one thread only (call it
    /// before building the runtime). With `--netns`, first starts the [`NamespaceThread`],
    /// which drops its own. Checks every thread's `/proc` status afterwards.
    pub fn drop_capabilities(&mut self) -> Result<Dropped, PrivilegeError> {
        let running = threads().map_err(syscall("read /proc/self/task"))?.len();
        if running != 1 {
            return Err(PrivilegeError::Threads(running));
        }
        if let Some(ns) = &self.netns {
            self.inside = Some(InNamespace::Resident(Arc::new(NamespaceThread::start(ns)?)));
        }
        let dropped = drop_all()?;
        let left: Vec<String> = threads()
            .map_err(syscall("read /proc/self/task"))?
            .iter()
            .flat_map(|(tid, caps)| {
                caps.held(dropped.bounding_emptied)
                    .into_iter()
                    .map(move |held| format!("thread {tid}: {held}"))
            })
            .collect();
        if !left.is_empty() {
            return Err(PrivilegeError::Left(left.join("; ")));
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse_and_missing_ones_are_never_empty() {
        let status = "Name:\thoptrace\nCapInh:\t0000000000000000\nCapPrm:\t0000000000002000\n\
                      CapEff:\t0000000000002000\nCapBnd:\t000001ffffffffff\n";
        let caps = StatusCaps::parse(status);
        assert_eq!(caps.inheritable, 0);
        assert_eq!(caps.permitted, 1 << 13);
        assert_eq!(caps.effective, 1 << 13);
        assert_eq!(caps.bounding, 0x1ff_ffff_ffff);
        assert_eq!(caps.ambient, u64::MAX, "no CapAmb line");
        let held = caps.held(false);
        assert_eq!(held[..2], ["CapPrm=cap_net_raw", "CapEff=cap_net_raw"]);
        assert!(held[2].starts_with("CapAmb=cap_chown,"), "{held:?}");
        assert_eq!(held.len(), 3);
    }

    #[test]
    fn capability_names_follow_their_numbers() {
        assert_eq!(names(1 << 13 | 1 << 21), ["cap_net_raw", "cap_sys_admin"]);
        assert_eq!(
            names(1 << 40 | 1 << 50),
            ["cap_checkpoint_restore", "cap_50"]
        );
        assert!(names(0).is_empty());
    }

    #[test]
    fn capget_reads_this_thread() {
        // Whatever the test runs as, the effective set is within the permitted one.
        let [effective, permitted, _] = capget().expect("capget");
        assert_eq!(effective & !permitted, 0);
    }
}
