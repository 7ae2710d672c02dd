//! The pipeline: intake → policy → IP cache → scheduler → backend → store → hub.
//!
//! Every accepted event ends in exactly one terminal state (traced, cached, refused, failed,
//! aborted), each counted, so `accepted = traced + cached + refused + failed + aborted +
//! pending` holds at every moment. The event that starts a trace owns its *flight*; events for
//! the same destination that arrive while it runs wait on it and get cached copies. A flight
//! that ends without a result (queue full, shutdown) settles its owner and waiters too: the
//! [`Flight`] guard does it on drop, so no path can forget them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use hoptrace_backends::{Limits, Method, TraceError, TraceOutput, TraceRequest, Tracer};
use tokio::{
    sync::{RwLock, Semaphore, oneshot, watch},
    time::Instant,
};

use crate::{
    cache::{CacheConfig, IpCache, Lookup},
    conn_id::{ConnectionId, ConnectionIds},
    event::{InvalidEvent, RawEvent, Source},
    hub::Hub,
    metrics::{Metrics, OutcomeLabel, ReasonLabel},
    policy::{Policy, Refusal},
    record::TraceRecord,
    scheduler::{self, Jobs, Scheduler, SchedulerMetrics, scheduler},
    store::{StoreError, TraceStore},
};

/// Failure reasons of the service itself, besides the backends' [`TraceError::KINDS`].
const SERVICE_FAILURES: [&str; 3] = ["recent_failure", "write_failed", "duplicate_id"];

/// Every failure reason a failed event can carry.
pub fn failure_reasons() -> impl Iterator<Item = &'static str> {
    TraceError::KINDS.into_iter().chain(SERVICE_FAILURES)
}

/// What became of an accepted event, when it was not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A new trace was queued.
    Scheduled,
    /// A trace to the destination is running; the event gets a cached copy.
    Joined,
    /// A recent trace was reused; a cached copy is being written.
    Cached,
}

/// Why an event or request was not served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    /// The event is malformed.
    #[error("invalid event: {0}")]
    Invalid(#[from] InvalidEvent),
    /// A request field is malformed.
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// The destination is not traced.
    #[error("destination {dst} refused: {why}")]
    Refused {
        /// The destination.
        dst: IpAddr,
        /// Why.
        why: Refusal,
    },
    /// A recent trace to the destination failed; it is not retried yet.
    #[error("a recent trace to {dst} failed ({reason}); not retried until the failure expires")]
    RecentlyFailed {
        /// The destination.
        dst: IpAddr,
        /// The failure.
        reason: String,
    },
    /// The trace failed.
    #[error("trace to {dst} failed: {message}")]
    TraceFailed {
        /// The destination.
        dst: IpAddr,
        /// The failure kind.
        kind: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The trace ran but its file could not be written.
    #[error("trace file not written: {0}")]
    Store(String),
    /// The service is shutting down.
    #[error("aborted: the service is shutting down")]
    Aborted,
    /// No such trace.
    #[error("no trace found for {0}")]
    NotFound(String),
}

/// Someone who wants the result of a trace: the event that started it, or one that joined.
#[derive(Debug)]
pub struct Requester {
    id: ConnectionId,
    labels: BTreeMap<String, String>,
    reply: Option<oneshot::Sender<Result<Arc<TraceRecord>, PipelineError>>>,
}

impl Requester {
    fn answer(self, result: Result<Arc<TraceRecord>, PipelineError>) {
        if let Some(reply) = self.reply {
            // The caller may have gone away; the outcome is counted regardless.
            let _ = reply.send(result);
        }
    }
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// How traces explore the path.
    pub method: Method,
    /// Bounds on each trace.
    pub limits: Limits,
    /// First source port of the probes, if fixed.
    pub source_port: Option<u16>,
    /// The IP cache.
    pub cache: CacheConfig,
    /// Traces that may wait in the queue.
    pub queue_capacity: usize,
    /// Traces that may run at once.
    pub concurrency: usize,
    /// Cached copies that may be written at once; reporters wait beyond it.
    pub cached_writes: usize,
    /// Prefix of generated ids for on-demand traces.
    pub on_demand_prefix: String,
    /// Day directories searched when a trace is looked up by id.
    pub lookup_days: usize,
}

/// The queue's receiving end, handed to [`Pipeline::run_workers`].
pub type JobQueue = Jobs<Job>;

/// A queued trace.
#[derive(Debug)]
pub struct Job {
    flight: Flight,
}

/// Ownership of a running trace to one destination. Dropped without [`Flight::take_owner`],
/// it settles the owner and every waiter as aborted.
#[derive(Debug)]
struct Flight {
    pipeline: Arc<Pipeline>,
    dst: IpAddr,
    owner: Option<Requester>,
}

impl Flight {
    fn take_owner(&mut self) -> Option<Requester> {
        self.owner.take()
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            let waiters = self.pipeline.cache.abandon(self.dst);
            self.pipeline
                .settle_all(owner, waiters, "aborted", None, PipelineError::Aborted);
        }
    }
}

