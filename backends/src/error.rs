//! Typed errors every backend returns.

use std::{process::ExitStatus, time::Duration};

use crate::{NetNsError, ScamperJsonError};

/// Why a trace produced no result.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The trace ran past its deadline and was stopped.
    #[error("trace timed out after {0:?}")]
    Timeout(Duration),
    /// The tracer program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program that was started.
        program: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The tracer program exited unsuccessfully.
    #[error("{program} exited with {status}: {stderr}")]
    Exited {
        /// The program that ran.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// The first 4 KiB of what it wrote to stderr (where scamper says why).
        stderr: String,
    },
    /// The tracer's output is not a valid measurement.
    #[error("unusable output: {0}")]
    Output(#[from] ScamperJsonError),
    /// The tracer wrote more than the bound on one trace's output.
    #[error("output larger than {0} bytes")]
    OutputTooLarge(usize),
    /// The network namespace for probes is not usable.
    #[error(transparent)]
    Namespace(#[from] NetNsError),
    /// The shared scamper daemon is not running, or went away during the trace.
    #[error("scamper daemon unavailable: {0}")]
    DaemonUnavailable(String),
    /// The daemon refused the command (`ERR …`).
    #[error("scamper daemon refused the command: {0}")]
    Refused(String),
    /// The daemon's control stream broke the protocol.
    #[error("scamper control protocol: {0}")]
    Protocol(crate::scamper::control::ControlError),
    /// The in-process engine could not probe (sockets, routes, sends).
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    /// The backend cannot run this kind of trace.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Reading from or waiting for the tracer failed.
    #[error("i/o with the tracer: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::scamper::control::ControlError> for TraceError {
    /// A broken control stream is a protocol error, except one DATA frame over the output
    /// bound: output too large, as several frames adding up to it are (and as the process
    /// backend says).
    fn from(e: crate::scamper::control::ControlError) -> Self {
        use crate::scamper::control::ControlError;
        match e {
            ControlError::FrameTooLarge(n) => TraceError::OutputTooLarge(n),
            e => TraceError::Protocol(e),
        }
    }
}

impl TraceError {
    /// Every [`TraceError::kind`] label, for metrics that list them up front.
    pub const KINDS: [&'static str; 12] = [
        "timeout",
        "spawn",
        "exited",
        "bad_output",
        "output_too_large",
        "netns",
        "daemon_unavailable",
        "refused",
        "protocol",
        "engine",
        "unsupported",
        "io",
    ];

    /// A short, stable label for metrics and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            TraceError::Timeout(_) => "timeout",
            TraceError::Spawn { .. } => "spawn",
            TraceError::Exited { .. } => "exited",
            TraceError::Output(_) => "bad_output",
            TraceError::OutputTooLarge(_) => "output_too_large",
            TraceError::Namespace(_) => "netns",
            TraceError::DaemonUnavailable(_) => "daemon_unavailable",
            TraceError::Refused(_) => "refused",
            TraceError::Protocol(_) => "protocol",
            TraceError::Engine(_) => "engine",
            TraceError::Unsupported(_) => "unsupported",
            TraceError::Io(_) => "io",
        }
    }
}
