//! The `hoptrace.v1.Hoptrace` gRPC service: proto ⇄ domain conversions, and the one place
//! where pipeline errors become `tonic::Status`.

use std::{collections::BTreeMap, net::IpAddr, pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use hoptrace_backends::{ReplyKind, TraceKind};
use ipnet::IpNet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    event::{RawEvent, Source},
    hub::{Filter, SubscriptionEvent},
    metrics::{OUTCOMES, OutcomeLabel, ReasonLabel, SourceLabel},
    pipeline::{Disposition, Pipeline, PipelineError, failure_reasons},
    policy::Refusal,
    proto::{self, hoptrace_server::Hoptrace},
    record::{Cursor, TraceRecord},
};

/// Rejections listed in a `ReportCloses` summary; the rest are only counted.
const MAX_REJECTIONS_LISTED: usize = 100;

/// Events buffered towards one subscriber's gRPC stream.
const SUBSCRIBER_STREAM_BUFFER: usize = 64;

/// The gRPC face of the pipeline.
#[derive(Debug, Clone)]
pub struct HoptraceService {
    pipeline: Arc<Pipeline>,
    version: String,
}

impl HoptraceService {
    /// Serves `pipeline`; `version` is reported by `Status`.
    pub fn new(pipeline: Arc<Pipeline>, version: String) -> Self {
        Self { pipeline, version }
    }
}

/// The single mapping from pipeline errors to gRPC statuses.
impl From<PipelineError> for Status {
    fn from(e: PipelineError) -> Self {
        let message = e.to_string();
        match e {
            PipelineError::Invalid(_) | PipelineError::BadRequest(_) => {
                Status::invalid_argument(message)
            }
            PipelineError::Refused {
                why: Refusal::QueueFull,
                ..
            } => Status::resource_exhausted(message),
            PipelineError::Refused { .. } | PipelineError::RecentlyFailed { .. } => {
                Status::failed_precondition(message)
            }
            PipelineError::TraceFailed {
                kind: "timeout", ..
            } => Status::deadline_exceeded(message),
            PipelineError::TraceFailed { .. } | PipelineError::Store(_) => {
                Status::internal(message)
            }
            PipelineError::Aborted => Status::unavailable(message),
            PipelineError::NotFound(_) => Status::not_found(message),
        }
    }
}

fn disposition_of(result: &Result<Disposition, PipelineError>) -> proto::Disposition {
    use proto::Disposition as D;
    match result {
        Ok(Disposition::Scheduled) => D::Scheduled,
        Ok(Disposition::Joined) => D::Joined,
        Ok(Disposition::Cached) => D::Cached,
        Err(PipelineError::Invalid(_) | PipelineError::BadRequest(_)) => D::Invalid,
        Err(PipelineError::Refused {
            why: Refusal::QueueFull,
            ..
        }) => D::Shed,
        Err(PipelineError::Refused { .. }) => D::Refused,
        Err(PipelineError::RecentlyFailed { .. }) => D::RecentlyFailed,
        Err(_) => D::Unspecified,
    }
}

fn raw_event(e: proto::CloseEvent) -> RawEvent {
    RawEvent {
        connection_id: e.connection_id,
        local_addr: e.local_addr,
        local_port: e.local_port,
        remote_addr: e.remote_addr,
        remote_port: e.remote_port,
        close_time: e.close_time.map(|t| (t.seconds, t.nanos)),
        labels: e.labels.into_iter().collect(),
    }
}

fn reply_kind(kind: ReplyKind) -> proto::ReplyKind {
    match kind {
        ReplyKind::TimeExceeded => proto::ReplyKind::TimeExceeded,
        ReplyKind::Unreachable => proto::ReplyKind::Unreachable,
        ReplyKind::EchoReply => proto::ReplyKind::EchoReply,
        ReplyKind::Tcp => proto::ReplyKind::Tcp,
        ReplyKind::Other => proto::ReplyKind::Other,
    }
}

fn addr_or_star(addr: Option<IpAddr>) -> String {
    addr.map_or_else(|| "*".to_owned(), |a| a.to_string())
}

