//! The shared scamper daemon: one long-running `scamper -U <socket> -p <pps>` that every trace
//! uses, supervised and restarted with backoff, driven natively over its control socket.
//!
//! Each trace is one control session: `attach format json`, the command once the daemon says
//! `MORE`, then `done`. scamper writes a `cycle-start` line at the first command of a session
//! and a `cycle-stop` line when it ends, so a session yields exactly the three lines a trace
//! file needs, byte for byte — and results never have to be matched to requests by
//! destination (Debian's build tags no result with its task), so many traces to one
//! destination are no special case. A bounded window limits the sessions open at once.

use std::{
    ffi::OsString,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use super::{
    command,
    control::{Decoder, Reply},
};
use crate::{NetNs, TraceError, TraceOutput, TraceRequest, Tracer, process_group};

/// How the daemon is started and used.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The scamper program.
    pub binary: OsString,
    /// Probe rate of the whole daemon (`-p`; Debian's build caps it at 10,000).
    pub pps: u32,
    /// Most trace sessions open at once.
    pub window: usize,
    /// Where the control socket goes; a private directory under the temp dir when `None`.
    pub socket: Option<PathBuf>,
    /// First and longest pause before a restart.
    pub backoff: (Duration, Duration),
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            binary: "scamper".into(),
            pps: 1000,
            window: 128,
            socket: None,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

/// What the supervisor knows of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Starting (or restarting) and not yet answering; why the previous daemon ended, if one
    /// did.
    Starting(Option<String>),
    /// Answering on its socket; the number counts the daemons started so far.
    Ready(u64),
    /// Not running; why, and a restart is coming.
    Down(String),
    /// Shut down for good.
    Stopped,
}

/// How a failure to connect starts its message (nothing was sent: safe to retry).
const NOT_CONNECTED: &str = "cannot connect";

/// How long a freshly started daemon may take to open its socket.
const START_LIMIT: Duration = Duration::from_secs(10);
/// A daemon that ran this long is considered healthy: the backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Bytes of the daemon's stderr kept for the reason it died.
const STDERR_KEEP: usize = 2048;
/// How long the daemon's stderr may stay open after its group was killed.
const STDERR_AFTER_EXIT: Duration = Duration::from_secs(1);

/// The shared-daemon backend.
#[derive(Debug)]
pub struct ScamperDaemon {
    socket: PathBuf,
    state: watch::Receiver<State>,
    stop: watch::Sender<bool>,
    window: Arc<Semaphore>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    restarts: Arc<AtomicU64>,
    pid: Arc<AtomicU64>,
    private_dir: Option<PathBuf>,
    /// The newest generation a trace found not answering on its socket while it was said
    /// to be ready (the socket file removed, nothing listening): the supervisor restarts it.
    unreachable: watch::Sender<u64>,
}

fn private_socket_dir() -> std::io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hoptrace-scamper-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    // A leftover of an earlier process with the same pid holds nothing of ours.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

impl ScamperDaemon {
    /// Starts the supervisor, which starts the daemon (inside `netns` when given). Returns at
    /// once; traces wait for the daemon to answer, within their deadlines.
    pub fn start(options: DaemonOptions, netns: Option<Arc<NetNs>>) -> Result<Self, TraceError> {
        let (private_dir, socket) = match &options.socket {
            Some(path) => (None, path.clone()),
            None => {
                let dir = private_socket_dir()?;
                let socket = dir.join("scamper.sock");
                (Some(dir), socket)
            }
        };
        let (state_tx, state) = watch::channel(State::Starting(None));
        let (stop, stopped) = watch::channel(false);
        let (unreachable, unreachable_rx) = watch::channel(0);
        let restarts = Arc::new(AtomicU64::new(0));
        let pid = Arc::new(AtomicU64::new(0));
        let supervisor = Supervisor {
            unreachable: unreachable_rx,
            window: options.window,
            options,
            socket: socket.clone(),
            netns,
            state: state_tx,
            stop: stopped,
            restarts: Arc::clone(&restarts),
            pid: Arc::clone(&pid),
        };
        let window = Arc::new(Semaphore::new(supervisor.window.max(1)));
        Ok(Self {
            socket,
            state,
            stop,
            window,
            supervisor: Mutex::new(Some(tokio::spawn(supervisor.run()))),
            restarts,
            pid,
            private_dir,
            unreachable,
        })
    }

