//! Running a tracer program as its own process group: bounded output, a deadline, the whole
//! group killed and the child always reaped.

use std::{
    ffi::OsStr,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{NetNs, TraceError};

/// Bytes of stderr kept for error messages: the first ones (the rest is read and dropped).
const STDERR_KEEP: usize = 4096;

/// A child running as the leader of its own process group.
pub(crate) struct Group {
    /// The child.
    pub child: tokio::process::Child,
    /// Its pid, which is also the group id.
    pub pid: u32,
    /// Kills the whole group when dropped (or on [`GroupKiller::kill`]).
    pub killer: GroupKiller,
}

/// Starts `program args…` as the leader of a new process group, inside `netns` when given,
/// with stdin closed, stdout piped (or as `stdout` says) and stderr piped.
pub(crate) fn spawn(
    program: &OsStr,
    args: &[String],
    netns: Option<&NetNs>,
    stdout: Stdio,
) -> Result<Group, TraceError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let spawned = match netns {
        None => cmd.spawn(),
        // The child inherits the network namespace of the thread that starts it, so it is
        // started from a thread that joined `ns`. Unlike a `pre_exec` hook (which makes std
        // fall back to a full fork of this large process), this keeps posix_spawn.
        Some(ns) => {
            let runtime = tokio::runtime::Handle::current();
            ns.run_inside(|| {
                let _in_runtime = runtime.enter();
                cmd.spawn()
            })
            .map_err(std::io::Error::from)?
        }
    };
    let child = spawned.map_err(|source| TraceError::Spawn {
        program: program.to_string_lossy().into_owned(),
        source,
    })?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("child exited before its pid was read"))?;
    Ok(Group {
        child,
        pid,
        killer: GroupKiller(Some(Pid::from_raw(pid as i32))),
    })
}

/// What a finished program left behind.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Kills the process group when dropped, so a cancelled trace leaves nothing running.
#[derive(Debug)]
pub(crate) struct GroupKiller(Option<Pid>);

impl GroupKiller {
    /// Sends SIGKILL to the whole group (once).
    pub fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (nothing left in the group) is the normal case after a clean exit.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `program args…` in a new process group (inside `netns` when given) and collects its
/// output, at most `max_stdout` bytes of stdout.
///
/// The group is killed with SIGKILL before the child is reaped — at the deadline, on an error,
/// and after a normal exit (helpers it forked must not outlive it). Killing before reaping
/// means the group id cannot have been reused by an unrelated process. After the output ends
/// the child is given until the deadline to exit by itself (a program may close stdout
/// before it exits), so a clean run keeps its own exit status.
pub(crate) async fn run(
    program: &OsStr,
    args: &[String],
    netns: Option<&NetNs>,
    deadline: Duration,
    max_stdout: usize,
) -> Result<Finished, TraceError> {
    let Group {
        mut child,
        pid,
        killer: mut group,
    } = spawn(program, args, netns, Stdio::piped())?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other("child has no output pipes").into());
    };

    let outputs = tokio::time::timeout(deadline, async {
        let stdout = async {
            let drained = drain(stdout, max_stdout, Overflow::Stop).await;
            // Too much output: the program is stopped now, not at the deadline (it would
            // block on the pipe, or print on until then).
            if matches!(drained, Ok((_, true))) {
                group.kill();
            }
            drained
        };
        let outputs = tokio::join!(stdout, drain(stderr, STDERR_KEEP, Overflow::Discard));
        exited(pid).await;
        outputs
    })
    .await;
    group.kill();
    let status = child.wait().await?;
    let ((stdout, stdout_overflow), (stderr, _)) = match outputs {
        Err(_elapsed) => return Err(TraceError::Timeout(deadline)),
        Ok((out, err)) => (out?, err?),
    };
    if stdout_overflow {
        return Err(TraceError::OutputTooLarge(max_stdout));
    }
    Ok(Finished {
        status,
        stdout,
        stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
    })
}

/// Returns once process `pid` (our child) has exited, without reaping it: its pid, and so its
/// process group id, stays reserved until we wait for it.
pub(crate) async fn exited(pid: u32) {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    // The output has ended, so the exit is normally a matter of microseconds: poll, backing
    // off to 10 ms; the caller's deadline bounds the loop.
    let mut pause = Duration::from_micros(50);
    while let Ok(WaitStatus::StillAlive) = waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// What [`drain`] does with bytes past what it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overflow {
    /// Returns at the first one.
    Stop,
    /// Reads on to the end, dropping them (so the writer never blocks).
    Discard,
}

/// Reads `reader` to its end (or, with [`Overflow::Stop`], to its first byte past `keep`),
/// keeping the first `keep` bytes; also says whether there was more.
async fn drain(
    mut reader: impl AsyncRead + Unpin,
    keep: usize,
    past: Overflow,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut overflow = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((kept, overflow));
        }
        let room = keep.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        overflow |= n > room;
        if overflow && past == Overflow::Stop {
            return Ok((kept, overflow));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["-c".to_owned(), script.to_owned()]
    }

    #[tokio::test]
    async fn collects_stdout_stderr_and_status() {
        let done = run(
            OsStr::new("sh"),
            &sh("printf out; printf err >&2; exit 3"),
            None,
            Duration::from_secs(10),
            1024,
        )
        .await
        .expect("runs");
        assert_eq!(done.stdout, b"out");
        assert_eq!(done.stderr, "err");
        assert_eq!(done.status.code(), Some(3));
    }

    #[tokio::test]
    async fn a_program_that_closes_stdout_before_exiting_keeps_its_exit_status() {
        for _ in 0..20 {
            let done = run(
                OsStr::new("sh"),
                &sh("printf out; exec >&-; sleep 0.05; exit 7"),
                None,
                Duration::from_secs(10),
                1024,
            )
            .await
            .expect("runs");
            assert_eq!(done.stdout, b"out");
            assert_eq!(done.status.code(), Some(7), "killed instead of exiting");
        }
    }

    #[tokio::test]
    async fn output_over_the_bound_is_an_error() {
        let err = run(
            OsStr::new("sh"),
            &sh("head -c 5000 /dev/zero"),
            None,
            Duration::from_secs(10),
            1000,
        )
        .await
        .expect_err("too large");
        assert!(matches!(err, TraceError::OutputTooLarge(1000)), "{err}");
        // A program that prints without end is stopped at the bound, not at the deadline.
        let started = std::time::Instant::now();
        let err = run(
            OsStr::new("sh"),
            &sh("cat /dev/zero"),
            None,
            Duration::from_secs(20),
            1000,
        )
        .await
        .expect_err("too large");
        assert!(matches!(err, TraceError::OutputTooLarge(1000)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let err = run(
            OsStr::new("/nonexistent/scamper"),
            &[],
            None,
            Duration::from_secs(1),
            10,
        )
        .await
        .expect_err("no such program");
        assert!(matches!(err, TraceError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/scamper"), "{err}");
    }
}
