//! `hoptrace serve` settings: every flag has an `HOPTRACE_*` environment twin, and a bad
//! setting is refused with a clear message before anything binds.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use hoptrace_backends::{Confidence, Limits, Method, engine::MAX_PROBES};
use ipnet::IpNet;

use crate::{cache::CacheConfig, conn_id};

/// The tracer backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The engine when raw sockets can be opened (and the method is single path, which is all
    /// the engine does yet), else one `scamper` process per trace.
    Auto,
    /// The in-process engine on raw sockets (needs CAP_NET_RAW); single path only for now.
    Engine,
    /// One `scamper` process per trace.
    Scamper,
    /// One shared `scamper` daemon, driven over its control socket.
    ScamperDaemon,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Parses a stopping-rule confidence: "95" or "99".
fn confidence(text: &str) -> Result<Confidence, String> {
    text.parse::<u8>()
        .ok()
        .and_then(Confidence::from_percent)
        .ok_or_else(|| format!("{text:?}: the confidence is 95 or 99 (percent)"))
}

/// The longest `--trace-timeout`.
const MAX_TRACE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e} (examples: 30s, 10m, 500ms)"))
}

/// Flags of `hoptrace serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC API listens on.
    #[arg(long, env = "HOPTRACE_LISTEN", default_value = "127.0.0.1:9383")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP server (/metrics, /healthz).
    #[arg(long, env = "HOPTRACE_ADMIN_LISTEN", default_value = "127.0.0.1:9384")]
    pub admin_listen: SocketAddr,

    /// Root directory of the trace files (created if missing).
    #[arg(long, env = "HOPTRACE_OUTPUT_DIR", default_value = "traces")]
    pub output_dir: PathBuf,

    /// Tracer backend.
    #[arg(long, env = "HOPTRACE_BACKEND", value_enum, default_value = "auto")]
    pub backend: BackendKind,

    /// Trace method: paris-udp, paris-icmp, paris-tcp (single path) or mda-udp, mda-icmp,
    /// mda-tcp (multipath).
    #[arg(long, env = "HOPTRACE_METHOD", default_value = "paris-udp")]
    pub method: Method,

    /// The scamper program.
    #[arg(long, env = "HOPTRACE_SCAMPER_BIN", default_value = "scamper")]
    pub scamper_bin: PathBuf,

    /// scamper's probe rate in packets per second: per process with `scamper` (scamper's
    /// default, 20, when unset), for the whole daemon with `scamper-daemon` (1000 when unset).
    #[arg(long, env = "HOPTRACE_SCAMPER_PPS", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub scamper_pps: Option<u32>,

    /// The engine's probe budget in packets per second, shared by every trace (`engine`;
    /// 0: unlimited).
    #[arg(long, env = "HOPTRACE_ENGINE_PPS", default_value_t = 10_000)]
    pub engine_pps: u32,

    /// tokio worker threads: gRPC, the pipeline, writing trace files (default: one per CPU).
    /// The engine probes on a thread of its own either way.
    #[arg(long, env = "HOPTRACE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    /// Most traces open on the scamper daemon at once (`scamper-daemon`); a trace that timed
    /// out holds its place until scamper ends its task.
    #[arg(long, env = "HOPTRACE_SCAMPER_WINDOW", default_value_t = 128)]
    pub scamper_window: usize,

    /// The daemon's control socket (`scamper-daemon`); a private directory when unset.
    #[arg(long, env = "HOPTRACE_SCAMPER_SOCKET")]
    pub scamper_socket: Option<PathBuf>,

    /// Highest TTL probed (single path).
    #[arg(long, env = "HOPTRACE_MAX_TTL", default_value_t = 30, value_parser = clap::value_parser!(u8).range(1..=255))]
    pub max_ttl: u8,

    /// Probes per hop before giving up on it.
    #[arg(long, env = "HOPTRACE_ATTEMPTS", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub attempts: u8,

    /// Time to wait for each reply (whole seconds, 1-20).
    #[arg(long, env = "HOPTRACE_PROBE_WAIT", default_value = "2s", value_parser = duration)]
    pub probe_wait: Duration,

    /// Most probes one multipath trace may send (1-20000).
    #[arg(long, env = "HOPTRACE_PROBE_BUDGET", default_value_t = 3000)]
    pub probe_budget: u32,

    /// Confidence of the multipath stopping rule, in percent: 95 or 99 (scamper
    /// `tracelb -c`). Higher finds more of a wide load balancer for more probes.
    #[arg(long, env = "HOPTRACE_CONFIDENCE", default_value = "95", value_parser = confidence)]
    pub confidence: Confidence,

    /// First source port of the probes, fixing which ECMP paths single-path traces hash to
    /// (scamper `trace -s`; Debian's scamper `tracelb` ignores it). The backend picks one when
    /// unset.
    #[arg(long, env = "HOPTRACE_SOURCE_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub source_port: Option<u16>,

    /// Deadline of one trace (1s-24h); past it the trace is stopped and fails.
    #[arg(long, env = "HOPTRACE_TRACE_TIMEOUT", default_value = "120s", value_parser = duration)]
    pub trace_timeout: Duration,

    /// Send probes from this network namespace (`ip netns` name); the API stays where the
    /// server was started.
    #[arg(long, env = "HOPTRACE_NETNS")]
    pub netns: Option<String>,

    /// Trace private, shared (CGNAT) and unique-local destinations (labs).
    #[arg(long, env = "HOPTRACE_ALLOW_PRIVATE")]
    pub allow_private: bool,

    /// Never trace destinations inside these prefixes (comma-separated CIDRs).
    #[arg(long, env = "HOPTRACE_DENY", value_delimiter = ',')]
    pub deny: Vec<IpNet>,

    /// Addresses that are this host's though no interface holds them (public, load-balancer);
    /// never traced, and the local side of tcp-info connections (comma-separated).
    #[arg(long, env = "HOPTRACE_LOCAL_ADDR", value_delimiter = ',')]
    pub local_addr: Vec<std::net::IpAddr>,

    /// Read close events from tcp-info's event socket at this path (reconnects when it goes
    /// away or is not there yet).
    #[arg(long, env = "HOPTRACE_TCPINFO_EVENTSOCKET")]
    pub tcpinfo_eventsocket: Option<PathBuf>,

    /// Watch this host's TCP sockets (through netlink) and trace the far end of each closed
    /// connection. Watches the namespace probes leave from (`--netns`, else the server's).
    /// Default: true, but false with --tcpinfo-eventsocket (both report the same connections,
    /// under the same ids).
    #[arg(long, env = "HOPTRACE_WATCH_HOST_SOCKETS", action = clap::ArgAction::Set)]
    pub watch_host_sockets: Option<bool>,

    /// How often the host watcher dumps the sockets when the kernel offers no TCP-destroy
    /// groups (or with --watch-poll-only).
    #[arg(long, env = "HOPTRACE_WATCH_POLL", default_value = "10ms", value_parser = duration)]
    pub watch_poll: Duration,

    /// Poll even where the kernel announces destroyed sockets (tcp-info's method; for
    /// comparison).
    #[arg(long, env = "HOPTRACE_WATCH_POLL_ONLY")]
    pub watch_poll_only: bool,

    /// Local ports whose connections the host watcher ignores (comma-separated).
    #[arg(long, env = "HOPTRACE_WATCH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub watch_exclude_ports: Vec<u16>,

    /// Remote prefixes whose connections the host watcher ignores (comma-separated CIDRs).
    #[arg(long, env = "HOPTRACE_WATCH_EXCLUDE_REMOTE", value_delimiter = ',')]
    pub watch_exclude_remote: Vec<IpNet>,

    /// tcp-info opens remembered until their close arrives.
    #[arg(long, env = "HOPTRACE_TCPINFO_MAX_OPENS", default_value_t = 1_000_000)]
    pub tcpinfo_max_opens: usize,

    /// tcp-info opens older than this are forgotten.
    #[arg(long, env = "HOPTRACE_TCPINFO_OPEN_TTL", default_value = "24h", value_parser = duration)]
    pub tcpinfo_open_ttl: Duration,

    /// How long a trace is reused for the same destination, counted from its completion.
    #[arg(long, env = "HOPTRACE_CACHE_TTL", default_value = "10m", value_parser = duration)]
    pub cache_ttl: Duration,

    /// How long a failed trace stops new traces to the same destination.
    #[arg(long, env = "HOPTRACE_CACHE_FAILURE_TTL", default_value = "1m", value_parser = duration)]
    pub cache_failure_ttl: Duration,

    /// Most destinations remembered by the cache.
    #[arg(long, env = "HOPTRACE_CACHE_CAPACITY", default_value_t = 100_000)]
    pub cache_capacity: usize,

    /// Most events that may wait on one running trace.
    #[arg(long, env = "HOPTRACE_CACHE_MAX_WAITERS", default_value_t = 10_000)]
    pub cache_max_waiters: usize,

    /// Most events that may wait on all running traces together; beyond it events for a
    /// running trace are shed like those of a full queue.
    #[arg(
        long,
        env = "HOPTRACE_CACHE_MAX_WAITERS_TOTAL",
        default_value_t = 100_000
    )]
    pub cache_max_waiters_total: usize,

    /// Traces that may wait in the queue; beyond it events are shed.
    #[arg(long, env = "HOPTRACE_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,

    /// Traces that may run at once.
    #[arg(long, env = "HOPTRACE_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,

    /// Allow-list pattern (regex, anchored) for connection ids.
    #[arg(long, env = "HOPTRACE_CONN_ID_PATTERN", default_value = conn_id::DEFAULT_PATTERN)]
    pub conn_id_pattern: String,

    /// Records of this run that subscribers can resume from by cursor.
    #[arg(long, env = "HOPTRACE_RETENTION", default_value_t = 100_000)]
    pub retention: usize,

    /// Records queued per subscriber before it is cut off the live stream (it then catches
    /// up from the store).
    #[arg(long, env = "HOPTRACE_SUBSCRIBER_QUEUE", default_value_t = 1024)]
    pub subscriber_queue: usize,

    /// Subscriptions open at once; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "HOPTRACE_MAX_SUBSCRIBERS", default_value_t = 64)]
    pub max_subscribers: usize,

    /// Largest gRPC request accepted, in bytes.
    #[arg(long, env = "HOPTRACE_MAX_REQUEST_BYTES", default_value_t = 64 * 1024)]
    pub max_request_bytes: usize,

    /// Time running traces get to finish at shutdown.
    #[arg(long, env = "HOPTRACE_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Value of TracerouteCallerVersion in every file.
    #[arg(long, env = "HOPTRACE_VERSION_TAG", default_value = concat!("hoptrace-", env!("CARGO_PKG_VERSION")))]
    pub version_tag: String,

    /// Log format.
    #[arg(long, env = "HOPTRACE_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax: info, hoptrace=debug, …).
    #[arg(long, env = "HOPTRACE_LOG", default_value = "info")]
    pub log: String,
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad configuration: {0}")]
pub struct ConfigError(pub String);