    /// Times the daemon was restarted after it died.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// The running daemon's pid (also its process group), if it runs.
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Relaxed) {
            0 => None,
            pid => u32::try_from(pid).ok(),
        }
    }

    /// Waits until a daemon newer than generation `after` answers, and returns its
    /// generation; fails at once if the backend was shut down.
    async fn ready_after(&self, after: u64) -> Result<u64, TraceError> {
        let mut state = self.state.clone();
        let result = state
            .wait_for(|s| matches!(s, State::Ready(g) if *g > after) || *s == State::Stopped)
            .await
            .map(|s| s.clone());
        match result {
            Ok(State::Ready(generation)) => Ok(generation),
            _ => Err(TraceError::DaemonUnavailable(
                "the daemon was shut down".into(),
            )),
        }
    }

    /// Waits until the daemon answers; fails at once if the backend was shut down.
    pub async fn ready(&self) -> Result<(), TraceError> {
        self.ready_after(0).await.map(drop)
    }

    /// How many daemons were started so far (1 until the first restart); 0 while none
    /// answers.
    pub fn generation(&self) -> u64 {
        match *self.state.borrow() {
            State::Ready(generation) => generation,
            _ => 0,
        }
    }

    /// Runs `request` in a session within the window. A slot is held from before the
    /// command is sent until scamper ends the session (see [`converse_in_window`]), which
    /// may be after this future is dropped at the trace's deadline; `until` bounds that.
    async fn run(&self, request: &TraceRequest, until: Instant) -> Result<TraceOutput, TraceError> {
        let slot = Arc::clone(&self.window)
            .acquire_owned()
            .await
            .map_err(|_| TraceError::DaemonUnavailable("the daemon was shut down".into()))?;
        let command = command(request);
        let mut generation = self.ready_after(0).await?;
        let conn = loop {
            match connect(&self.socket).await {
                // Nothing was sent to a daemon that is gone (it died before the supervisor
                // noticed): wait for the next one rather than fail. A trace already running
                // when the daemon dies fails at once instead.
                Err(TraceError::DaemonUnavailable(why)) if why.starts_with(NOT_CONNECTED) => {
                    // Should the process still live (its socket file removed by a cleaner, a
                    // second instance on the same path), no successor would ever come: the
                    // supervisor is told to replace this generation.
                    self.unreachable.send_if_modified(|g| {
                        let newer = generation > *g;
                        *g = (*g).max(generation);
                        newer
                    });
                    generation = self.ready_after(generation).await?;
                }
                result => break result?,
            }
        };
        converse_in_window(slot, conn, command, until).await
    }
}

/// Runs the session on `conn` in a task of its own that holds the window's `slot` until
/// scamper ends the session, or until `until`. A trace dropped at its deadline (its caller's
/// timeout drops this future) leaves the task running once its command is sent: scamper goes
/// on with a task it has been given (Debian's build has no `halt`), and the window bounds the
/// tasks the daemon runs, not the callers waiting. Closing the connection then would free the
/// slot while scamper still probes, and a burst of timeouts would let the daemon take on more
/// than the window. A trace dropped before its command was sent sends none and gives its slot
/// back at once.
async fn converse_in_window(
    slot: OwnedSemaphorePermit,
    conn: UnixStream,
    command: String,
    until: Instant,
) -> Result<TraceOutput, TraceError> {
    let (mut done, result) = oneshot::channel();
    tokio::spawn(async move {
        let _slot = slot;
        let sent = AtomicBool::new(false);
        let mark_sent = || sent.store(true, Ordering::Relaxed);
        let session = tokio::time::timeout_at(until, converse(conn, &command, &mark_sent));
        tokio::pin!(session);
        let mut caller_gone = false;
        let result = loop {
            tokio::select! {
                // Checked first at every wake-up: a caller gone before the command was
                // written ends the session with nothing sent (and frees the slot at once).
                biased;
                () = done.closed(), if !caller_gone => {
                    if !sent.load(Ordering::Relaxed) {
                        break Err(TraceError::DaemonUnavailable(
                            "the trace was abandoned before its command was sent".into(),
                        ));
                    }
                    caller_gone = true;
                }
                outcome = &mut session => break outcome.unwrap_or_else(|_| {
                    tracing::warn!(%command, "scamper session open past twice its deadline: closed");
                    Err(TraceError::DaemonUnavailable(
                        "the session outlived twice the trace's deadline".into(),
                    ))
                }),
            }
        };
        // Nobody to tell when the trace was dropped.
        let _ = done.send(result);
    });
    result.await.unwrap_or_else(|_| {
        Err(TraceError::DaemonUnavailable(
            "the session task ended without a result".into(),
        ))
    })
}

