//! hoptrace: a per-host traceroute service.
//!
//! Close events arrive (gRPC today), are validated ([`event`]), checked against the
//! destination [`policy`], deduplicated by the IP [`cache`], queued and traced by a backend
//! through the [`pipeline`], written by the [`store`] as M-Lab-compatible JSONL and fanned out
//! by the [`hub`] to subscribers. See `DESIGN.md` for the whole picture.

pub mod backend;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn_id;
pub mod event;
pub mod grpc;
pub mod hub;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod privileges;
pub mod record;
pub mod scheduler;
pub mod server;
pub mod sources;
pub mod store;

/// The generated `hoptrace.v1` API.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod proto {
    tonic::include_proto!("hoptrace.v1");

    /// The encoded descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("hoptrace_descriptor");
}
