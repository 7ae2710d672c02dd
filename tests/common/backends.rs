//! Backends driven directly (without the service), inside a lab.

use std::{path::Path, sync::Arc};

use hoptrace_backends::engine::{Engine, EngineOptions};
use hoptrace_backends::{DaemonOptions, NetNs, ScamperDaemon, ScamperOptions, ScamperProcess};

use super::lab::{Lab, ns_id_of_pid};
use super::server::lab_guarded_scamper;

/// An engine with `options` whose sockets live in the client namespace of `lab`, after
/// asserting that is not this process's namespace.
pub fn lab_engine(lab: &Lab, options: EngineOptions) -> Engine {
    let client = NetNs::open(&lab.client_ns()).expect("open the lab client namespace");
    assert_ne!(
        Lab::ns_id(&lab.client_ns()),
        ns_id_of_pid(std::process::id()),
        "lab client namespace is the test's own namespace"
    );
    assert_eq!(
        client.id().expect("namespace id"),
        Lab::ns_id(&lab.client_ns())
    );
    Engine::open(Some(&client), options).expect("open the engine in the lab")
}

/// One scamper per trace, started inside the lab's client namespace through the lab guard
/// (placed in `dir`).
pub fn lab_scamper(lab: &Lab, dir: &Path) -> ScamperProcess {
    let netns = Arc::new(NetNs::open(&lab.client_ns()).expect("lab namespace"));
    ScamperProcess::new(
        ScamperOptions {
            binary: lab_guarded_scamper(lab, dir).into(),
            pps: None,
        },
        Some(netns),
    )
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
