//! Client subcommands: talk to a running server and print JSON to stdout.

use std::io::Write;

use anyhow::{Context, Result};
use serde_json::json;
use tonic::transport::Channel;

use crate::{
    cli::{ClientArgs, RecordFormat, ReportArgs, SubscribeArgs, TraceArgs},
    proto::{self, hoptrace_client::HoptraceClient},
};

/// Largest record a client accepts (a trace file is at most the ETL's 90 MB).
const MAX_RECORD_BYTES: usize = 96 * 1024 * 1024;

async fn connect(args: &ClientArgs) -> Result<HoptraceClient<Channel>> {
    let channel = Channel::from_shared(args.server.clone())
        .with_context(|| {
            format!(
                "{:?} is not a server URL (e.g. http://127.0.0.1:9383)",
                args.server
            )
        })?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.server))?;
    Ok(HoptraceClient::new(channel).max_decoding_message_size(MAX_RECORD_BYTES))
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// A record as one JSON object (the `summary` format).
pub fn record_summary(r: &proto::TraceRecord) -> serde_json::Value {
    let hops: Vec<_> = r
        .hops
        .iter()
        .map(|h| {
            let mut hop = json!({
                "ttl": h.ttl,
                "addr": h.address,
                "rtts_ms": h.rtts_ms,
                "kind": proto::ReplyKind::try_from(h.kind)
                    .map_or("UNKNOWN", |k| k.as_str_name().trim_start_matches("REPLY_KIND_")),
            });
            if !h.mpls_labels.is_empty() {
                let labels: Vec<_> = (h.mpls_labels.iter())
                    .map(|l| json!({"label": l.label, "exp": l.exp, "s": l.bottom_of_stack, "ttl": l.ttl}))
                    .collect();
                hop["mpls_labels"] = json!(labels);
            }
            hop
        })
        .collect();
    let links: Vec<_> = r.links.iter().map(|l| json!([l.from, l.to])).collect();
    json!({
        "cursor": r.cursor,
        "uuid": r.uuid,
        "destination": r.destination,
        "backend": r.backend,
        "method": r.method,
        "cached": r.cached_result,
        "cached_uuid": r.cached_uuid,
        "start_time": r.start_time.as_ref().map_or(0, |t| t.seconds),
        "path": r.path,
        "hops": hops,
        "links": links,
        "labels": r.labels,
    })
}

/// Writes to stdout and flushes (a subscriber's reader sees each record at once). A closed
/// pipe (`hoptrace subscribe | head`) surfaces as an `io::Error` of kind `BrokenPipe`, which
/// `main` treats as a normal end.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn print_record(r: &proto::TraceRecord, format: RecordFormat) -> Result<()> {
    match format {
        RecordFormat::Summary => emit(&format!("{}\n", record_summary(r))),
        RecordFormat::File => emit(&r.contents),
    }
}

/// `hoptrace trace`.
pub async fn trace(args: TraceArgs) -> Result<()> {
    let mut client = connect(&args.client).await?;
    let record = client
        .trace(proto::TraceRequest {
            address: args.address,
            connection_id: args.id.unwrap_or_default(),
            allow_cached: args.allow_cached,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print_record(&record, args.format)
}

/// `hoptrace subscribe`.
pub async fn subscribe(args: SubscribeArgs) -> Result<()> {
    let mut client = connect(&args.client).await?;
    let mut stream = client
        .subscribe(proto::SubscribeRequest {
            after_cursor: args.after.unwrap_or_default(),
            destination_prefix: args.prefix.unwrap_or_default(),
            backend: args.backend.unwrap_or_default(),
            cached: args.cached,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut printed = 0;
    while args.count.is_none_or(|n| printed < n) {
        let Some(message) = stream.message().await.map_err(status_error)? else {
            break;
        };
        match message.event {
            Some(proto::subscribe_response::Event::Record(r)) => {
                print_record(&r, args.format)?;
                printed += 1;
            }
            Some(proto::subscribe_response::Event::Lag(lag)) => {
                eprintln!(
                    "hoptrace: lag: {} (missed {}, after {:?}, resumed at {:?})",
                    lag.reason, lag.missed, lag.after_cursor, lag.resumed_cursor
                );
            }
            None => {}
        }
    }
    Ok(())
}

/// `hoptrace report`.
pub async fn report(args: ReportArgs) -> Result<()> {
    let mut client = connect(&args.client).await?;
    let reply = client
        .report_close(proto::CloseEvent {
            connection_id: args.id,
            local_addr: args.local.ip().to_string(),
            local_port: u32::from(args.local.port()),
            remote_addr: args.remote.ip().to_string(),
            remote_port: u32::from(args.remote.port()),
            close_time: Some(std::time::SystemTime::now().into()),
            labels: args.labels.into_iter().collect(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let disposition = proto::Disposition::try_from(reply.disposition).map_or("UNKNOWN", |d| {
        d.as_str_name().trim_start_matches("DISPOSITION_")
    });
    emit(&format!(
        "{}\n",
        json!({"disposition": disposition, "reason": reply.reason})
    ))
}

/// `hoptrace status`.
pub async fn status(args: ClientArgs) -> Result<()> {
    let mut client = connect(&args).await?;
    let s = client
        .status(proto::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let cache = s.cache.unwrap_or_default();
    let queue = s.queue.unwrap_or_default();
    let o = s.outcomes.unwrap_or_default();
    emit(&format!(
        "{:#}\n",
        json!({
            "version": s.version,
            "backend": s.backend,
            "cache": {"entries": cache.entries, "capacity": cache.capacity, "in_flight": cache.in_flight,
                      "hits": cache.hits, "misses": cache.misses, "waits": cache.waits, "evictions": cache.evictions},
            "queue": {"depth": queue.depth, "capacity": queue.capacity, "running": queue.running, "concurrency": queue.concurrency},
            "outcomes": {"accepted": o.accepted, "traced": o.traced, "cached": o.cached, "refused": o.refused,
                         "failed": o.failed, "aborted": o.aborted, "pending": o.pending, "invalid": o.invalid},
            "refused_by_reason": s.refused_by_reason,
            "failed_by_reason": s.failed_by_reason,
            "events_by_source": s.events_by_source,
            "subscribers": s.subscribers,
            "store_write_failures": s.store_write_failures,
        })
    ))
}
