//! Close events: what an event source reports, and its validation into a [`CloseEvent`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use crate::{
    conn_id::{BadConnectionId, ConnectionId, ConnectionIds},
    policy::canonical,
};

/// Where events come from; a label on the events counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `ReportClose`, one event per call.
    Grpc,
    /// `ReportCloses`, a client stream.
    GrpcStream,
    /// A `Trace` call (an operator asking for a trace now).
    OnDemand,
    /// tcp-info's event socket.
    TcpInfo,
    /// This host's own TCP sockets, watched through netlink.
    HostSockets,
}

impl Source {
    /// Every source, for metrics and status.
    pub const ALL: [Source; 5] = [
        Source::Grpc,
        Source::GrpcStream,
        Source::OnDemand,
        Source::TcpInfo,
        Source::HostSockets,
    ];

    /// The label used in metrics and status.
    pub fn label(self) -> &'static str {
        match self {
            Source::Grpc => "grpc",
            Source::GrpcStream => "grpc_stream",
            Source::OnDemand => "on_demand",
            Source::TcpInfo => "tcpinfo",
            Source::HostSockets => "host_sockets",
        }
    }
}

/// Bounds on the free-form parts of an event.
pub const MAX_LABELS: usize = 16;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 64;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 256;

/// An event as a source hands it over, before any check.
#[derive(Debug, Clone, Default)]
pub struct RawEvent {
    /// The connection id.
    pub connection_id: String,
    /// Local address, text.
    pub local_addr: String,
    /// Local port.
    pub local_port: u32,
    /// Remote address, text: the destination to trace.
    pub remote_addr: String,
    /// Remote port.
    pub remote_port: u32,
    /// When the connection closed, if the source knows: (unix seconds, nanoseconds).
    pub close_time: Option<(i64, i32)>,
    /// Labels to carry on the record.
    pub labels: BTreeMap<String, String>,
}

/// A validated close event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseEvent {
    /// The connection id; the UUID of the trace file.
    pub id: ConnectionId,
    /// This host's end of the connection (address canonical).
    pub local: SocketAddr,
    /// The far end (address canonical): the destination.
    pub remote: SocketAddr,
    /// When it closed.
    pub closed_at: SystemTime,
    /// Labels carried on the record.
    pub labels: BTreeMap<String, String>,
}

/// Why an event is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    /// The connection id.
    #[error(transparent)]
    ConnectionId(#[from] BadConnectionId),
    /// An address does not parse.
    #[error("{field} {value:?} is not an IP address")]
    Address {
        /// `local_addr` or `remote_addr`.
        field: &'static str,
        /// What was sent (truncated).
        value: String,
    },
    /// A port is zero or above 65535.
    #[error("{field} {value} is not a port (1-65535)")]
    Port {
        /// `local_port` or `remote_port`.
        field: &'static str,
        /// What was sent.
        value: u32,
    },
    /// The two ends are of different address families.
    #[error("local {local} and remote {remote} are of different address families")]
    MixedFamilies {
        /// Local address.
        local: IpAddr,
        /// Remote address.
        remote: IpAddr,
    },
    /// The close time is not a valid time.
    #[error("close_time {0}s {1}ns is not a valid time")]
    CloseTime(i64, i32),
    /// Too many labels, or one too long.
    #[error(
        "labels: at most {MAX_LABELS}, keys up to {MAX_LABEL_KEY} bytes, values up to {MAX_LABEL_VALUE} bytes"
    )]
    Labels,
}

impl InvalidEvent {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            InvalidEvent::ConnectionId(_) => "connection_id",
            InvalidEvent::Address { .. } => "address",
            InvalidEvent::Port { .. } => "port",
            InvalidEvent::MixedFamilies { .. } => "mixed_families",
            InvalidEvent::CloseTime(..) => "close_time",
            InvalidEvent::Labels => "labels",
        }
    }

    /// Every label, for metrics.
    pub const LABELS: [&'static str; 6] = [
        "connection_id",
        "address",
        "port",
        "mixed_families",
        "close_time",
        "labels",
    ];
}

fn parse_addr(field: &'static str, value: &str) -> Result<IpAddr, InvalidEvent> {
    value
        .parse::<IpAddr>()
        .map(canonical)
        .map_err(|_| InvalidEvent::Address {
            field,
            value: value.chars().take(64).collect(),
        })
}

fn parse_port(field: &'static str, value: u32) -> Result<u16, InvalidEvent> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(InvalidEvent::Port { field, value }),
    }
}

