//! The IP cache: one trace per destination per window, shared by every event for it.
//!
//! Keyed by the canonical address. A destination is in one of three states: absent, in flight
//! (a trace is running; later events join it as waiters), or done (a result, or a failure,
//! with an expiry counted from completion). Done entries live in an LRU of bounded capacity;
//! in-flight entries live apart, bounded by the scheduler's queue and concurrency, so the LRU
//! can never evict a running trace and start a duplicate.

use std::{collections::HashMap, net::IpAddr, num::NonZeroUsize, sync::Mutex, time::Duration};

use lru::LruCache;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::policy::canonical;

/// Counters the cache keeps (shared with the metrics registry).
#[derive(Debug, Clone, Default)]
pub struct CacheCounters {
    /// Lookups served from a done entry.
    pub hits: Counter,
    /// Lookups that started a trace.
    pub misses: Counter,
    /// Lookups that joined a running trace.
    pub waits: Counter,
    /// Done entries pushed out by the capacity bound before they expired.
    pub evictions: Counter,
}

/// Bounds and lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// How long a successful trace is reused, counted from its completion.
    pub ttl: Duration,
    /// How long a failed trace stops new traces to the destination.
    pub failure_ttl: Duration,
    /// Most done entries kept.
    pub capacity: NonZeroUsize,
    /// Most events that may wait on one running trace.
    pub max_waiters: usize,
    /// Most events that may wait on all running traces together (each holds its id and
    /// labels until its trace ends).
    pub max_waiters_total: usize,
}

/// What a lookup found. Every variant but `Joined` hands the waiter back.
#[derive(Debug, PartialEq)]
pub enum Lookup<V, W> {
    /// A recent result.
    Hit(V, W),
    /// A recent trace failed, for this reason.
    RecentlyFailed(String, W),
    /// A trace is running; the waiter was queued on it.
    Joined,
    /// Nothing usable: the caller now owns the flight and must end it with
    /// [`IpCache::complete`] or [`IpCache::abandon`].
    Miss(W),
    /// A trace is running but already has `max_waiters` waiters, or all running traces
    /// together have `max_waiters_total`.
    TooManyWaiters(W),
}

#[derive(Debug)]
enum Done<V> {
    Ok(V),
    Failed(String),
}

#[derive(Debug)]
struct Entry<V> {
    done: Done<V>,
    expires: Instant,
}

#[derive(Debug)]
struct Inner<V, W> {
    done: LruCache<IpAddr, Entry<V>>,
    in_flight: HashMap<IpAddr, Vec<W>>,
    /// Waiters of every flight.
    waiting: usize,
}

/// The cache of trace results by destination, with single flight.
#[derive(Debug)]
pub struct IpCache<V, W> {
    inner: Mutex<Inner<V, W>>,
    config: CacheConfig,
    counters: CacheCounters,
}

