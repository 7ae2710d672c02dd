//! The command line: `hoptrace serve` and the client subcommands that talk to a running server.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::ServeArgs;

/// Per-host traceroute service: traces the path back to the clients of closed connections,
/// writes M-Lab-compatible JSONL files and streams every trace to subscribers.
#[derive(Debug, Parser)]
#[command(name = "hoptrace", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(Box<ServeArgs>),
    /// Trace an address now through a running server and print the record.
    Trace(TraceArgs),
    /// Print trace records as they are written, one JSON object per line.
    Subscribe(SubscribeArgs),
    /// Report one closed connection to a running server.
    Report(ReportArgs),
    /// Print the server's counters as JSON.
    Status(ClientArgs),
}

/// Where the server is.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The server's gRPC address.
    #[arg(long, env = "HOPTRACE_SERVER", default_value = "http://127.0.0.1:9383")]
    pub server: String,
}

/// How a record is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RecordFormat {
    /// One JSON object per record: cursor, ids, destination, backend, hops.
    Summary,
    /// The trace file itself (four JSON lines per record).
    File,
}

/// `hoptrace trace`.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// Address to trace.
    pub address: String,
    /// Connection id for the file (generated when absent).
    #[arg(long)]
    pub id: Option<String>,
    /// Reuse a cached trace of the address if there is one.
    #[arg(long)]
    pub allow_cached: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "summary")]
    pub format: RecordFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// `hoptrace subscribe`.
#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// Resume after this cursor (printed with every record).
    #[arg(long, env = "HOPTRACE_AFTER")]
    pub after: Option<String>,
    /// Only destinations inside this prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only records from this backend.
    #[arg(long)]
    pub backend: Option<String>,
    /// Only cached (true) or only fresh (false) records.
    #[arg(long)]
    pub cached: Option<bool>,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value = "summary")]
    pub format: RecordFormat,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// `hoptrace report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Connection id (becomes the trace file's UUID).
    #[arg(long)]
    pub id: String,
    /// This host's end of the connection, ADDR:PORT.
    #[arg(long)]
    pub local: SocketAddr,
    /// The remote end, ADDR:PORT: the destination traced.
    #[arg(long)]
    pub remote: SocketAddr,
    /// Labels, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}
