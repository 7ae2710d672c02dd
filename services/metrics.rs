//! Prometheus metrics. traceroute-caller's names where the meaning is the same
//! (`traces_performed_total`, `traces_in_progress`, `trace_time_seconds`, …), `hoptrace_*` for
//! the rest. The status call reads the same counters, so the two never disagree.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    cache::CacheCounters,
    hub::HubCounters,
    sources::{host_sockets::HostSocketsCounters, tcpinfo::TcpInfoCounters},
};

/// A metric label holding one word from a fixed set.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// Where events came from.
    pub source: &'static str,
}

/// A reason label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// An outcome label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What happened.
    pub outcome: &'static str,
}

/// An error label (traceroute-caller's `traces_error_caching_total{error}`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// Which error.
    pub error: &'static str,
}

/// The in-process engine's counters (zero with another backend).
#[derive(Debug, Clone, Default)]
pub struct EngineMetrics {
    /// Probes by outcome: `sent`, `lost` (the kernel's send queue was full).
    pub probes: Family<OutcomeLabel, Counter>,
    /// Packets read by outcome: `reply` (to a running trace), `stray` (not an authentic reply
    /// to our probes), `late` (for a flow no trace runs), `duplicate` (a second answer to one
    /// probe, dropped).
    pub packets: Family<OutcomeLabel, Counter>,
    /// Packets the kernel dropped on the engine's receive sockets (`SO_RXQ_OVFL`).
    pub kernel_drops: Counter,
    /// Probes held back for a router that showed an ICMP rate limit.
    pub router_paced: Counter,
    /// Replies without the kernel's receive time (their RTT includes the wait to be read).
    pub unstamped: Counter,
    /// Routers paced now for their ICMP rate limit.
    pub limited_routers: Gauge,
}

impl EngineMetrics {
    /// Adds what changed from `before` to `now`.
    pub fn add(
        &self,
        before: &hoptrace_backends::engine::EngineStats,
        now: &hoptrace_backends::engine::EngineStats,
    ) {
        let inc = |family: &Family<OutcomeLabel, Counter>, outcome, a: u64, b: u64| {
            family
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(b.saturating_sub(a));
        };
        inc(&self.probes, "sent", before.probes_sent, now.probes_sent);
        inc(&self.probes, "lost", before.probes_lost, now.probes_lost);
        inc(&self.packets, "reply", before.replies, now.replies);
        inc(&self.packets, "stray", before.strays, now.strays);
        inc(&self.packets, "late", before.late, now.late);
        inc(
            &self.packets,
            "duplicate",
            before.duplicates,
            now.duplicates,
        );
        self.kernel_drops
            .inc_by(now.kernel_drops.saturating_sub(before.kernel_drops));
        self.router_paced
            .inc_by(now.router_paced.saturating_sub(before.router_paced));
        self.unstamped
            .inc_by(now.unstamped.saturating_sub(before.unstamped));
        self.limited_routers
            .set(i64::try_from(now.limited_routers).unwrap_or(i64::MAX));
    }
}

/// The terminal states of an accepted event.
pub const OUTCOMES: [&str; 5] = ["traced", "cached", "refused", "failed", "aborted"];

/// Every metric of the service.
#[derive(Debug)]
pub struct Metrics {
    /// Events received, by source (accepted ones; malformed are in `invalid`).
    pub events: Family<SourceLabel, Counter>,
    /// Malformed events, by what was wrong.
    pub invalid: Family<ReasonLabel, Counter>,
    /// Accepted events by terminal state.
    pub outcomes: Family<OutcomeLabel, Counter>,
    /// Refused events by reason.
    pub refusals: Family<ReasonLabel, Counter>,
    /// Failed events by reason.
    pub failures: Family<ReasonLabel, Counter>,
    /// The IP cache's counters.
    pub cache: CacheCounters,
    /// Done entries in the IP cache.
    pub cache_entries: Gauge,
    /// Traces waiting in the queue.
    pub queue_depth: Gauge,
    /// Time from queueing to start.
    pub queue_wait: Histogram,
    /// Trace duration by outcome (success, error).
    pub trace_time: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    /// Traces run by the backend.
    pub traces_performed: Counter,
    /// Traces running now.
    pub traces_in_progress: Gauge,
    /// Traces whose backend failed in a way other than a timeout.
    pub traces_crashed: Counter,
    /// Events that caused no trace because a recent or running one was reused.
    pub traces_skipped: Counter,
    /// Cached copies that could not be written, by error.
    pub traces_error_caching: Family<ErrorLabel, Counter>,
    /// Trace files that could not be written (full disk, read-only directory, …).
    pub store_write_failures: Counter,
    /// The hub's counters.
    pub hub: HubCounters,
    /// The tcp-info source's counters.
    pub tcpinfo: TcpInfoCounters,
    /// The host socket watcher's counters.
    pub host_sockets: HostSocketsCounters,
    /// The in-process engine's counters.
    pub engine: EngineMetrics,
}