impl<V: Clone, W> IpCache<V, W> {
    /// An empty cache.
    pub fn new(config: CacheConfig, counters: CacheCounters) -> Self {
        Self {
            inner: Mutex::new(Inner {
                done: LruCache::new(config.capacity),
                in_flight: HashMap::new(),
                waiting: 0,
            }),
            config,
            counters,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V, W>> {
        // The state stays consistent at every await-free step, so a panic elsewhere leaves
        // nothing half-done: keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `ip` up for `waiter`. With `fresh`, done entries are ignored (a new trace is
    /// wanted) but a running trace is still joined: its result is fresh too. An entry ignored
    /// so stays until the new trace's result replaces it: should that trace be shed or
    /// aborted, the earlier result still serves others.
    pub fn lookup(&self, ip: IpAddr, waiter: W, fresh: bool) -> Lookup<V, W> {
        let ip = canonical(ip);
        let now = Instant::now();
        let mut inner = self.lock();
        let full = inner.waiting >= self.config.max_waiters_total;
        if let Some(waiters) = inner.in_flight.get_mut(&ip) {
            if full || waiters.len() >= self.config.max_waiters {
                return Lookup::TooManyWaiters(waiter);
            }
            waiters.push(waiter);
            inner.waiting += 1;
            self.counters.waits.inc();
            return Lookup::Joined;
        }
        match inner.done.get(&ip) {
            Some(entry) if entry.expires > now && !fresh => {
                return match &entry.done {
                    Done::Ok(v) => {
                        self.counters.hits.inc();
                        Lookup::Hit(v.clone(), waiter)
                    }
                    Done::Failed(reason) => Lookup::RecentlyFailed(reason.clone(), waiter),
                };
            }
            Some(entry) if entry.expires <= now => {
                inner.done.pop(&ip);
            }
            Some(_) | None => {}
        }
        inner.in_flight.insert(ip, Vec::new());
        self.counters.misses.inc();
        Lookup::Miss(waiter)
    }

    /// Ends the flight for `ip` with a result; returns the waiters, who now get copies of it.
    /// A failure is remembered for the failure lifetime when `remember_failure` is set.
    pub fn complete(
        &self,
        ip: IpAddr,
        result: Result<V, String>,
        remember_failure: bool,
    ) -> Vec<W> {
        let ip = canonical(ip);
        let now = Instant::now();
        let mut inner = self.lock();
        let waiters = inner.in_flight.remove(&ip).unwrap_or_default();
        inner.waiting -= waiters.len();
        let entry = match result {
            Ok(v) => Some(Entry {
                done: Done::Ok(v),
                expires: now + self.config.ttl,
            }),
            Err(reason) if remember_failure => Some(Entry {
                done: Done::Failed(reason),
                expires: now + self.config.failure_ttl,
            }),
            Err(_) => None,
        };
        if let Some(entry) = entry
            && let Some((evicted, old)) = inner.done.push(ip, entry)
            && evicted != ip
            && old.expires > now
        {
            self.counters.evictions.inc();
        }
        waiters
    }

    /// Takes the first waiter of the flight for `ip` out of it (to own the trace in place of
    /// an owner that cannot take its result); the flight goes on with the others.
    pub fn promote(&self, ip: IpAddr) -> Option<W> {
        let mut inner = self.lock();
        let waiters = inner.in_flight.get_mut(&canonical(ip))?;
        if waiters.is_empty() {
            return None;
        }
        let first = waiters.remove(0);
        inner.waiting -= 1;
        Some(first)
    }

    /// Ends the flight for `ip` with nothing to remember (aborted, shed, not written); returns
    /// the waiters.
    pub fn abandon(&self, ip: IpAddr) -> Vec<W> {
        let mut inner = self.lock();
        let waiters = inner.in_flight.remove(&canonical(ip)).unwrap_or_default();
        inner.waiting -= waiters.len();
        waiters
    }

    /// Drops expired entries; returns how many were removed.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut inner = self.lock();
        let expired: Vec<IpAddr> = inner
            .done
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &expired {
            inner.done.pop(ip);
        }
        expired.len()
    }

    /// (done entries, in-flight destinations).
    pub fn len(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.done.len(), inner.in_flight.len())
    }

    /// The capacity bound.
    pub fn capacity(&self) -> usize {
        self.config.capacity.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> IpCache<&'static str, u32> {
        IpCache::new(
            CacheConfig {
                ttl: Duration::from_secs(600),
                failure_ttl: Duration::from_secs(60),
                capacity: NonZeroUsize::new(capacity).expect("non-zero"),
                max_waiters: 3,
                max_waiters_total: 5,
            },
            CacheCounters::default(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("addr")
    }

    #[tokio::test(start_paused = true)]
    async fn single_flight_then_hit() {
        let c = cache(10);
        assert_eq!(c.lookup(ip("8.8.8.8"), 1, false), Lookup::Miss(1));
        // Concurrent events for the same address, in either spelling, join the flight.
        assert_eq!(c.lookup(ip("8.8.8.8"), 2, false), Lookup::Joined);
        assert_eq!(c.lookup(ip("::ffff:8.8.8.8"), 3, false), Lookup::Joined);
        assert_eq!(c.lookup(ip("8.8.4.4"), 4, false), Lookup::Miss(4));
        assert_eq!(c.complete(ip("8.8.8.8"), Ok("trace-1"), true), vec![2, 3]);
        assert_eq!(c.lookup(ip("8.8.8.8"), 5, false), Lookup::Hit("trace-1", 5));
        assert_eq!(c.counters.misses.get(), 2);
        assert_eq!(c.counters.waits.get(), 2);
        assert_eq!(c.counters.hits.get(), 1);
        assert_eq!(c.len(), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_counts_from_completion_not_start() {
        let c = cache(10);
        assert_eq!(c.lookup(ip("9.9.9.9"), 1, false), Lookup::Miss(1));
        // The trace runs longer than the whole window: the entry must not expire under it.
        tokio::time::advance(Duration::from_secs(900)).await;
        assert_eq!(c.lookup(ip("9.9.9.9"), 2, false), Lookup::Joined);
        c.complete(ip("9.9.9.9"), Ok("t"), true);
        tokio::time::advance(Duration::from_secs(599)).await;
        assert_eq!(c.lookup(ip("9.9.9.9"), 3, false), Lookup::Hit("t", 3));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(c.lookup(ip("9.9.9.9"), 4, false), Lookup::Miss(4));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_have_their_own_shorter_lifetime() {
        let c = cache(10);
        c.lookup(ip("1.1.1.1"), 1, false);
        c.complete(ip("1.1.1.1"), Err("timeout".into()), true);
        assert_eq!(
            c.lookup(ip("1.1.1.1"), 2, false),
            Lookup::RecentlyFailed("timeout".into(), 2)
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(c.lookup(ip("1.1.1.1"), 3, false), Lookup::Miss(3));
        // A failure that is not to be remembered leaves nothing behind.
        c.complete(ip("1.1.1.1"), Err("spawn".into()), false);
        assert_eq!(c.lookup(ip("1.1.1.1"), 4, false), Lookup::Miss(4));
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_lookups_ignore_done_entries_but_join_flights() {
        let c = cache(10);
        c.lookup(ip("1.0.0.1"), 1, false);
        assert_eq!(c.lookup(ip("1.0.0.1"), 2, true), Lookup::Joined);
        c.complete(ip("1.0.0.1"), Ok("old"), true);
        assert_eq!(c.lookup(ip("1.0.0.1"), 3, true), Lookup::Miss(3));
        // The fresh trace is shed: the earlier result still serves.
        assert_eq!(c.abandon(ip("1.0.0.1")), Vec::<u32>::new());
        assert_eq!(c.lookup(ip("1.0.0.1"), 4, false), Lookup::Hit("old", 4));
        // Its own result, once there, replaces it.
        assert_eq!(c.lookup(ip("1.0.0.1"), 5, true), Lookup::Miss(5));
        c.complete(ip("1.0.0.1"), Ok("new"), true);
        assert_eq!(c.lookup(ip("1.0.0.1"), 6, false), Lookup::Hit("new", 6));
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_bounds_done_entries_and_counts_evictions() {
        let c = cache(2);
        for (i, addr) in ["1.0.0.1", "1.0.0.2", "1.0.0.3"].into_iter().enumerate() {
            c.lookup(ip(addr), 0, false);
            c.complete(ip(addr), Ok(["a", "b", "c"][i]), true);
        }
        assert_eq!(c.len(), (2, 0));
        assert_eq!(c.counters.evictions.get(), 1);
        assert_eq!(c.lookup(ip("1.0.0.1"), 0, false), Lookup::Miss(0));
        assert_eq!(c.lookup(ip("1.0.0.3"), 0, false), Lookup::Hit("c", 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_bounded_and_abandon_returns_them() {
        let c = cache(2);
        c.lookup(ip("2.2.2.2"), 0, false);
        for w in 1..=3 {
            assert_eq!(c.lookup(ip("2.2.2.2"), w, false), Lookup::Joined);
        }
        assert_eq!(c.lookup(ip("2.2.2.2"), 4, false), Lookup::TooManyWaiters(4));
        // The first waiter taken out to own the trace makes room for another.
        assert_eq!(c.promote(ip("2.2.2.2")), Some(1));
        assert_eq!(c.lookup(ip("2.2.2.2"), 4, false), Lookup::Joined);
        assert_eq!(c.abandon(ip("2.2.2.2")), vec![2, 3, 4]);
        assert_eq!(c.promote(ip("2.2.2.2")), None);
        assert_eq!(c.lookup(ip("2.2.2.2"), 5, false), Lookup::Miss(5));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_bounded_across_all_running_traces() {
        let c = cache(10);
        for dst in ["4.4.4.1", "4.4.4.2"] {
            assert_eq!(c.lookup(ip(dst), 0, false), Lookup::Miss(0));
        }
        for w in 1..=3 {
            assert_eq!(c.lookup(ip("4.4.4.1"), w, false), Lookup::Joined);
        }
        for w in 4..=5 {
            assert_eq!(c.lookup(ip("4.4.4.2"), w, false), Lookup::Joined);
        }
        // Five wait in all: the second trace has room for one more, but the total has none.
        assert_eq!(c.lookup(ip("4.4.4.2"), 6, false), Lookup::TooManyWaiters(6));
        assert_eq!(c.complete(ip("4.4.4.1"), Ok("x"), true), vec![1, 2, 3]);
        assert_eq!(c.lookup(ip("4.4.4.2"), 7, false), Lookup::Joined);
        assert_eq!(c.abandon(ip("4.4.4.2")), vec![4, 5, 7]);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_removes_expired_entries() {
        let c = cache(10);
        c.lookup(ip("3.3.3.3"), 0, false);
        c.complete(ip("3.3.3.3"), Ok("x"), true);
        assert_eq!(c.sweep(), 0);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(c.sweep(), 1);
        assert_eq!(c.len(), (0, 0));
    }
}