/// The service's data path.
#[derive(Debug)]
pub struct Pipeline {
    tracer: Arc<dyn Tracer>,
    policy: Arc<Policy>,
    ids: ConnectionIds,
    cache: IpCache<Arc<TraceRecord>, Requester>,
    store: Arc<TraceStore>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    config: PipelineConfig,
    scheduler: Scheduler<Job>,
    cached_writes: Arc<Semaphore>,
    /// Held (shared) by every finished trace while its file is written and its requesters
    /// answered, in a task of its own that the shutdown grace does not cancel; shutdown takes
    /// it exclusively to wait for them.
    finishing: Arc<RwLock<()>>,
    on_demand_seq: AtomicU64,
}

impl Pipeline {
    /// A pipeline and its queue; start the workers with [`Pipeline::run_workers`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tracer: Arc<dyn Tracer>,
        policy: Arc<Policy>,
        ids: ConnectionIds,
        store: Arc<TraceStore>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        config: PipelineConfig,
    ) -> (Arc<Self>, JobQueue) {
        let (scheduler, jobs) = scheduler(
            config.queue_capacity,
            config.concurrency,
            SchedulerMetrics {
                depth: metrics.queue_depth.clone(),
                wait: metrics.queue_wait.clone(),
            },
        );
        let pipeline = Arc::new(Self {
            tracer,
            policy,
            ids,
            cache: IpCache::new(config.cache, metrics.cache.clone()),
            store,
            hub,
            metrics: Arc::clone(&metrics),
            cached_writes: Arc::new(Semaphore::new(config.cached_writes.max(1))),
            finishing: Arc::new(RwLock::new(())),
            config,
            scheduler,
            on_demand_seq: AtomicU64::new(0),
        });
        (pipeline, jobs)
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.tracer.name()
    }

    /// At shutdown, after the workers have stopped: waits for the finished traces still being
    /// written and answered, then for the cached copies being written, and refuses new ones
    /// (their requesters get [`PipelineError::Aborted`]).
    pub async fn drain(&self) {
        drop(self.finishing.write().await);
        let all = u32::try_from(self.config.cached_writes.max(1)).unwrap_or(u32::MAX);
        if let Ok(permits) = self.cached_writes.acquire_many(all).await {
            self.cached_writes.close();
            drop(permits);
        }
    }

    /// Stops the backend's background work (a daemon), after the workers have stopped.
    pub async fn shutdown_backend(&self) {
        self.tracer.shutdown().await;
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Arc<TraceStore> {
        &self.store
    }

    /// The hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// (done entries, in-flight destinations, capacity) of the IP cache.
    pub fn cache_size(&self) -> (usize, usize, usize) {
        let (done, in_flight) = self.cache.len();
        (done, in_flight, self.cache.capacity())
    }

    /// (queued, queue capacity, running, concurrency).
    pub fn queue_state(&self) -> (usize, usize, u64, usize) {
        self.scheduler.state()
    }

    /// Drops expired cache entries and updates the cache gauge.
    pub fn sweep_cache(&self) {
        self.cache.sweep();
        self.metrics.cache_entries.set(self.cache.len().0 as i64);
    }

    /// Takes in one close event from `source`.
    pub async fn report(
        self: &Arc<Self>,
        raw: RawEvent,
        source: Source,
    ) -> Result<Disposition, PipelineError> {
        let event = raw
            .validate(&self.ids, SystemTime::now())
            .inspect_err(|e| {
                self.metrics
                    .invalid
                    .get_or_create(&ReasonLabel { reason: e.label() })
                    .inc();
            })?;
        self.metrics.accepted(source.label());
        let requester = Requester {
            id: event.id,
            labels: event.labels,
            reply: None,
        };
        self.admit(event.remote.ip(), requester, false).await
    }

    /// Traces `addr` now (or reuses a cached trace when `allow_cached`) and returns the record
    /// once its file is written.
    pub async fn trace_now(
        self: &Arc<Self>,
        addr: &str,
        connection_id: &str,
        allow_cached: bool,
    ) -> Result<Arc<TraceRecord>, PipelineError> {
        let dst: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| PipelineError::BadRequest(format!("{addr:?} is not an IP address")))?;
        let id = if connection_id.is_empty() {
            let seq = self.on_demand_seq.fetch_add(1, Ordering::Relaxed) + 1;
            format!("{}_{seq:016X}", self.config.on_demand_prefix)
        } else {
            connection_id.to_owned()
        };
        let id = self
            .ids
            .validate(&id)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))?;
        self.metrics.accepted(Source::OnDemand.label());
        let (reply, answer) = oneshot::channel();
        let requester = Requester {
            id,
            labels: BTreeMap::new(),
            reply: Some(reply),
        };
        self.admit(dst, requester, !allow_cached).await?;
        answer.await.unwrap_or(Err(PipelineError::Aborted))
    }

    /// Reads a stored trace back by connection id.
    pub async fn get(&self, connection_id: &str) -> Result<TraceRecord, PipelineError> {
        let id = self
            .ids
            .validate(connection_id)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))?;
        let store = Arc::clone(&self.store);
        let days = self.config.lookup_days;
        let found = tokio::task::spawn_blocking(move || store.find(&id, days))
            .await
            .map_err(|e| PipelineError::Store(e.to_string()))?
            .map_err(|e| PipelineError::Store(e.to_string()))?
            .ok_or_else(|| PipelineError::NotFound(connection_id.to_owned()))?;
        TraceRecord::from_file(found, "", BTreeMap::new())
            .map_err(|e| PipelineError::Store(e.to_string()))
    }

    /// Policy, then cache, then queue.
    async fn admit(
        self: &Arc<Self>,
        dst: IpAddr,
        requester: Requester,
        fresh: bool,
    ) -> Result<Disposition, PipelineError> {
        let dst = self.policy.check(dst).map_err(|why| {
            self.metrics.terminal("refused", Some(why.label()), 1);
            PipelineError::Refused { dst, why }
        })?;
        match self.cache.lookup(dst, requester, fresh) {
            Lookup::Hit(original, requester) => {
                self.metrics.traces_skipped.inc();
                if self.spawn_cached_copy(original, requester).await {
                    Ok(Disposition::Cached)
                } else {
                    // Shutting down: no copy will be written (counted aborted).
                    Err(PipelineError::Aborted)
                }
            }
            Lookup::Joined => {
                self.metrics.traces_skipped.inc();
                Ok(Disposition::Joined)
            }
            Lookup::RecentlyFailed(reason, _requester) => {
                self.metrics.terminal("failed", Some("recent_failure"), 1);
                Err(PipelineError::RecentlyFailed { dst, reason })
            }
            Lookup::TooManyWaiters(_requester) => {
                self.metrics
                    .terminal("refused", Some(Refusal::QueueFull.label()), 1);
                Err(PipelineError::Refused {
                    dst,
                    why: Refusal::QueueFull,
                })
            }
            Lookup::Miss(owner) => {
                let flight = Flight {
                    pipeline: Arc::clone(self),
                    dst,
                    owner: Some(owner),
                };
                match self.scheduler.try_submit(Job { flight }) {
                    Ok(()) => Ok(Disposition::Scheduled),
                    Err(mut refused) => {
                        let owner = refused.job.flight.take_owner();
                        let waiters = self.cache.abandon(dst);
                        // Shutting down: aborted, as the queued jobs are; else shed.
                        let (outcome, reason, error) = if refused.stopped {
                            ("aborted", None, PipelineError::Aborted)
                        } else {
                            let why = Refusal::QueueFull;
                            (
                                "refused",
                                Some(why.label()),
                                PipelineError::Refused { dst, why },
                            )
                        };
                        // The owner is answered through the returned error.
                        self.metrics
                            .terminal(outcome, reason, 1 + waiters.len() as u64);
                        drop(owner);
                        for w in waiters {
                            w.answer(Err(error.clone()));
                        }
                        Err(error)
                    }
                }
            }
        }
    }

    /// Counts and answers the owner and waiters of a flight that produced no record.
    fn settle_all(
        &self,
        owner: Requester,
        waiters: Vec<Requester>,
        outcome: &'static str,
        reason: Option<&'static str>,
        error: PipelineError,
    ) {
        self.metrics
            .terminal(outcome, reason, 1 + waiters.len() as u64);
        for r in std::iter::once(owner).chain(waiters) {
            r.answer(Err(error.clone()));
        }
    }

    /// Writes a cached copy of `original` for `requester` in the background, holding one of
    /// the bounded write permits (the caller waits for a permit, not for the write); false
    /// when none will be written because the service is shutting down (the requester is
    /// answered and counted aborted).
    async fn spawn_cached_copy(
        self: &Arc<Self>,
        original: Arc<TraceRecord>,
        requester: Requester,
    ) -> bool {
        // Waiting for a permit happens in the caller's future (a gRPC call that its client
        // may cancel): if it is dropped there, the requester still ends counted, as aborted.
        let mut waiting = Unanswered {
            metrics: &self.metrics,
            requester: Some(requester),
        };
        let permit = Arc::clone(&self.cached_writes).acquire_owned().await;
        let Some(requester) = waiting.requester.take() else {
            return false;
        };
        let Ok(permit) = permit else {
            self.metrics.terminal("aborted", None, 1);
            requester.answer(Err(PipelineError::Aborted));
            return false;
        };
        let pipeline = Arc::clone(self);
        tokio::spawn(async move {
            pipeline.write_cached_copy(&original, requester).await;
            drop(permit);
        });
        true
    }

    async fn write_cached_copy(&self, original: &Arc<TraceRecord>, requester: Requester) {
        let store = Arc::clone(&self.store);
        let (id, measurement) = (requester.id.clone(), original.file.measurement().to_owned());
        let start = original.summary.start_time;
        let original_uuid = original.file.metadata.uuid.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.write(&id, &measurement, start, Some(&original_uuid))
        })
        .await
        .unwrap_or_else(|e| Err(join_error(e)));
        match written {
            Ok(file) => {
                let record = self.hub.publish(TraceRecord {
                    cursor: None,
                    file,
                    backend: original.backend.clone(),
                    summary: original.summary.clone(),
                    labels: requester.labels.clone(),
                });
                self.metrics.terminal("cached", None, 1);
                requester.answer(Ok(record));
            }
            Err(e) => {
                self.metrics
                    .traces_error_caching
                    .get_or_create(&crate::metrics::ErrorLabel { error: e.label() })
                    .inc();
                let reason = self.store_failure(&e, &requester.id);
                self.metrics.terminal("failed", Some(reason), 1);
                requester.answer(Err(PipelineError::Store(e.to_string())));
            }
        }
    }

    /// Logs and counts a store failure; returns the failure reason label.
    fn store_failure(&self, e: &StoreError, id: &ConnectionId) -> &'static str {
        if let StoreError::Exists(_) = e {
            tracing::warn!(connection_id = %id, "not written: a trace file for this id already exists");
            return "duplicate_id";
        }
        self.metrics.store_write_failures.inc();
        tracing::error!(connection_id = %id, error = %e, "trace file not written; the service keeps running");
        "write_failed"
    }

    /// Runs queued traces, at most `concurrency` at once, until `shutdown` turns true. Then
    /// queued traces are aborted and running ones get `grace` to finish before they are
    /// stopped (their process groups killed) and aborted.
    pub async fn run_workers(
        self: Arc<Self>,
        jobs: JobQueue,
        shutdown: watch::Receiver<bool>,
        grace: Duration,
    ) {
        scheduler::run(jobs, shutdown, grace, move |job| {
            Arc::clone(&self).execute(job)
        })
        .await;
    }

    async fn execute(self: Arc<Self>, mut job: Job) {
        let dst = job.flight.dst;
        let request = TraceRequest {
            dst,
            method: self.config.method,
            limits: self.config.limits,
            source_port: self.config.source_port,
        };
        self.metrics.traces_in_progress.inc();
        let started = Instant::now();
        let result = self.tracer.trace(&request).await;
        self.metrics.traces_in_progress.dec();
        self.metrics.traces_performed.inc();
        self.metrics
            .trace_time
            .get_or_create(&OutcomeLabel {
                outcome: if result.is_ok() { "success" } else { "error" },
            })
            .observe(started.elapsed().as_secs_f64());
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                if let Some(owner) = job.flight.take_owner() {
                    self.trace_failed(dst, owner, e);
                }
                return;
            }
        };
        // The trace is done: its file, record and answers must not be lost to the shutdown
        // grace cancelling this task (the file would be written and nobody told), so they
        // run in a task of their own, which shutdown waits for. (Taken without an await, so
        // there is no point where this task could be cancelled holding the owner; only the
        // shutdown takes the lock exclusively, after every worker has ended.)
        let gate = Arc::clone(&self.finishing).try_read_owned().ok();
        let pipeline = Arc::clone(&self);
        let flight = job.flight;
        let finish = tokio::spawn(async move {
            pipeline.finish(flight, output).await;
            drop(gate);
        });
        let _ = finish.await;
    }

    /// Writes the file of a finished trace, publishes and caches its record, answers its
    /// owner and writes the waiters' cached copies. The owner stays in `flight` until the
    /// record is cached: should anything here panic, the flight's drop still settles the
    /// owner and the waiters (aborted) and frees the destination.
    async fn finish(self: Arc<Self>, mut flight: Flight, output: TraceOutput) {
        let dst = flight.dst;
        let start = output.summary.start_time;
        let mut lines = output.lines;
        let file = loop {
            let store = Arc::clone(&self.store);
            let Some(id) = flight.owner.as_ref().map(|o| o.id.clone()) else {
                return;
            };
            let text = std::mem::take(&mut lines);
            let for_store = id.clone();
            let written = tokio::task::spawn_blocking(move || {
                let written = store.write(&for_store, &text, start, None);
                (written, text)
            })
            .await;
            let e = match written {
                Ok((Ok(file), _)) => break file,
                Ok((Err(e), back)) => {
                    lines = back;
                    e
                }
                Err(e) => join_error(e),
            };
            let reason = self.store_failure(&e, &id);
            let error = PipelineError::Store(e.to_string());
            // The owner's id has its file already (a duplicate event): that is the owner's
            // fault alone, and the trace is good: a waiter takes it over under its own id.
            if let StoreError::Exists(_) = e
                && let Some(next) = self.cache.promote(dst)
                && let Some(owner) = flight.owner.replace(next)
            {
                self.metrics.terminal("failed", Some(reason), 1);
                owner.answer(Err(error));
                continue;
            }
            let Some(owner) = flight.take_owner() else {
                return;
            };
            let waiters = self.cache.abandon(dst);
            return self.settle_all(owner, waiters, "failed", Some(reason), error);
        };
        // Durable now: only from here on is the record cached and published.
        let labels = flight.owner.as_ref().map(|o| o.labels.clone());
        let record = self.hub.publish(TraceRecord {
            cursor: None,
            file,
            backend: self.tracer.name().to_owned(),
            summary: output.summary,
            labels: labels.unwrap_or_default(),
        });
        let waiters = self.cache.complete(dst, Ok(Arc::clone(&record)), true);
        let Some(owner) = flight.take_owner() else {
            return;
        };
        self.metrics.terminal("traced", None, 1);
        owner.answer(Ok(Arc::clone(&record)));
        for waiter in waiters {
            self.spawn_cached_copy(Arc::clone(&record), waiter).await;
        }
    }

    fn trace_failed(&self, dst: IpAddr, owner: Requester, e: TraceError) {
        if !matches!(e, TraceError::Timeout(_)) {
            self.metrics.traces_crashed.inc();
        }
        tracing::warn!(%dst, error = %e, "trace failed");
        // A failure of the destination's trace is remembered for the failure lifetime; one of
        // this host (no scamper, no namespace) is not the destination's fault.
        let remember = matches!(
            e,
            TraceError::Timeout(_)
                | TraceError::Exited { .. }
                | TraceError::Output(_)
                | TraceError::OutputTooLarge(_)
        );
        let waiters = self.cache.complete(dst, Err(e.kind().to_owned()), remember);
        let error = PipelineError::TraceFailed {
            dst,
            kind: e.kind(),
            message: e.to_string(),
        };
        self.settle_all(owner, waiters, "failed", Some(e.kind()), error);
    }
}

