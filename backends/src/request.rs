//! What a caller asks a tracer for.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

/// The transport a probe uses. The flow identifiers a load balancer hashes stay constant along
/// one path (Paris rule) for every kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Probe {
    /// UDP to a high port; the destination answers port unreachable.
    Udp,
    /// ICMP echo; the destination answers echo reply. Linux ECMP never spreads ICMP.
    Icmp,
    /// TCP SYN; the destination answers RST or SYN-ACK.
    Tcp,
}

/// How the path is explored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// One path, Paris style (scamper `trace`): the file holds a `trace` line.
    Paris(Probe),
    /// Every path, by the multipath detection algorithm (scamper `tracelb`): the file holds a
    /// `tracelb` line.
    Mda(Probe),
}

impl Method {
    /// The probe kind this method sends.
    pub fn probe(self) -> Probe {
        match self {
            Method::Paris(p) | Method::Mda(p) => p,
        }
    }
}

/// Error from parsing a [`Method`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown method {0:?}: expected one of paris-udp, paris-icmp, paris-tcp, mda-udp, mda-icmp, mda-tcp"
)]
pub struct UnknownMethod(String);

impl FromStr for Method {
    type Err = UnknownMethod;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (family, probe) = s
            .split_once('-')
            .ok_or_else(|| UnknownMethod(s.to_owned()))?;
        let probe = match probe {
            "udp" => Probe::Udp,
            "icmp" => Probe::Icmp,
            "tcp" => Probe::Tcp,
            _ => return Err(UnknownMethod(s.to_owned())),
        };
        match family {
            "paris" => Ok(Method::Paris(probe)),
            "mda" => Ok(Method::Mda(probe)),
            _ => Err(UnknownMethod(s.to_owned())),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (family, probe) = match self {
            Method::Paris(p) => ("paris", p),
            Method::Mda(p) => ("mda", p),
        };
        let probe = match probe {
            Probe::Udp => "udp",
            Probe::Icmp => "icmp",
            Probe::Tcp => "tcp",
        };
        write!(f, "{family}-{probe}")
    }
}

/// The confidence of the MDA stopping rule (scamper `tracelb -c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Confidence {
    /// 95%: scamper's default.
    #[default]
    P95,
    /// 99%.
    P99,
}

impl Confidence {
    /// The confidence in percent (scamper's `confidence` key).
    pub fn percent(self) -> u8 {
        match self {
            Confidence::P95 => 95,
            Confidence::P99 => 99,
        }
    }

    /// 95 or 99; anything else is `None`.
    pub fn from_percent(percent: u8) -> Option<Self> {
        match percent {
            95 => Some(Confidence::P95),
            99 => Some(Confidence::P99),
            _ => None,
        }
    }

    /// The probability the stopping rule may miss a next hop: 1 − confidence.
    pub fn failure(self) -> f64 {
        1.0 - f64::from(self.percent()) / 100.0
    }
}

/// Bounds on one trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Highest TTL probed (single path).
    pub max_ttl: u8,
    /// Probes sent per hop before giving up on it.
    pub attempts: u8,
    /// How long to wait for a reply to a probe.
    pub wait: Duration,
    /// Most probes one multipath trace may send.
    pub probe_budget: u32,
    /// The multipath stopping rule's confidence.
    pub confidence: Confidence,
    /// Wall-clock bound on the whole trace; past it the trace fails with
    /// [`TraceError::Timeout`](crate::TraceError::Timeout).
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_ttl: 30,
            attempts: 2,
            wait: Duration::from_secs(2),
            probe_budget: 3000,
            confidence: Confidence::P95,
            deadline: Duration::from_secs(120),
        }
    }
}

/// How far ahead an instant is taken when the one asked for is past what `Instant` holds: a
/// year, as good as never for a trace.
const NEVER: Duration = Duration::from_secs(365 * 86_400);

/// `start + after`, or [`NEVER`] after `start` when that overflows (a deadline may be any
/// `Duration`).
pub(crate) fn instant_after(start: std::time::Instant, after: Duration) -> std::time::Instant {
    start.checked_add(after).unwrap_or(start + NEVER)
}

/// One trace to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// The destination.
    pub dst: IpAddr,
    /// How to explore the path.
    pub method: Method,
    /// Bounds on the trace.
    pub limits: Limits,
    /// The first source port of the probes' flow identifiers; the backend chooses when
    /// `None`. Fixing it makes the paths that ECMP hashing picks repeatable.
    pub source_port: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_round_trip_through_their_names() {
        for probe in [Probe::Udp, Probe::Icmp, Probe::Tcp] {
            for method in [Method::Paris(probe), Method::Mda(probe)] {
                assert_eq!(method.to_string().parse::<Method>(), Ok(method));
            }
        }
        assert!("paris".parse::<Method>().is_err());
        assert!("mda-sctp".parse::<Method>().is_err());
        assert!("lb-udp".parse::<Method>().is_err());
    }
}
