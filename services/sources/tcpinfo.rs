//! M-Lab tcp-info's event socket as a source of close events.
//!
//! tcp-info broadcasts newline-delimited JSON on a unix socket: an open carries the
//! connection's addresses, a close only its UUID (`"ID":null`). So opens are remembered by
//! UUID (bounded in number and age) until their close arrives. The reader never waits on
//! tracing: closes go to the intake through a bounded queue, and are counted and dropped when
//! it is full, so a busy tracer cannot stall tcp-info.

use std::{
    net::IpAddr,
    num::NonZeroUsize,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use lru::LruCache;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use serde::Deserialize;
use tokio::{
    io::AsyncReadExt,
    net::UnixStream,
    sync::{mpsc, watch},
    time::Instant,
};

use crate::{
    event::{RawEvent, Source},
    metrics::ReasonLabel,
    pipeline::Pipeline,
    policy::{Policy, canonical},
};

/// Longest line accepted; tcp-info's are a few hundred bytes.
const MAX_LINE: usize = 64 * 1024;

/// tcp-info source settings.
#[derive(Debug, Clone)]
pub struct TcpInfoConfig {
    /// The event socket (`/var/local/tcpinfoeventsocket/tcpevents.sock` in production).
    pub path: PathBuf,
    /// Opens remembered at most.
    pub max_opens: NonZeroUsize,
    /// Opens older than this are forgotten (their close, if it ever comes, is unmatched).
    pub open_ttl: Duration,
    /// Close events waiting for the intake before new ones are dropped.
    pub queue: usize,
    /// First and longest pause between connection attempts.
    pub backoff: (Duration, Duration),
}

/// What the source counts (shared with the metrics registry).
#[derive(Debug, Clone, Default)]
pub struct TcpInfoCounters {
    /// Lines by what they were (`open`, `close`, `not_json`, …; see [`LINE_KINDS`]).
    pub lines: Family<ReasonLabel, Counter>,
    /// Successful connections to the socket.
    pub connects: Counter,
    /// Opens remembered now.
    pub opens: Gauge,
}

/// Every line kind counted.
pub const LINE_KINDS: [&str; 8] = [
    "open",
    "close",
    "not_json",
    "unknown_event",
    "bad_open",
    "close_without_open",
    "too_long",
    "queue_full",
];

/// The socket tuple of an open, as tcp-info writes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SockId {
    /// Source port.
    #[serde(rename = "SPort")]
    pub sport: u16,
    /// Destination port.
    #[serde(rename = "DPort")]
    pub dport: u16,
    /// Source address.
    #[serde(rename = "SrcIP")]
    pub src: String,
    /// Destination address.
    #[serde(rename = "DstIP")]
    pub dst: String,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(rename = "Event")]
    event: i64,
    #[serde(rename = "Timestamp", default)]
    timestamp: Option<String>,
    #[serde(rename = "UUID")]
    uuid: String,
    #[serde(rename = "ID", default)]
    id: Option<SockId>,
}

/// One line, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A connection opened.
    Open {
        /// Its UUID.
        uuid: String,
        /// Its addresses.
        id: SockId,
    },
    /// A connection closed.
    Close {
        /// Its UUID.
        uuid: String,
        /// When, if the timestamp parsed: (unix seconds, nanoseconds).
        at: Option<(i64, i32)>,
    },
}

/// Why a line was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadLine {
    /// Not a tcp-info JSON message.
    #[error("not a tcp-info message: {0}")]
    NotJson(String),
    /// An event number other than 0 (open) and 1 (close).
    #[error("unknown event {0}")]
    UnknownEvent(i64),
    /// An open without its addresses, or with a UUID or address longer than any real one
    /// (it would be remembered until its close: bounded in size as in number).
    #[error("open without usable addresses or UUID")]
    BadOpen,
}

impl BadLine {
    fn label(&self) -> &'static str {
        match self {
            BadLine::NotJson(_) => "not_json",
            BadLine::UnknownEvent(_) => "unknown_event",
            BadLine::BadOpen => "bad_open",
        }
    }
}

