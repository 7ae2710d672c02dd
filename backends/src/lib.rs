//! Tracer backends for hoptrace.
//!
//! A [`Tracer`] takes a [`TraceRequest`] (a destination, a [`Method`] and its [`Limits`]) and
//! returns a [`TraceOutput`]: the measurement in scamper's JSON shape, kept byte for byte, plus
//! a normalised [`TraceSummary`] the service maps to its API. Backends return typed
//! [`TraceError`]s and know nothing of gRPC.
//!
//! Implementations:
//! - [`ScamperProcess`]: one `scamper` child per trace, in its own process group, killed as a
//!   group at its deadline and always reaped.
//! - [`ScamperDaemon`]: one supervised `scamper` daemon shared by all traces, driven over its
//!   control socket, one session per trace within a bounded window.

pub mod civil;
pub mod engine;
mod error;
mod netns;
mod output;
mod process_group;
mod request;
pub mod scamper;
pub mod scamper_json;
#[cfg(test)]
mod test_rng;

use async_trait::async_trait;

pub use error::TraceError;
pub use netns::{NetNs, NetNsError};
pub use output::TraceOutput;
pub use request::{Confidence, Limits, Method, Probe, TraceRequest};
pub use scamper::{DaemonOptions, ScamperDaemon, ScamperOptions, ScamperProcess};
pub use scamper_json::{
    Hop, Link, MplsLabel, ReplyKind, ScamperJsonError, TraceKind, TraceSummary,
};

/// Something that can trace the path to a destination.
///
/// Object safe: the service holds an `Arc<dyn Tracer>` chosen at start-up. Implementations must
/// honour [`Limits::deadline`] themselves (the caller does not cancel them), so that whatever
/// they started (processes, probes) is cleaned up before they return.
#[async_trait]
pub trait Tracer: Send + Sync + std::fmt::Debug {
    /// A short, stable name for the backend ("scamper", "scamper-daemon", "engine"), written
    /// into records and metrics.
    fn name(&self) -> &'static str;

    /// Traces the path to `request.dst`.
    async fn trace(&self, request: &TraceRequest) -> Result<TraceOutput, TraceError>;

    /// Stops what the backend runs in the background (a daemon); traces after it fail.
    async fn shutdown(&self) {}
}