/// A domain record as the API's record.
pub fn record_to_proto(r: &TraceRecord) -> proto::TraceRecord {
    let s = &r.summary;
    proto::TraceRecord {
        cursor: r.cursor.map(|c| c.to_string()).unwrap_or_default(),
        uuid: r.file.metadata.uuid.clone(),
        traceroute_caller_version: r.file.metadata.version.clone(),
        cached_result: r.file.metadata.cached,
        cached_uuid: r.file.metadata.cached_uuid.clone(),
        backend: r.backend.clone(),
        destination: s.dst.to_string(),
        start_time: Some(prost_types::Timestamp {
            seconds: s.start_time,
            nanos: 0,
        }),
        kind: match s.kind {
            TraceKind::SinglePath => proto::TraceKind::SinglePath,
            TraceKind::Multipath => proto::TraceKind::Multipath,
        } as i32,
        method: s.method.clone(),
        hops: s
            .hops
            .iter()
            .map(|h| proto::Hop {
                ttl: u32::from(h.ttl),
                address: h.addr.to_string(),
                rtts_ms: h.rtts_ms.clone(),
                kind: reply_kind(h.kind) as i32,
                mpls_labels: (h.mpls_labels.iter())
                    .map(|l| proto::MplsLabel {
                        label: l.label,
                        exp: u32::from(l.exp),
                        bottom_of_stack: l.bottom,
                        ttl: u32::from(l.ttl),
                    })
                    .collect(),
            })
            .collect(),
        links: s
            .links
            .iter()
            .map(|l| proto::Link {
                from: addr_or_star(l.from),
                to: addr_or_star(l.to),
            })
            .collect(),
        path: r.file.rel_path.clone(),
        contents: r.file.contents.clone(),
        labels: r.labels.clone().into_iter().collect(),
    }
}

fn subscription_to_proto(event: SubscriptionEvent) -> proto::SubscribeResponse {
    use proto::subscribe_response::Event;
    let event = match event {
        SubscriptionEvent::Record(r) => Event::Record(record_to_proto(&r)),
        SubscriptionEvent::Lag(lag) => Event::Lag(proto::Lag {
            after_cursor: lag.after.map(|c| c.to_string()).unwrap_or_default(),
            resumed_cursor: lag.resumed.map(|c| c.to_string()).unwrap_or_default(),
            missed: lag.missed,
            reason: lag.reason,
        }),
    };
    proto::SubscribeResponse { event: Some(event) }
}

/// A destination prefix: CIDR, or one address.
fn parse_prefix(text: &str) -> Result<IpNet, Status> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| {
            Status::invalid_argument(format!(
                "destination_prefix {text:?} is neither a CIDR prefix nor an address"
            ))
        })
}