/// A requester not yet answered; dropped so (its future cancelled), it is counted aborted.
struct Unanswered<'a> {
    metrics: &'a Metrics,
    requester: Option<Requester>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.requester.is_some() {
            self.metrics.terminal("aborted", None, 1);
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        op: "write (task failed)",
        path: Default::default(),
        source: std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::num::NonZeroUsize;
    use std::time::Duration;

    use async_trait::async_trait;
    use hoptrace_backends::{Limits, Probe};
    use tokio::sync::Notify;

    use super::*;
    use crate::cache::CacheConfig;
    use crate::event::{InvalidEvent, RawEvent, Source};
    use crate::hub::HubConfig;
    use crate::policy::Refusal;

    const LINES: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/backends/tests/fixtures/scamper-20211212/trace-icmp-paris.json"
    ));
    /// The fixture's `start_time`.
    const START: i64 = 1_795_314_448;
    const DST: &str = "10.77.100.5";

    /// A tracer whose traces end, with the fixture, when the test lets them.
    #[derive(Debug)]
    struct Gated(Arc<Notify>);

    #[async_trait]
    impl Tracer for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }

        async fn trace(
            &self,
            _: &hoptrace_backends::TraceRequest,
        ) -> Result<TraceOutput, TraceError> {
            self.0.notified().await;
            Ok(TraceOutput::from_lines(LINES.as_bytes().to_vec())?)
        }
    }

    struct Setup {
        pipeline: Arc<Pipeline>,
        gate: Arc<Notify>,
        stop: watch::Sender<bool>,
        workers: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let sources: Vec<_> = Source::ALL.iter().map(|s| s.label()).collect();
        let refusals: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        let failures: Vec<_> = failure_reasons().collect();
        let (metrics, _) = Metrics::new(&sources, &refusals, &failures, &InvalidEvent::LABELS);
        let metrics = Arc::new(metrics);
        let gate = Arc::new(Notify::new());
        let hub = HubConfig {
            queue: 16,
            retention: 16,
            max_subscribers: 4,
        };
        let (pipeline, jobs) = Pipeline::new(
            Arc::new(Gated(Arc::clone(&gate))),
            Arc::new(Policy::new(true, vec![], vec![])),
            ConnectionIds::default(),
            Arc::new(TraceStore::open(dir.path(), "t").expect("store")),
            Arc::new(Hub::new(1, hub, metrics.hub.clone())),
            metrics,
            PipelineConfig {
                method: Method::Paris(Probe::Udp),
                limits: Limits::default(),
                source_port: None,
                cache: CacheConfig {
                    ttl: Duration::from_secs(600),
                    failure_ttl: Duration::from_secs(60),
                    capacity: NonZeroUsize::new(16).expect("non-zero"),
                    max_waiters: 16,
                    max_waiters_total: 64,
                },
                queue_capacity: 4,
                concurrency: 2,
                cached_writes: 2,
                on_demand_prefix: "t".into(),
                lookup_days: 31,
            },
        );
        let (stop, stopped) = watch::channel(false);
        let workers =
            tokio::spawn(Arc::clone(&pipeline).run_workers(jobs, stopped, Duration::from_secs(1)));
        Setup {
            pipeline,
            gate,
            stop,
            workers,
            _dir: dir,
        }
    }

    fn event(id: &str) -> RawEvent {
        RawEvent {
            connection_id: id.into(),
            local_addr: "10.77.1.1".into(),
            local_port: 443,
            remote_addr: DST.into(),
            remote_port: 5000,
            close_time: None,
            labels: BTreeMap::new(),
        }
    }

    fn id(s: &str) -> ConnectionId {
        ConnectionIds::default().validate(s).expect("id")
    }

    /// Waits (up to 5 s, in 10 ms steps: the store writes on blocking threads) until `outcome`
    /// was counted `n` times.
    async fn counted(p: &Pipeline, outcome: &'static str, n: u64) {
        for _ in 0..500 {
            if p.metrics().outcome(outcome) >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(p.metrics().outcome(outcome), n, "{outcome}");
    }

    /// The owner's id already has its file (a duplicate event): the owner alone fails, and the
    /// trace is written for the event that waited for it, under that event's own id.
    #[tokio::test]
    async fn a_duplicate_owner_hands_its_trace_to_a_waiter() {
        let s = setup();
        let p = &s.pipeline;
        p.store()
            .write(&id("host_1_A"), LINES, START, None)
            .expect("the earlier file");
        let report = |e| p.report(e, Source::Grpc);
        assert_eq!(
            report(event("host_1_A")).await.expect("host_1_A"),
            Disposition::Scheduled
        );
        assert_eq!(
            report(event("host_1_B")).await.expect("host_1_B"),
            Disposition::Joined
        );
        assert_eq!(
            report(event("host_1_C")).await.expect("host_1_C"),
            Disposition::Joined
        );
        s.gate.notify_one();
        counted(p, "traced", 1).await;
        counted(p, "cached", 1).await;
        assert_eq!(p.metrics().outcome("failed"), 1, "the owner only");
        let b = p.store().find(&id("host_1_B"), 31).expect("find");
        assert!(b.is_some(), "the waiter's file");
        assert!(p.get("host_1_C").await.is_ok(), "the other waiter's copy");
    }

    /// After the drain at shutdown no cached copy is written: a hit then is aborted, and its
    /// reporter is told so rather than that a copy is coming.
    #[tokio::test]
    async fn a_cache_hit_after_the_drain_is_aborted() {
        let s = setup();
        let p = &s.pipeline;
        let report = |e| p.report(e, Source::Grpc);
        assert_eq!(
            report(event("host_1_A")).await.expect("host_1_A"),
            Disposition::Scheduled
        );
        s.gate.notify_one();
        counted(p, "traced", 1).await;
        s.stop.send(true).expect("workers listen");
        s.workers.await.expect("workers end");
        p.drain().await;
        let late = report(event("host_1_B")).await;
        assert!(matches!(late, Err(PipelineError::Aborted)), "{late:?}");
        assert_eq!(p.metrics().outcome("aborted"), 1);
        assert_eq!(p.metrics().outcome("cached"), 0);
    }
}