fn close_time(secs: i64, nanos: i32) -> Option<SystemTime> {
    let secs = u64::try_from(secs).ok()?;
    let nanos = u32::try_from(nanos).ok().filter(|n| *n < 1_000_000_000)?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
}

impl RawEvent {
    /// Checks every field; `now` stands in for a missing close time.
    pub fn validate(
        self,
        ids: &ConnectionIds,
        now: SystemTime,
    ) -> Result<CloseEvent, InvalidEvent> {
        let id = ids.validate(&self.connection_id)?;
        let local_ip = parse_addr("local_addr", &self.local_addr)?;
        let remote_ip = parse_addr("remote_addr", &self.remote_addr)?;
        let local_port = parse_port("local_port", self.local_port)?;
        let remote_port = parse_port("remote_port", self.remote_port)?;
        if local_ip.is_ipv4() != remote_ip.is_ipv4() {
            return Err(InvalidEvent::MixedFamilies {
                local: local_ip,
                remote: remote_ip,
            });
        }
        let labels_ok = self.labels.len() <= MAX_LABELS
            && self.labels.iter().all(|(k, v)| {
                !k.is_empty() && k.len() <= MAX_LABEL_KEY && v.len() <= MAX_LABEL_VALUE
            });
        if !labels_ok {
            return Err(InvalidEvent::Labels);
        }
        let closed_at = match self.close_time {
            None => now,
            Some((secs, nanos)) => {
                close_time(secs, nanos).ok_or(InvalidEvent::CloseTime(secs, nanos))?
            }
        };
        Ok(CloseEvent {
            id,
            local: SocketAddr::new(local_ip, local_port),
            remote: SocketAddr::new(remote_ip, remote_port),
            closed_at,
            labels: self.labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawEvent {
        RawEvent {
            connection_id: "host_1696950000_00000000000084FF".into(),
            local_addr: "203.0.113.5".into(),
            local_port: 443,
            remote_addr: "198.51.100.7".into(),
            remote_port: 51234,
            close_time: None,
            labels: BTreeMap::new(),
        }
    }

    fn check(event: RawEvent) -> Result<CloseEvent, InvalidEvent> {
        event.validate(&ConnectionIds::default(), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn a_good_event_validates_and_canonicalises_mapped_addresses() {
        let mut event = raw();
        event.local_addr = "::ffff:203.0.113.5".into();
        let ok = check(event).expect("valid");
        assert_eq!(ok.local, "203.0.113.5:443".parse().expect("addr"));
        assert_eq!(ok.remote, "198.51.100.7:51234".parse().expect("addr"));
        assert_eq!(ok.closed_at, SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn malformed_fields_say_which_field() {
        let mut e = raw();
        e.remote_addr = "not-an-ip".into();
        assert!(matches!(
            check(e),
            Err(InvalidEvent::Address {
                field: "remote_addr",
                ..
            })
        ));
        let mut e = raw();
        e.local_port = 70000;
        assert_eq!(
            check(e),
            Err(InvalidEvent::Port {
                field: "local_port",
                value: 70000
            })
        );
        let mut e = raw();
        e.remote_port = 0;
        assert!(matches!(
            check(e),
            Err(InvalidEvent::Port {
                field: "remote_port",
                ..
            })
        ));
        let mut e = raw();
        e.remote_addr = "2001:db8::1".into();
        assert!(matches!(check(e), Err(InvalidEvent::MixedFamilies { .. })));
        let mut e = raw();
        e.connection_id = "../../etc/cron.d/x".into();
        assert!(matches!(check(e), Err(InvalidEvent::ConnectionId(_))));
    }

    #[test]
    fn close_times_must_be_real_times() {
        let mut e = raw();
        e.close_time = Some((1_700_000_000, 5));
        let at = check(e).expect("valid").closed_at;
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after epoch"),
            std::time::Duration::new(1_700_000_000, 5)
        );
        for bad in [(-1, 0), (0, -1), (0, 1_000_000_000)] {
            let mut e = raw();
            e.close_time = Some(bad);
            assert_eq!(check(e), Err(InvalidEvent::CloseTime(bad.0, bad.1)));
        }
    }

    #[test]
    fn labels_are_bounded() {
        let mut e = raw();
        e.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(check(e), Err(InvalidEvent::Labels));
        let mut e = raw();
        e.labels.insert("k".into(), "v".repeat(MAX_LABEL_VALUE + 1));
        assert_eq!(check(e), Err(InvalidEvent::Labels));
        let mut e = raw();
        e.labels.insert("site".into(), "lga01".into());
        assert!(check(e).is_ok());
    }
}