#[async_trait]
impl Tracer for ScamperDaemon {
    fn name(&self) -> &'static str {
        "scamper-daemon"
    }

    async fn trace(&self, request: &TraceRequest) -> Result<TraceOutput, TraceError> {
        super::supported(request)?;
        // At the deadline the caller gets its timeout; a session already sent goes on in the
        // background, holding its window slot, for at most as long again.
        let deadline = request.limits.deadline;
        let until = Instant::from_std(crate::request::instant_after(
            std::time::Instant::now(),
            deadline.saturating_mul(2),
        ));
        match tokio::time::timeout(deadline, self.run(request, until)).await {
            Ok(result) => result,
            // Out of time while no daemon answered: that, not the trace, is the failure.
            Err(_) => Err(match &*self.state.borrow() {
                State::Down(reason) | State::Starting(Some(reason)) => {
                    TraceError::DaemonUnavailable(reason.clone())
                }
                State::Starting(None) => TraceError::DaemonUnavailable(
                    "the daemon did not come up within the trace's deadline".into(),
                ),
                _ => TraceError::Timeout(request.limits.deadline),
            }),
        }
    }

    async fn shutdown(&self) {
        let _ = self.stop.send(true);
        self.window.close();
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = supervisor {
            let _ = task.await;
        }
    }
}