type SubscribeStream =
    Pin<Box<dyn Stream<Item = Result<proto::SubscribeResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Hoptrace for HoptraceService {
    async fn report_close(
        &self,
        request: Request<proto::CloseEvent>,
    ) -> Result<Response<proto::ReportCloseResponse>, Status> {
        let result = self
            .pipeline
            .report(raw_event(request.into_inner()), Source::Grpc)
            .await;
        let disposition = disposition_of(&result);
        match result {
            Ok(_) => Ok(Response::new(proto::ReportCloseResponse {
                disposition: disposition as i32,
                reason: String::new(),
            })),
            // A recent failure is an expected outcome for a reporter, not an error.
            Err(e @ PipelineError::RecentlyFailed { .. }) => {
                Ok(Response::new(proto::ReportCloseResponse {
                    disposition: disposition as i32,
                    reason: e.to_string(),
                }))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn report_closes(
        &self,
        request: Request<Streaming<proto::CloseEvent>>,
    ) -> Result<Response<proto::ReportClosesResponse>, Status> {
        let mut events = request.into_inner();
        let mut summary = proto::ReportClosesResponse::default();
        loop {
            let event = match events.message().await {
                Ok(Some(event)) => event,
                Ok(None) => break,
                // A message that cannot be read (over --max-request-bytes, not protobuf) ends
                // the stream; the events before it are already accepted, so their summary is
                // still the answer, with the break listed where it happened.
                Err(status) => {
                    tracing::warn!(after = summary.received, error = %status, "event stream broke");
                    summary.rejections.push(proto::Rejection {
                        index: summary.received,
                        connection_id: String::new(),
                        disposition: proto::Disposition::Invalid as i32,
                        reason: format!(
                            "the stream broke here, nothing after it was read: {}",
                            status.message()
                        ),
                    });
                    break;
                }
            };
            let index = summary.received;
            summary.received += 1;
            let connection_id = event.connection_id.clone();
            let result = self
                .pipeline
                .report(raw_event(event), Source::GrpcStream)
                .await;
            let disposition = disposition_of(&result);
            *summary
                .dispositions
                .entry(
                    disposition
                        .as_str_name()
                        .trim_start_matches("DISPOSITION_")
                        .to_owned(),
                )
                .or_default() += 1;
            if let Err(e) = result
                && summary.rejections.len() < MAX_REJECTIONS_LISTED
            {
                summary.rejections.push(proto::Rejection {
                    index,
                    connection_id: connection_id.chars().take(200).collect(),
                    disposition: disposition as i32,
                    reason: e.to_string(),
                });
            }
        }
        Ok(Response::new(summary))
    }

    async fn trace(
        &self,
        request: Request<proto::TraceRequest>,
    ) -> Result<Response<proto::TraceRecord>, Status> {
        let r = request.into_inner();
        let record = self
            .pipeline
            .trace_now(&r.address, &r.connection_id, r.allow_cached)
            .await?;
        Ok(Response::new(record_to_proto(&record)))
    }

    async fn get_trace(
        &self,
        request: Request<proto::GetTraceRequest>,
    ) -> Result<Response<proto::TraceRecord>, Status> {
        let record = self
            .pipeline
            .get(&request.into_inner().connection_id)
            .await?;
        Ok(Response::new(record_to_proto(&record)))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        let after = match r.after_cursor.as_str() {
            "" => None,
            text => Some(
                text.parse::<Cursor>()
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            ),
        };
        let filter = Filter {
            prefix: match r.destination_prefix.as_str() {
                "" => None,
                text => Some(parse_prefix(text)?),
            },
            backend: Some(r.backend).filter(|b| !b.is_empty()),
            cached: r.cached,
        };
        let events = self
            .pipeline
            .hub()
            .subscribe(
                Arc::clone(self.pipeline.store()),
                after,
                filter,
                SUBSCRIBER_STREAM_BUFFER,
            )
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let stream = ReceiverStream::new(events).map(|e| Ok(subscription_to_proto(e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let p = &self.pipeline;
        let m = p.metrics();
        let events_by_source: BTreeMap<String, u64> = Source::ALL
            .iter()
            .map(|s| {
                let source = s.label();
                (
                    source.to_owned(),
                    m.events.get_or_create(&SourceLabel { source }).get(),
                )
            })
            .collect();
        let accepted: u64 = events_by_source.values().sum();
        let outcome =
            |o: &'static str| m.outcomes.get_or_create(&OutcomeLabel { outcome: o }).get();
        let settled: u64 = OUTCOMES.iter().map(|o| outcome(o)).sum();
        let invalid = crate::event::InvalidEvent::LABELS
            .iter()
            .map(|&reason| m.invalid.get_or_create(&ReasonLabel { reason }).get())
            .sum();
        let by_reason = |family: &prometheus_client::metrics::family::Family<
            ReasonLabel,
            prometheus_client::metrics::counter::Counter,
        >,
                         reasons: &mut dyn Iterator<Item = &'static str>| {
            reasons
                .map(|reason| {
                    (
                        reason.to_owned(),
                        family.get_or_create(&ReasonLabel { reason }).get(),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        let (entries, in_flight, capacity) = p.cache_size();
        let (depth, queue_capacity, running, concurrency) = p.queue_state();
        Ok(Response::new(proto::StatusResponse {
            version: self.version.clone(),
            backend: p.backend().to_owned(),
            cache: Some(proto::CacheStatus {
                entries: entries as u64,
                capacity: capacity as u64,
                in_flight: in_flight as u64,
                hits: m.cache.hits.get(),
                misses: m.cache.misses.get(),
                waits: m.cache.waits.get(),
                evictions: m.cache.evictions.get(),
            }),
            queue: Some(proto::QueueStatus {
                depth: depth as u64,
                capacity: queue_capacity as u64,
                running,
                concurrency: concurrency as u64,
            }),
            outcomes: Some(proto::Outcomes {
                accepted,
                traced: outcome("traced"),
                cached: outcome("cached"),
                refused: outcome("refused"),
                failed: outcome("failed"),
                aborted: outcome("aborted"),
                pending: accepted.saturating_sub(settled),
                invalid,
            }),
            refused_by_reason: by_reason(&m.refusals, &mut Refusal::ALL.iter().map(|r| r.label())),
            failed_by_reason: by_reason(&m.failures, &mut failure_reasons()),
            events_by_source: events_by_source.into_iter().collect(),
            subscribers: m.hub.subscribers.get().max(0) as u64,
            store_write_failures: m.store_write_failures.get(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hops_mpls_labels_reach_the_api_record() {
        use crate::store::StoredFile;
        let lines = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/backends/tests/fixtures/scamper-20211212/trace-icmp-paris.json"
        ));
        let ttl2 = r#""icmp_q_ipl":44, "icmp_q_tos":0},{"addr":"10.77.3.2""#;
        let labelled = ttl2.replacen(
            "},",
            r#", "icmpext":[{"ie_cn":1,"ie_ct":1,"ie_dl":4,"mpls_labels":[{"mpls_ttl":1,"mpls_s":1,"mpls_exp":2,"mpls_label":24001}]}]},"#,
            1,
        );
        assert!(lines.contains(ttl2));
        let contents = format!(
            "{}\n{}",
            r#"{"UUID":"host_1_2","TracerouteCallerVersion":"t","CachedResult":false,"CachedUUID":""}"#,
            lines.replacen(ttl2, &labelled, 1)
        );
        let file = StoredFile::parse("2026/11/29/x_host_1_2.jsonl".into(), contents).expect("file");
        let record = TraceRecord::from_file(file, "scamper", BTreeMap::new()).expect("record");
        let hops = record_to_proto(&record).hops;
        let labels: Vec<(u32, Vec<proto::MplsLabel>)> = (hops.into_iter())
            .filter(|h| !h.mpls_labels.is_empty())
            .map(|h| (h.ttl, h.mpls_labels))
            .collect();
        let label = proto::MplsLabel {
            label: 24001,
            exp: 2,
            bottom_of_stack: true,
            ttl: 1,
        };
        assert_eq!(labels, [(2, vec![label])]);
    }

    #[test]
    fn errors_map_to_statuses_in_one_place() {
        let dst: IpAddr = "10.0.0.1".parse().expect("addr");
        let cases: Vec<(PipelineError, tonic::Code)> = vec![
            (
                PipelineError::BadRequest("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                PipelineError::Refused {
                    dst,
                    why: Refusal::Private,
                },
                tonic::Code::FailedPrecondition,
            ),
            (
                PipelineError::Refused {
                    dst,
                    why: Refusal::QueueFull,
                },
                tonic::Code::ResourceExhausted,
            ),
            (
                PipelineError::TraceFailed {
                    dst,
                    kind: "timeout",
                    message: "t".into(),
                },
                tonic::Code::DeadlineExceeded,
            ),
            (
                PipelineError::TraceFailed {
                    dst,
                    kind: "exited",
                    message: "e".into(),
                },
                tonic::Code::Internal,
            ),
            (PipelineError::Aborted, tonic::Code::Unavailable),
            (PipelineError::NotFound("id".into()), tonic::Code::NotFound),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }

    #[test]
    fn prefixes_accept_cidrs_and_single_addresses() {
        assert_eq!(
            parse_prefix("10.77.100.9/24").expect("cidr"),
            "10.77.100.0/24".parse::<IpNet>().expect("net")
        );
        assert_eq!(
            parse_prefix("fd77:100::5").expect("addr"),
            "fd77:100::5/128".parse::<IpNet>().expect("net")
        );
        assert!(parse_prefix("nonsense").is_err());
    }
}
