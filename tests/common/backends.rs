//! Backends driven directly (without the service), inside a lab.

use std::{path::Path, sync::Arc};

use hoptrace_backends::{DaemonOptions, NetNs, ScamperDaemon};

use super::{lab::Lab, server::lab_guarded_scamper};

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