fn unix_parts(t: SystemTime) -> Option<(i64, i32)> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some((i64::try_from(d.as_secs()).ok()?, d.subsec_nanos() as i32))
}

/// Longest UUID an open is remembered with (connection ids are at most 200 bytes).
const MAX_UUID: usize = 200;
/// Longest address text (an IPv6 address with a zone fits).
const MAX_ADDR: usize = 64;

/// Parses one line of the event socket.
pub fn parse_line(line: &str) -> Result<Line, BadLine> {
    let m: Message = serde_json::from_str(line).map_err(|e| BadLine::NotJson(e.to_string()))?;
    match (m.event, m.id) {
        (0, Some(id))
            if m.uuid.len() <= MAX_UUID && id.src.len() <= MAX_ADDR && id.dst.len() <= MAX_ADDR =>
        {
            Ok(Line::Open { uuid: m.uuid, id })
        }
        (0, _) => Err(BadLine::BadOpen),
        (1, _) => Ok(Line::Close {
            uuid: m.uuid,
            // Informational: an unparseable time falls back to the receive time.
            at: m
                .timestamp
                .and_then(|t| humantime::parse_rfc3339(&t).ok())
                .and_then(unix_parts),
        }),
        (n, _) => Err(BadLine::UnknownEvent(n)),
    }
}

/// Opens waiting for their close: bounded in number (least recently opened go first) and in
/// age.
#[derive(Debug)]
pub struct Opens {
    opens: LruCache<String, (SockId, Instant)>,
    ttl: Duration,
}

impl Opens {
    /// An empty set.
    pub fn new(max: NonZeroUsize, ttl: Duration) -> Self {
        Self {
            opens: LruCache::new(max),
            ttl,
        }
    }

    /// Remembers an open.
    pub fn open(&mut self, uuid: String, id: SockId) {
        self.opens.push(uuid, (id, Instant::now()));
    }

    /// The open for a close, if it is remembered and not too old.
    pub fn close(&mut self, uuid: &str) -> Option<SockId> {
        let (id, at) = self.opens.pop(uuid)?;
        (at.elapsed() < self.ttl).then_some(id)
    }

    /// Opens remembered.
    pub fn len(&self) -> usize {
        self.opens.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.opens.is_empty()
    }
}

/// Orders the two ends as (local, remote): exactly one side is this host's. When neither or
/// both look local, tcp-info's own convention (the source is the local socket) decides.
pub fn local_and_remote(
    id: &SockId,
    is_local: impl Fn(IpAddr) -> bool,
) -> (String, u16, String, u16) {
    let parse = |s: &str| s.parse::<IpAddr>().ok().map(canonical);
    let src_local = parse(&id.src).is_some_and(&is_local);
    let dst_local = parse(&id.dst).is_some_and(&is_local);
    if dst_local && !src_local {
        (id.dst.clone(), id.dport, id.src.clone(), id.sport)
    } else {
        (id.src.clone(), id.sport, id.dst.clone(), id.dport)
    }
}

/// The tcp-info client.
#[derive(Debug)]
pub struct TcpInfoSource {
    config: TcpInfoConfig,
    counters: TcpInfoCounters,
    policy: Arc<Policy>,
}

impl TcpInfoSource {
    /// A client of `config.path`; `policy` says which addresses are this host's.
    pub fn new(config: TcpInfoConfig, counters: TcpInfoCounters, policy: Arc<Policy>) -> Self {
        Self {
            config,
            counters,
            policy,
        }
    }

    fn count(&self, kind: &'static str) {
        self.counters
            .lines
            .get_or_create(&ReasonLabel { reason: kind })
            .inc();
    }

