//! The trace request the lab tests and benchmarks run: Paris UDP with lab-sized limits.
//! Only std and the backends crate, so benches can include it with `#[path]`.

use std::{net::IpAddr, time::Duration};

use hoptrace_backends::{Confidence, Limits, Method, Probe, TraceRequest};

/// A Paris UDP trace of `dst` (`trace -P udp-paris -q 2 -w 1 -m 8`) with `deadline`.
pub fn paris_request(dst: IpAddr, deadline: Duration) -> TraceRequest {
    TraceRequest {
        dst,
        method: Method::Paris(Probe::Udp),
        limits: Limits {
            max_ttl: 8,
            attempts: 2,
            wait: Duration::from_secs(1),
            probe_budget: 100,
            confidence: Confidence::P95,
            deadline,
        },
        source_port: None,
    }
}
