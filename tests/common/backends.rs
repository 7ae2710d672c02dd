//! Backends driven directly (without the service), inside a lab.

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use hoptrace_backends::{DaemonOptions, Limits, Method, NetNs, Probe, ScamperDaemon, TraceRequest};

use super::{lab::Lab, server::lab_guarded_scamper};

/// A Paris UDP trace of `dst` with lab-sized limits.
pub fn paris_request(dst: IpAddr, deadline: Duration) -> TraceRequest {
    TraceRequest {
        dst,
        method: Method::Paris(Probe::Udp),
        limits: Limits {
            max_ttl: 8,
            attempts: 2,
            wait: Duration::from_secs(1),
            probe_budget: 100,
            deadline,
        },
        source_port: None,
    }
}

/// A shared scamper daemon whose probes leave from the lab's client namespace (through the
/// lab guard); `options.binary` is replaced by the guard, placed in `dir`.
pub fn lab_daemon(lab: &Lab, dir: &Path, options: DaemonOptions) -> Arc<ScamperDaemon> {
    let scamper = lab_guarded_scamper(lab, dir);
    let netns = Arc::new(NetNs::open(&lab.client_ns()).expect("lab namespace"));
    let options = DaemonOptions {
        binary: scamper.into(),
        ..options
    };
    Arc::new(ScamperDaemon::start(options, Some(netns)).expect("daemon starts"))
}