impl Drop for ScamperDaemon {
    fn drop(&mut self) {
        // The supervisor kills the daemon's group when it sees this (or when its task is
        // dropped with the runtime).
        let _ = self.stop.send(true);
        if let Some(dir) = &self.private_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs the daemon and restarts it when it dies.
struct Supervisor {
    options: DaemonOptions,
    window: usize,
    socket: PathBuf,
    netns: Option<Arc<NetNs>>,
    state: watch::Sender<State>,
    stop: watch::Receiver<bool>,
    restarts: Arc<AtomicU64>,
    pid: Arc<AtomicU64>,
    /// See [`ScamperDaemon::unreachable`].
    unreachable: watch::Receiver<u64>,
}

impl Supervisor {
    async fn run(mut self) {
        let (first, longest) = self.options.backoff;
        let mut backoff = first;
        let mut generation = 0;
        let mut last_failure = None;
        loop {
            generation += 1;
            let started = Instant::now();
            let Some(reason) = self.run_once(generation, last_failure.take()).await else {
                self.state.send_replace(State::Stopped);
                let _ = std::fs::remove_file(&self.socket);
                return;
            };
            tracing::warn!(%reason, ?backoff, "scamper daemon down; restarting");
            self.state.send_replace(State::Down(reason.clone()));
            last_failure = Some(reason);
            self.restarts.fetch_add(1, Ordering::Relaxed);
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = first;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = self.stop.wait_for(|s| *s) => {
                    self.state.send_replace(State::Stopped);
                    return;
                }
            }
            backoff = (backoff * 2).min(longest);
        }
    }

    /// Starts the daemon and returns why it ended, or `None` when it was stopped.
    async fn run_once(&mut self, generation: u64, last_failure: Option<String>) -> Option<String> {
        if *self.stop.borrow() {
            return None;
        }
        self.state.send_replace(State::Starting(last_failure));
        // scamper leaves its socket behind when it dies: a stale one would refuse the bind.
        let _ = std::fs::remove_file(&self.socket);
        let args = vec![
            "-U".to_owned(),
            self.socket.to_string_lossy().into_owned(),
            "-p".to_owned(),
            self.options.pps.to_string(),
        ];
        let mut group = match process_group::spawn(
            &self.options.binary,
            &args,
            self.netns.as_deref(),
            Stdio::null(),
        ) {
            Ok(group) => group,
            Err(e) => return Some(e.to_string()),
        };
        self.pid.store(u64::from(group.pid), Ordering::Relaxed);
        let stderr = group.child.stderr.take().map(|err| tokio::spawn(tail(err)));
        let mut unreachable = self.unreachable.clone();
        let mut lost = None;
        let ended = tokio::select! {
            () = process_group::exited(group.pid) => true,
            _ = self.stop.wait_for(|s| *s) => false,
            _ = unreachable.wait_for(|g| *g >= generation) => {
                lost = Some("its control socket stopped answering while it ran (removed, or \
                             nothing listening); replaced");
                true
            }
            () = announce_when_ready(&self.socket, &self.state, generation) => {
                unreachable!("never returns")
            }
        };
        // Kill the group before reaping: the helper scamper forks must not outlive it.
        group.killer.kill();
        self.pid.store(0, Ordering::Relaxed);
        let status = group.child.wait().await;
        // The group is dead, so stderr ends at once, unless a process that left the group
        // still holds the pipe: then the supervisor must not wait on it (no restart, no
        // shutdown would follow).
        let stderr = match stderr {
            Some(mut task) => match tokio::time::timeout(STDERR_AFTER_EXIT, &mut task).await {
                Ok(tail) => tail.unwrap_or_default(),
                Err(_) => {
                    task.abort();
                    "(its stderr stayed open after it was killed)".to_owned()
                }
            },
            None => String::new(),
        };
        if !ended {
            return None;
        }
        if let Some(lost) = lost {
            return Some(format!("scamper daemon: {lost}"));
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        Some(
            format!("scamper daemon {status}: {stderr}")
                .trim_end_matches(": ")
                .to_owned(),
        )
    }
}

/// One control session on `socket`: attach, `command` once the daemon says `MORE`, `done` at
/// the next `MORE`; returns the three lines the daemon wrote. Never sends more commands than
/// the daemon asked for.
pub async fn session(socket: &Path, command: &str) -> Result<TraceOutput, TraceError> {
    converse(connect(socket).await?, command, &|| {}).await
}

fn gone(what: String) -> TraceError {
    TraceError::DaemonUnavailable(format!("{what} (the daemon exited or is restarting)"))
}

/// Connects to the daemon's control socket.
async fn connect(socket: &Path) -> Result<UnixStream, TraceError> {
    UnixStream::connect(&socket).await.map_err(|e| {
        // Refused or missing: the daemon is gone (or not up yet), and its successor is worth
        // waiting for. Anything else (out of descriptors, a full backlog) is this process's
        // or this moment's trouble, which no restart would end: the trace fails with it.
        let gone_daemon = matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        );
        let what = format!("to {}: {e}", socket.display());
        if gone_daemon {
            gone(format!("{NOT_CONNECTED} {what}"))
        } else {
            TraceError::DaemonUnavailable(format!("could not connect {what}"))
        }
    })
}

/// The session on `conn` (see [`session`]); calls `on_command` just before the command is
/// written.
async fn converse(
    mut conn: UnixStream,
    command: &str,
    on_command: &(dyn Fn() + Sync),
) -> Result<TraceOutput, TraceError> {
    conn.write_all(b"attach format json\n")
        .await
        .map_err(|e| gone(format!("write: {e}")))?;
    let mut decoder = Decoder::new();
    let mut lines = Vec::new();
    let (mut sent_command, mut sent_done) = (false, false);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn
            .read(&mut buf)
            .await
            .map_err(|e| gone(format!("read: {e}")))?;
        if n == 0 {
            if decoder.finish().is_err() || !sent_done {
                return Err(gone("control connection closed mid-trace".into()));
            }
            break;
        }
        decoder.feed(&buf[..n]);
        while let Some(reply) = decoder.next_reply()? {
            match reply {
                // The daemon takes one command per MORE: ours, then `done`.
                Reply::More if !sent_command => {
                    on_command();
                    conn.write_all(format!("{command}\n").as_bytes())
                        .await
                        .map_err(|e| gone(format!("write: {e}")))?;
                    sent_command = true;
                }
                Reply::More if !sent_done => {
                    conn.write_all(b"done\n")
                        .await
                        .map_err(|e| gone(format!("write: {e}")))?;
                    sent_done = true;
                }
                Reply::Data { payload, .. } => {
                    // Bounded as a process's output is: the file must stay under the ETL's
                    // limit, and a daemon printing without end must not take the memory.
                    let total = lines.len() + payload.len();
                    if total > super::MAX_OUTPUT {
                        return Err(TraceError::OutputTooLarge(total));
                    }
                    lines.extend_from_slice(&payload);
                }
                Reply::Err(message) => return Err(TraceError::Refused(message)),
                Reply::Unknown(line) => {
                    tracing::debug!(%line, "unknown scamper control line skipped");
                }
                Reply::More | Reply::Ok { .. } => {}
            }
        }
    }
    Ok(TraceOutput::from_lines(lines)?)
}