impl ServeArgs {
    /// Whether this host's sockets are watched: as asked, else unless tcp-info reports the
    /// same connections.
    pub fn watches_host_sockets(&self) -> bool {
        self.watch_host_sockets
            .unwrap_or(self.tcpinfo_eventsocket.is_none())
    }

    /// Checks what clap's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let wait = self.probe_wait.as_secs();
        if !(1..=20).contains(&wait) || self.probe_wait.subsec_nanos() != 0 {
            return bad(format!(
                "--probe-wait must be whole seconds between 1s and 20s, not {:?}",
                self.probe_wait
            ));
        }
        for (name, value) in [
            ("--cache-capacity", self.cache_capacity),
            ("--cache-max-waiters", self.cache_max_waiters),
            ("--cache-max-waiters-total", self.cache_max_waiters_total),
            ("--queue-capacity", self.queue_capacity),
            ("--concurrency", self.concurrency),
            ("--retention", self.retention),
            ("--subscriber-queue", self.subscriber_queue),
            ("--max-subscribers", self.max_subscribers),
            ("--max-request-bytes", self.max_request_bytes),
            ("--probe-budget", self.probe_budget as usize),
            ("--scamper-window", self.scamper_window),
            ("--tcpinfo-max-opens", self.tcpinfo_max_opens),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !(Duration::from_secs(1)..=MAX_TRACE_TIMEOUT).contains(&self.trace_timeout) {
            return bad(format!(
                "--trace-timeout must be between 1s and 24h, not {:?}",
                self.trace_timeout
            ));
        }
        if self.probe_budget > MAX_PROBES {
            return bad(format!(
                "--probe-budget must be at most {MAX_PROBES} (a multipath trace's flows must \
                 stay fewer than its source ports), not {}",
                self.probe_budget
            ));
        }
        if self.watch_poll < Duration::from_millis(1) {
            return bad("--watch-poll must be at least 1ms".into());
        }
        if self.cache_ttl.is_zero() {
            return bad("--cache-ttl must be above zero".into());
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return bad(format!(
                "--listen and --admin-listen are both {}",
                self.listen
            ));
        }
        if let Err(e) = regex::Regex::new(&self.conn_id_pattern) {
            return bad(format!("--conn-id-pattern: {e}"));
        }
        if self.version_tag.is_empty() || self.version_tag.chars().any(char::is_control) {
            return bad("--version-tag must be non-empty printable text".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            return bad(format!("--log {:?}: {e}", self.log));
        }
        Ok(())
    }

    /// Trace limits from the flags.
    pub fn limits(&self) -> Limits {
        Limits {
            max_ttl: self.max_ttl,
            attempts: self.attempts,
            wait: self.probe_wait,
            probe_budget: self.probe_budget,
            confidence: self.confidence,
            deadline: self.trace_timeout,
        }
    }

    /// Cache settings from the flags (call after [`ServeArgs::validate`]).
    pub fn cache(&self) -> CacheConfig {
        CacheConfig {
            ttl: self.cache_ttl,
            failure_ttl: self.cache_failure_ttl,
            capacity: NonZeroUsize::new(self.cache_capacity).unwrap_or(NonZeroUsize::MIN),
            max_waiters: self.cache_max_waiters,
            max_waiters_total: self.cache_max_waiters_total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hoptrace serve` with `args`, parsed as the CLI does.
    fn serve(args: &[&str]) -> ServeArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let argv = std::iter::once("serve").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv)
            .expect("parses")
            .serve
    }

    #[test]
    fn the_host_watcher_is_off_by_default_beside_tcpinfo() {
        assert!(serve(&[]).watches_host_sockets());
        let tcpinfo = ["--tcpinfo-eventsocket", "/run/tcpevents.sock"];
        assert!(!serve(&tcpinfo).watches_host_sockets());
        let both = [&tcpinfo[..], &["--watch-host-sockets", "true"]].concat();
        assert!(serve(&both).watches_host_sockets());
        assert!(!serve(&["--watch-host-sockets", "false"]).watches_host_sockets());
    }

    #[test]
    fn confidence_is_95_or_99_percent() {
        assert_eq!(confidence("95"), Ok(Confidence::P95));
        assert_eq!(confidence("99"), Ok(Confidence::P99));
        for bad in ["90", "0.95", "", "99%"] {
            let err = confidence(bad).expect_err(bad);
            assert!(err.contains("95 or 99"), "{err}");
        }
    }
}