fn duration_histogram() -> Histogram {
    // 1 ms … ~33 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

impl Metrics {
    /// Metrics with every label of the fixed sets present (at zero), and their registry.
    pub fn new(
        sources: &[&'static str],
        refusals: &[&'static str],
        failures: &[&'static str],
        invalid: &[&'static str],
    ) -> (Self, Registry) {
        let metrics = Self {
            events: Family::default(),
            invalid: Family::default(),
            outcomes: Family::default(),
            refusals: Family::default(),
            failures: Family::default(),
            cache: CacheCounters::default(),
            cache_entries: Gauge::default(),
            queue_depth: Gauge::default(),
            queue_wait: duration_histogram(),
            trace_time: Family::new_with_constructor(duration_histogram),
            traces_performed: Counter::default(),
            traces_in_progress: Gauge::default(),
            traces_crashed: Counter::default(),
            traces_skipped: Counter::default(),
            traces_error_caching: Family::default(),
            store_write_failures: Counter::default(),
            hub: HubCounters::default(),
            tcpinfo: TcpInfoCounters::default(),
            host_sockets: HostSocketsCounters::default(),
            engine: EngineMetrics::default(),
        };
        for outcome in ["sent", "lost"] {
            let _ = metrics
                .engine
                .probes
                .get_or_create(&OutcomeLabel { outcome });
        }
        for outcome in ["reply", "stray", "late", "duplicate"] {
            let _ = metrics
                .engine
                .packets
                .get_or_create(&OutcomeLabel { outcome });
        }
        for reason in crate::sources::host_sockets::OUTCOMES {
            let _ = metrics
                .host_sockets
                .sockets
                .get_or_create(&ReasonLabel { reason });
        }
        for reason in crate::sources::tcpinfo::LINE_KINDS {
            let _ = metrics.tcpinfo.lines.get_or_create(&ReasonLabel { reason });
        }
        for &source in sources {
            let _ = metrics.events.get_or_create(&SourceLabel { source });
        }
        for outcome in ["success", "error"] {
            let _ = metrics.trace_time.get_or_create(&OutcomeLabel { outcome });
        }
        for &outcome in &OUTCOMES {
            let _ = metrics.outcomes.get_or_create(&OutcomeLabel { outcome });
        }
        for &reason in refusals {
            let _ = metrics.refusals.get_or_create(&ReasonLabel { reason });
        }
        for &reason in failures {
            let _ = metrics.failures.get_or_create(&ReasonLabel { reason });
        }
        for &reason in invalid {
            let _ = metrics.invalid.get_or_create(&ReasonLabel { reason });
        }
        let mut r = Registry::default();
        r.register(
            "traces_performed",
            "Traces run by the backend",
            metrics.traces_performed.clone(),
        );
        r.register(
            "traces_in_progress",
            "Traces running now",
            metrics.traces_in_progress.clone(),
        );
        r.register(
            "traces_crashed",
            "Traces whose backend failed other than by timing out",
            metrics.traces_crashed.clone(),
        );
        r.register(
            "traces_skipped",
            "Events served by a recent or running trace instead of a new one",
            metrics.traces_skipped.clone(),
        );
        r.register(
            "traces_error_caching",
            "Cached copies that could not be written",
            metrics.traces_error_caching.clone(),
        );
        r.register(
            "trace_time_seconds",
            "Time a trace took, by outcome",
            metrics.trace_time.clone(),
        );
        r.register(
            "hoptrace_events",
            "Accepted close events by source",
            metrics.events.clone(),
        );
        r.register(
            "hoptrace_events_invalid",
            "Malformed events by what was wrong",
            metrics.invalid.clone(),
        );
        r.register(
            "hoptrace_event_outcomes",
            "Accepted events by terminal state",
            metrics.outcomes.clone(),
        );
        r.register(
            "hoptrace_refusals",
            "Refused events by reason",
            metrics.refusals.clone(),
        );
        r.register(
            "hoptrace_failures",
            "Failed events by reason",
            metrics.failures.clone(),
        );
        r.register(
            "hoptrace_cache_hits",
            "IP cache lookups served from a recent trace",
            metrics.cache.hits.clone(),
        );
        r.register(
            "hoptrace_cache_misses",
            "IP cache lookups that started a trace",
            metrics.cache.misses.clone(),
        );
        r.register(
            "hoptrace_cache_waits",
            "IP cache lookups that joined a running trace",
            metrics.cache.waits.clone(),
        );
        r.register(
            "hoptrace_cache_evictions",
            "IP cache entries evicted before they expired",
            metrics.cache.evictions.clone(),
        );
        r.register(
            "hoptrace_cache_entries",
            "Done entries in the IP cache",
            metrics.cache_entries.clone(),
        );
        r.register(
            "hoptrace_queue_depth",
            "Traces waiting in the queue",
            metrics.queue_depth.clone(),
        );
        r.register(
            "hoptrace_queue_wait_seconds",
            "Time traces waited in the queue",
            metrics.queue_wait.clone(),
        );
        r.register(
            "hoptrace_store_write_failures",
            "Trace files that could not be written",
            metrics.store_write_failures.clone(),
        );
        r.register(
            "hoptrace_subscribers",
            "Open subscriptions",
            metrics.hub.subscribers.clone(),
        );
        r.register(
            "hoptrace_subscriber_lags",
            "Times a subscriber fell behind or missed records",
            metrics.hub.lags.clone(),
        );
        r.register(
            "hoptrace_tcpinfo_lines",
            "Lines read from tcp-info's event socket, by kind",
            metrics.tcpinfo.lines.clone(),
        );
        r.register(
            "hoptrace_tcpinfo_connects",
            "Connections made to tcp-info's event socket",
            metrics.tcpinfo.connects.clone(),
        );
        r.register(
            "hoptrace_host_sockets",
            "Destroyed TCP sockets of this host, by what became of them",
            metrics.host_sockets.sockets.clone(),
        );
        r.register(
            "hoptrace_engine_probes",
            "Engine probes by outcome",
            metrics.engine.probes.clone(),
        );
        r.register(
            "hoptrace_engine_packets",
            "Packets the engine read, by outcome",
            metrics.engine.packets.clone(),
        );
        r.register(
            "hoptrace_engine_kernel_drops",
            "Packets the kernel dropped on the engine's receive sockets",
            metrics.engine.kernel_drops.clone(),
        );
        r.register(
            "hoptrace_engine_router_paced",
            "Engine probes held back for a router that showed an ICMP rate limit",
            metrics.engine.router_paced.clone(),
        );
        r.register(
            "hoptrace_engine_unstamped_replies",
            "Engine replies without the kernel's receive time (RTT includes the wait to be read)",
            metrics.engine.unstamped.clone(),
        );
        r.register(
            "hoptrace_engine_limited_routers",
            "Routers the engine paces now for their ICMP rate limit",
            metrics.engine.limited_routers.clone(),
        );
        r.register(
            "hoptrace_tcpinfo_opens",
            "tcp-info opens remembered until their close",
            metrics.tcpinfo.opens.clone(),
        );
        (metrics, r)
    }

    /// Counts an accepted event from `source`.
    pub fn accepted(&self, source: &'static str) {
        self.events.get_or_create(&SourceLabel { source }).inc();
    }

    /// Counts `n` events reaching a terminal state; `reason` for refused and failed ones.
    pub fn terminal(&self, outcome: &'static str, reason: Option<&'static str>, n: u64) {
        self.outcomes
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(n);
        match (outcome, reason) {
            ("refused", Some(reason)) => {
                self.refusals
                    .get_or_create(&ReasonLabel { reason })
                    .inc_by(n);
            }
            ("failed", Some(reason)) => {
                self.failures
                    .get_or_create(&ReasonLabel { reason })
                    .inc_by(n);
            }
            _ => {}
        }
    }

    /// The value of one outcome counter.
    pub fn outcome(&self, outcome: &'static str) -> u64 {
        self.outcomes.get_or_create(&OutcomeLabel { outcome }).get()
    }
}

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_traceroute_caller_names_and_zeroed_labels() {
        let (m, r) = Metrics::new(&["grpc"], &["loopback"], &["timeout"], &["port"]);
        m.accepted("grpc");
        m.terminal("refused", Some("loopback"), 1);
        m.traces_performed.inc();
        let text = render(&r);
        for want in [
            "traces_performed_total 1",
            "traces_in_progress 0",
            "hoptrace_events_total{source=\"grpc\"} 1",
            "hoptrace_refusals_total{reason=\"loopback\"} 1",
            "hoptrace_failures_total{reason=\"timeout\"} 0",
            "hoptrace_event_outcomes_total{outcome=\"aborted\"} 0",
            "hoptrace_events_invalid_total{reason=\"port\"} 0",
            "# TYPE trace_time_seconds histogram",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(m.outcome("refused"), 1);
    }

    #[test]
    fn engine_counters_grow_by_the_difference_and_the_gauge_follows() {
        use hoptrace_backends::engine::EngineStats;
        let (m, r) = Metrics::new(&[], &[], &[], &[]);
        let before = EngineStats {
            probes_sent: 10,
            router_paced: 4,
            limited_routers: 2,
            ..EngineStats::default()
        };
        let now = EngineStats {
            probes_sent: 15,
            strays: 3,
            duplicates: 1,
            router_paced: 9,
            unstamped: 2,
            limited_routers: 1,
            ..before
        };
        m.engine.add(&before, &now);
        let text = render(&r);
        for want in [
            "hoptrace_engine_probes_total{outcome=\"sent\"} 5",
            "hoptrace_engine_packets_total{outcome=\"stray\"} 3",
            "hoptrace_engine_packets_total{outcome=\"duplicate\"} 1",
            "hoptrace_engine_router_paced_total 5",
            "hoptrace_engine_unstamped_replies_total 2",
            "hoptrace_engine_limited_routers 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