/// Marks the daemon ready once its socket accepts a connection, then waits forever (the caller
/// races it against the daemon's exit and the stop signal).
async fn announce_when_ready(socket: &Path, state: &watch::Sender<State>, generation: u64) {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if UnixStream::connect(socket).await.is_ok() {
            state.send_replace(State::Ready(generation));
            break;
        }
        if Instant::now() >= deadline {
            tracing::error!(socket = %socket.display(), "scamper daemon did not open its socket within {START_LIMIT:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::future::pending::<()>().await;
}

/// The last [`STDERR_KEEP`] bytes of a stream, as text.
async fn tail(mut reader: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > STDERR_KEEP {
            kept.drain(..kept.len() - STDERR_KEEP);
        }
    }
    String::from_utf8_lossy(&kept).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncBufReadExt, net::UnixListener};

    use super::*;

    const LINES: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/scamper-20211212/trace-icmp-paris.json"
    ));

    /// What the fake daemon does, in order.
    #[derive(Debug, Clone)]
    enum Step {
        /// Write these bytes, `chunk` bytes per write.
        Send(Vec<u8>, usize),
        /// Read one line and check it.
        Expect(&'static str),
        /// Check that the client sends nothing for a while.
        Silence,
        /// Do nothing for a while.
        Pause(Duration),
        /// Tell the test where the session is.
        Notify(Arc<tokio::sync::Notify>),
        /// Check that the client closes the connection without sending anything.
        ExpectClosed,
        /// Close the connection.
        Close,
    }

    fn data(line: &str, tag: Option<u32>) -> Vec<u8> {
        let tag = tag.map(|t| format!(" id-{t}")).unwrap_or_default();
        format!("DATA {}{tag}\n{line}", line.len()).into_bytes()
    }

    /// The Debian build's replies for one session, sent `chunk` bytes at a time.
    fn debian_session(chunk: usize, tagged: bool) -> Vec<Step> {
        let lines: Vec<String> = LINES.split_inclusive('\n').map(str::to_owned).collect();
        let tag = |n| tagged.then_some(n);
        vec![
            Step::Expect("attach format json"),
            Step::Send(b"OK\n".to_vec(), chunk),
            // Before MORE the client must not send its command.
            Step::Silence,
            Step::Send(b"MORE\n".to_vec(), chunk),
            Step::Expect("trace -P icmp-paris 10.77.100.5"),
            Step::Send(data(&lines[0], tag(1)), chunk),
            Step::Send(b"OK id-1\nMORE\n".to_vec(), chunk),
            Step::Expect("done"),
            Step::Send(
                [
                    data(&lines[1], tag(1)),
                    b"OK\n".to_vec(),
                    data(&lines[2], tag(1)),
                ]
                .concat(),
                chunk,
            ),
            Step::Close,
        ]
    }

    /// Serves one scripted session on a fresh socket; returns the socket path.
    async fn fake_daemon(steps: Vec<Step>) -> (tempfile_dir::Dir, PathBuf, JoinHandle<()>) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("ctl.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let task = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.expect("accept");
            let (read, mut write) = conn.into_split();
            let mut read = tokio::io::BufReader::new(read);
            for step in steps {
                match step {
                    Step::Send(bytes, chunk) => {
                        for piece in bytes.chunks(chunk.max(1)) {
                            if write.write_all(piece).await.is_err() {
                                return;
                            }
                            write.flush().await.expect("flush");
                            tokio::task::yield_now().await;
                        }
                    }
                    Step::Expect(want) => {
                        let mut line = String::new();
                        read.read_line(&mut line).await.expect("read");
                        assert_eq!(line.trim_end(), want);
                    }
                    Step::Silence => {
                        let mut line = String::new();
                        let got = tokio::time::timeout(
                            Duration::from_millis(50),
                            read.read_line(&mut line),
                        )
                        .await;
                        assert!(got.is_err(), "client sent {line:?} before MORE");
                    }
                    Step::Pause(pause) => tokio::time::sleep(pause).await,
                    Step::Notify(notify) => notify.notify_one(),
                    Step::ExpectClosed => {
                        let mut line = String::new();
                        let n = read.read_line(&mut line).await.expect("read");
                        assert_eq!((n, line.as_str()), (0, ""), "the client sent a line");
                    }
                    Step::Close => return,
                }
            }
        });
        (dir, path, task)
    }

    /// A private directory removed on drop (the backends crate has no tempfile dependency).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                Self(super::private_socket_dir().expect("temp dir"))
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const COMMAND: &str = "trace -P icmp-paris 10.77.100.5";

    #[tokio::test]
    async fn a_session_yields_the_three_lines_byte_for_byte_however_the_bytes_arrive() {
        for (chunk, tagged) in [(1, false), (7, false), (4096, false), (3, true)] {
            let (_dir, path, task) = fake_daemon(debian_session(chunk, tagged)).await;
            let output = session(&path, COMMAND).await.expect("session");
            assert_eq!(output.lines, LINES, "chunk {chunk}");
            assert_eq!(output.summary.dst.to_string(), "10.77.100.5");
            task.await.expect("fake daemon saw the right commands");
        }
    }

    #[tokio::test]
    async fn a_refused_command_is_a_refused_error() {
        let (_dir, path, _task) = fake_daemon(vec![
            Step::Expect("attach format json"),
            Step::Send(b"OK\nMORE\n".to_vec(), 64),
            Step::Expect(COMMAND),
            Step::Send(b"ERR command not accepted\n".to_vec(), 64),
        ])
        .await;
        let err = session(&path, COMMAND).await.expect_err("refused");
        assert!(
            matches!(err, TraceError::Refused(ref m) if m == "command not accepted"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unknown_lines_are_skipped() {
        let mut steps = debian_session(64, false);
        steps.insert(1, Step::Send(b"HELLO from a future build\n".to_vec(), 64));
        let (_dir, path, _task) = fake_daemon(steps).await;
        let output = session(&path, COMMAND).await.expect("session");
        assert_eq!(output.lines, LINES);
    }

    #[tokio::test]
    async fn one_frame_larger_than_a_file_may_hold_is_output_too_large() {
        let steps = vec![
            Step::Expect("attach format json"),
            Step::Send(b"OK\nMORE\n".to_vec(), 64),
            Step::Expect(COMMAND),
            Step::Send(
                format!("DATA {}\n", super::super::MAX_OUTPUT + 1).into_bytes(),
                64,
            ),
        ];
        let (_dir, path, _task) = fake_daemon(steps).await;
        let err = session(&path, COMMAND).await.expect_err("too large");
        assert_eq!(err.kind(), "output_too_large", "{err}");
    }

    #[tokio::test]
    async fn a_daemon_printing_more_than_a_file_may_hold_fails_the_trace() {
        // 1 MB frames without end: the session stops at the process backend's bound.
        let frame = data(&"x".repeat(1_000_000 - 1), None);
        let mut steps = vec![
            Step::Expect("attach format json"),
            Step::Send(b"OK\nMORE\n".to_vec(), 64),
            Step::Expect(COMMAND),
        ];
        steps.extend((0..100).map(|_| Step::Send(frame.clone(), 1 << 16)));
        let (_dir, path, _task) = fake_daemon(steps).await;
        let err = session(&path, COMMAND).await.expect_err("too large");
        assert!(
            matches!(err, TraceError::OutputTooLarge(n) if n > super::super::MAX_OUTPUT),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_daemon_closing_mid_frame_or_before_the_end_fails_the_trace() {
        let lines: Vec<&str> = LINES.split_inclusive('\n').collect();
        let half = data(lines[1], None);
        let cases = [
            // Closed in the middle of the trace's DATA frame.
            vec![
                Step::Expect("attach format json"),
                Step::Send(b"OK\nMORE\n".to_vec(), 64),
                Step::Expect(COMMAND),
                Step::Send(data(lines[0], None), 64),
                Step::Send(b"OK id-1\nMORE\n".to_vec(), 64),
                Step::Expect("done"),
                Step::Send(half[..half.len() / 2].to_vec(), 64),
                Step::Close,
            ],
            // Closed before the command was even taken.
            vec![Step::Expect("attach format json"), Step::Close],
        ];
        for steps in cases {
            let (_dir, path, _task) = fake_daemon(steps).await;
            let err = session(&path, COMMAND).await.expect_err("fails");
            assert!(matches!(err, TraceError::DaemonUnavailable(_)), "{err}");
        }
    }

    #[tokio::test]
    async fn a_daemon_whose_stderr_outlives_it_is_still_restarted() {
        use std::os::unix::fs::PermissionsExt;
        // It leaves a process in a session of its own holding stderr (for 20 s), then fails
        // (after the stray has left its group, so killing the group does not reach it).
        let dir = tempfile_dir::Dir::new();
        let binary = dir.0.join("scamper");
        std::fs::write(&binary, "#!/bin/sh\nsetsid sleep 20 &\nsleep 0.2\nexit 1\n")
            .expect("write");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let daemon = ScamperDaemon::start(
            DaemonOptions {
                binary: binary.clone().into(),
                backoff: (Duration::from_millis(10), Duration::from_millis(20)),
                ..DaemonOptions::default()
            },
            None,
        )
        .expect("supervisor starts");
        // Each death costs at most the 1 s the supervisor gives the stderr reader (waiting
        // for the pipe's end, it would restart once in 20 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(6);
        while daemon.restarts() < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(daemon.restarts() >= 2, "restarts: {}", daemon.restarts());
        tokio::time::timeout(Duration::from_secs(5), daemon.shutdown())
            .await
            .expect("shutdown does not wait on the stray process");
    }

    #[tokio::test]
    async fn a_daemon_that_cannot_run_fails_traces_with_its_reason_not_a_timeout() {
        let request = |deadline| TraceRequest {
            dst: "10.77.100.5".parse().expect("addr"),
            method: crate::Method::Paris(crate::Probe::Icmp),
            limits: crate::Limits {
                deadline,
                ..crate::Limits::default()
            },
            source_port: None,
        };
        let fast = (Duration::from_millis(10), Duration::from_millis(20));
        for (binary, reason) in [
            ("/nonexistent/scamper", "cannot start /nonexistent/scamper"),
            ("false", "exit status: 1"),
        ] {
            let daemon = ScamperDaemon::start(
                DaemonOptions {
                    binary: binary.into(),
                    backoff: fast,
                    ..DaemonOptions::default()
                },
                None,
            )
            .expect("supervisor starts");
            // Long enough for the first attempt to have failed however loaded the machine is
            // (the supervisor retries every 10-20 ms); the reason must survive restarts.
            let err = daemon
                .trace(&request(Duration::from_secs(2)))
                .await
                .expect_err("no daemon");
            assert!(
                matches!(err, TraceError::DaemonUnavailable(ref m) if m.contains(reason)),
                "{binary}: {err}"
            );
            assert!(
                daemon.restarts() > 0,
                "{binary}: the supervisor kept trying"
            );
            daemon.shutdown().await;
            let err = daemon
                .trace(&request(Duration::from_secs(5)))
                .await
                .expect_err("shut down");
            assert!(err.to_string().contains("shut down"), "{err}");
        }
    }

    /// A window of one slot, taken, and a connection to `steps`.
    async fn one_slot_session(
        steps: Vec<Step>,
    ) -> (
        Arc<Semaphore>,
        OwnedSemaphorePermit,
        UnixStream,
        tempfile_dir::Dir,
        JoinHandle<()>,
    ) {
        let window = Arc::new(Semaphore::new(1));
        let slot = Arc::clone(&window).acquire_owned().await.expect("slot");
        let (dir, path, fake) = fake_daemon(steps).await;
        let conn = connect(&path).await.expect("connect");
        (window, slot, conn, dir, fake)
    }

    /// The Debian build's session up to `done`, then a notification, `pause` and the rest.
    fn slow_session(pause: Duration) -> (Vec<Step>, Arc<tokio::sync::Notify>) {
        let notify = Arc::new(tokio::sync::Notify::new());
        let mut steps = debian_session(4096, false);
        let done = steps.iter().position(|s| matches!(s, Step::Expect("done")));
        let at = done.expect("done step") + 1;
        steps.insert(at, Step::Pause(pause));
        steps.insert(at, Step::Notify(Arc::clone(&notify)));
        (steps, notify)
    }

    /// Runs `trace` until `notify` fires (the fake daemon got that far), then drops it as a
    /// caller's deadline would. (These tests run on one thread: the fake pauses after the
    /// notification, so nothing moves before the drop.)
    async fn drop_at<F: std::future::Future>(trace: F, notify: &tokio::sync::Notify) {
        tokio::select! {
            _ = trace => panic!("the trace ended before the daemon got there"),
            () = notify.notified() => {}
        }
    }

    #[tokio::test]
    async fn a_trace_past_its_deadline_keeps_its_slot_until_scamper_ends_the_session() {
        let (steps, notify) = slow_session(Duration::from_millis(500));
        let (window, slot, conn, _dir, fake) = one_slot_session(steps).await;
        let until = Instant::now() + Duration::from_secs(30);
        // Dropped once scamper has the command and `done`.
        drop_at(
            converse_in_window(slot, conn, COMMAND.into(), until),
            &notify,
        )
        .await;
        // scamper still runs the task: the slot stays taken until it ends the session.
        assert!(
            window.try_acquire().is_err(),
            "slot freed while scamper traced"
        );
        let slot = tokio::time::timeout(Duration::from_secs(10), window.acquire()).await;
        drop(slot.expect("slot back once the session ended"));
        fake.await.expect("the session ran to its end");
    }

    #[tokio::test]
    async fn a_session_that_never_ends_gives_its_slot_back_at_its_bound() {
        let (steps, notify) = slow_session(Duration::from_secs(60));
        let (window, slot, conn, _dir, _fake) = one_slot_session(steps).await;
        // Far enough for the session to reach `done` however loaded the machine is.
        let until = Instant::now() + Duration::from_secs(2);
        drop_at(
            converse_in_window(slot, conn, COMMAND.into(), until),
            &notify,
        )
        .await;
        let slot = tokio::time::timeout(Duration::from_secs(10), window.acquire()).await;
        drop(slot.expect("slot back at the bound"));
        assert!(Instant::now() >= until, "not before the bound");
        // A caller still waiting at the bound gets why.
        let (steps, _notify) = slow_session(Duration::from_secs(60));
        let (window, slot, conn, _dir, _fake) = one_slot_session(steps).await;
        let until = Instant::now() + Duration::from_millis(100);
        let err = converse_in_window(slot, conn, COMMAND.into(), until)
            .await
            .expect_err("bound");
        assert!(err.to_string().contains("twice"), "{err}");
        assert_eq!(window.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_trace_dropped_before_its_command_is_sent_sends_none() {
        // The daemon has not said MORE yet (it never will here): the session must not wait for
        // it, but close with nothing sent and give the slot back.
        let notify = Arc::new(tokio::sync::Notify::new());
        let (window, slot, conn, _dir, fake) = one_slot_session(vec![
            Step::Expect("attach format json"),
            Step::Notify(Arc::clone(&notify)),
            Step::ExpectClosed,
        ])
        .await;
        let until = Instant::now() + Duration::from_secs(30);
        drop_at(
            converse_in_window(slot, conn, COMMAND.into(), until),
            &notify,
        )
        .await;
        tokio::time::timeout(Duration::from_secs(10), fake)
            .await
            .expect("the session closed")
            .expect("without a command");
        assert_eq!(window.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_missing_socket_is_daemon_unavailable() {
        let err = session(Path::new("/nonexistent/scamper.sock"), COMMAND)
            .await
            .expect_err("no socket");
        assert!(matches!(err, TraceError::DaemonUnavailable(_)), "{err}");
        assert_eq!(err.kind(), "daemon_unavailable");
    }
}