    /// Reads the socket until `stop`, reconnecting with backoff, and hands close events to
    /// `pipeline`.
    pub async fn run(self, pipeline: Arc<Pipeline>, mut stop: watch::Receiver<bool>) {
        let (events, mut intake) = mpsc::channel::<RawEvent>(self.config.queue.max(1));
        let feeder = tokio::spawn(async move {
            while let Some(event) = intake.recv().await {
                // The outcome is counted by the pipeline; nothing to do with it here.
                let _ = pipeline.report(event, Source::TcpInfo).await;
            }
        });
        let mut opens = Opens::new(self.config.max_opens, self.config.open_ttl);
        let (first, longest) = self.config.backoff;
        let mut backoff = first;
        loop {
            let connected = tokio::select! {
                c = UnixStream::connect(&self.config.path) => c,
                _ = stop.wait_for(|s| *s) => break,
            };
            match connected {
                Ok(stream) => {
                    self.counters.connects.inc();
                    tracing::info!(path = %self.config.path.display(), "connected to tcp-info");
                    let connected = Instant::now();
                    tokio::select! {
                        why = self.read(stream, &mut opens, &events) => {
                            tracing::warn!(path = %self.config.path.display(), %why, ?backoff, "tcp-info connection ended; reconnecting");
                        }
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    // Only a connection that lasted starts the backoff over: a peer that
                    // accepts and closes at once is retried ever more slowly, as a missing one.
                    if connected.elapsed() >= longest {
                        backoff = first;
                    }
                }
                Err(e) => {
                    tracing::debug!(path = %self.config.path.display(), error = %e, ?backoff, "tcp-info not reachable yet");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            backoff = (backoff * 2).min(longest);
        }
        drop(events);
        let _ = feeder.await;
    }

    /// Reads lines until the connection ends; returns why it ended.
    async fn read(
        &self,
        mut stream: UnixStream,
        opens: &mut Opens,
        events: &mpsc::Sender<RawEvent>,
    ) -> String {
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut skipping = false;
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) => return "closed by tcp-info".into(),
                Ok(n) => n,
                Err(e) => return e.to_string(),
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(end) = buf[start..].iter().position(|&b| b == b'\n') {
                let line = &buf[start..start + end];
                start += end + 1;
                if std::mem::take(&mut skipping) {
                    continue;
                }
                self.handle(&String::from_utf8_lossy(line), opens, events);
            }
            buf.drain(..start);
            if buf.len() > MAX_LINE {
                // Skip the rest of an over-long line, whatever it holds (counted once).
                if !std::mem::replace(&mut skipping, true) {
                    self.count("too_long");
                }
                buf.clear();
            }
            self.counters.opens.set(opens.len() as i64);
        }
    }

    fn handle(&self, line: &str, opens: &mut Opens, events: &mpsc::Sender<RawEvent>) {
        if line.trim().is_empty() {
            return;
        }
        match parse_line(line) {
            Err(bad) => {
                self.count(bad.label());
                tracing::debug!(%bad, "tcp-info line skipped");
            }
            Ok(Line::Open { uuid, id }) => {
                self.count("open");
                opens.open(uuid, id);
            }
            Ok(Line::Close { uuid, at }) => {
                self.count("close");
                let Some(id) = opens.close(&uuid) else {
                    // Opened before we connected, or forgotten: nothing to trace.
                    self.count("close_without_open");
                    return;
                };
                let (local_addr, local_port, remote_addr, remote_port) =
                    local_and_remote(&id, |ip| self.policy.is_own(ip));
                let event = RawEvent {
                    connection_id: uuid,
                    local_addr,
                    local_port: u32::from(local_port),
                    remote_addr,
                    remote_port: u32::from(remote_port),
                    close_time: at,
                    labels: Default::default(),
                };
                if events.try_send(event).is_err() {
                    self.count("queue_full");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: &str = r#"{"Event":0,"Timestamp":"2023-10-10T15:47:06.123456789Z","UUID":"host_1696950000_00000000000084FF","ID":{"SPort":443,"DPort":51234,"SrcIP":"203.0.113.5","DstIP":"198.51.100.7","Interface":0,"Cookie":34047}}"#;
    const CLOSE: &str = r#"{"Event":1,"Timestamp":"2023-10-10T15:47:09.000000500Z","UUID":"host_1696950000_00000000000084FF","ID":null}"#;

    fn sock(src: &str, dst: &str) -> SockId {
        SockId {
            sport: 443,
            dport: 51234,
            src: src.into(),
            dst: dst.into(),
        }
    }

    /// Opens are remembered until their close: one whose UUID or address is longer than any
    /// real one is refused, so a faulty producer cannot fill memory with a million of them.
    #[test]
    fn opens_with_oversized_fields_are_refused() {
        let long_uuid = OPEN.replace("host_1696950000", &"h".repeat(300));
        assert_eq!(parse_line(&long_uuid), Err(BadLine::BadOpen));
        let long_addr = OPEN.replace("203.0.113.5", &"2".repeat(100));
        assert_eq!(parse_line(&long_addr), Err(BadLine::BadOpen));
        assert!(matches!(parse_line(OPEN), Ok(Line::Open { .. })));
    }

    #[test]
    fn the_real_line_format_parses() {
        assert_eq!(
            parse_line(OPEN),
            Ok(Line::Open {
                uuid: "host_1696950000_00000000000084FF".into(),
                id: sock("203.0.113.5", "198.51.100.7"),
            })
        );
        assert_eq!(
            parse_line(CLOSE),
            Ok(Line::Close {
                uuid: "host_1696950000_00000000000084FF".into(),
                at: Some((1_696_952_829, 500)),
            })
        );
        // A negative cookie (a signed 64-bit field holding an unsigned cookie) is fine.
        let negative = OPEN.replace("\"Cookie\":34047", "\"Cookie\":-9223372036854775807");
        assert!(matches!(parse_line(&negative), Ok(Line::Open { .. })));
        // A timestamp we cannot read leaves the close time to the receiver.
        let odd_time = CLOSE.replace("2023-10-10T15:47:09.000000500Z", "yesterday");
        assert!(matches!(
            parse_line(&odd_time),
            Ok(Line::Close { at: None, .. })
        ));
    }

    #[test]
    fn malformed_and_unknown_lines_are_errors_not_panics() {
        assert!(matches!(parse_line("not json"), Err(BadLine::NotJson(_))));
        assert!(matches!(parse_line("{}"), Err(BadLine::NotJson(_))));
        assert_eq!(
            parse_line(r#"{"Event":7,"UUID":"x","ID":null}"#),
            Err(BadLine::UnknownEvent(7))
        );
        assert_eq!(
            parse_line(r#"{"Event":0,"UUID":"x","ID":null}"#),
            Err(BadLine::BadOpen)
        );
        for cut in 0..OPEN.len() {
            let _ = parse_line(&OPEN[..cut]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_are_bounded_in_number_and_age() {
        let mut opens = Opens::new(NonZeroUsize::new(2).expect("2"), Duration::from_secs(60));
        opens.open("a".into(), sock("1.1.1.1", "2.2.2.2"));
        opens.open("b".into(), sock("1.1.1.1", "3.3.3.3"));
        opens.open("c".into(), sock("1.1.1.1", "4.4.4.4"));
        assert_eq!(opens.len(), 2);
        assert_eq!(opens.close("a"), None, "the oldest open made room");
        assert!(opens.close("b").is_some());
        assert_eq!(opens.close("b"), None, "a close is matched once");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(opens.close("c"), None, "too old");
        assert!(opens.is_empty());
    }

    #[test]
    fn the_remote_side_is_the_one_that_is_not_local() {
        let local = |ip: IpAddr| ip == "203.0.113.5".parse::<IpAddr>().expect("addr");
        let outbound = sock("203.0.113.5", "198.51.100.7");
        assert_eq!(local_and_remote(&outbound, local).2, "198.51.100.7");
        let reversed = sock("198.51.100.7", "203.0.113.5");
        let (l, lp, r, rp) = local_and_remote(&reversed, local);
        assert_eq!(
            (l.as_str(), lp, r.as_str(), rp),
            ("203.0.113.5", 51234, "198.51.100.7", 443)
        );
        // Neither side known as local: tcp-info's convention, the source is local.
        let unknown = sock("192.0.2.1", "192.0.2.2");
        assert_eq!(local_and_remote(&unknown, local).2, "192.0.2.2");
        // Mapped addresses compare as IPv4.
        let mapped = sock("::ffff:198.51.100.7", "::ffff:203.0.113.5");
        assert_eq!(local_and_remote(&mapped, local).2, "::ffff:198.51.100.7");
    }
}
