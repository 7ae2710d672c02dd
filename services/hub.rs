//! The hub: fans trace records out to subscribers and lets them resume from a cursor.
//!
//! Publishing never waits. Each subscriber has a bounded queue; one that is full is cut off
//! the live stream and catches up from the journal (records read back from the store), so a
//! slow or stuck subscriber never slows the pipeline or the others. The journal remembers the
//! last `retention` records of this run (their paths, not their contents); a subscriber that
//! resumes from further back is told how many records it missed.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use ipnet::IpNet;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::mpsc;

use crate::{
    record::{Cursor, TraceRecord},
    store::TraceStore,
};

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionEvent {
    /// A trace record.
    Record(Arc<TraceRecord>),
    /// Records were missed or had to be caught up.
    Lag(Lag),
}

/// A notice that the subscriber fell behind or resumed from beyond the retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    /// The last cursor the subscriber had.
    pub after: Option<Cursor>,
    /// Where delivery resumes (the next record's cursor is after this one).
    pub resumed: Option<Cursor>,
    /// Records that can no longer be delivered.
    pub missed: u64,
    /// Why, in words.
    pub reason: String,
}

/// Which records a subscriber wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only destinations inside this prefix.
    pub prefix: Option<IpNet>,
    /// Only this backend.
    pub backend: Option<String>,
    /// Only cached (true) or fresh (false) records.
    pub cached: Option<bool>,
}

impl Filter {
    fn matches(&self, dst: IpAddr, backend: &str, cached: bool) -> bool {
        self.prefix.is_none_or(|p| p.contains(&dst))
            && self.backend.as_deref().is_none_or(|b| b == backend)
            && self.cached.is_none_or(|c| c == cached)
    }
}

/// What the journal keeps of a published record: enough to filter it and read it back.
#[derive(Debug, Clone)]
struct JournalEntry {
    seq: u64,
    rel_path: String,
    backend: String,
    dst: IpAddr,
    cached: bool,
    labels: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Inner {
    next_seq: u64,
    journal: VecDeque<JournalEntry>,
    subscribers: HashMap<u64, mpsc::Sender<Arc<TraceRecord>>>,
    next_subscriber: u64,
}

/// Hub settings.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// Records queued per subscriber before it is cut off the live stream.
    pub queue: usize,
    /// Records of this run that can be replayed by cursor.
    pub retention: usize,
    /// Subscriptions open at once; more are refused.
    pub max_subscribers: usize,
}

/// A subscription refused: as many are open as the hub allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} subscriptions are open, the most allowed (--max-subscribers)")]
pub struct TooManySubscribers(pub usize);

/// Counters the hub keeps (shared with the metrics registry).
#[derive(Debug, Clone, Default)]
pub struct HubCounters {
    /// Subscriptions open now.
    pub subscribers: Gauge,
    /// Times a subscriber was cut off the live stream or told it missed records.
    pub lags: Counter,
}

/// Fans records out to subscribers.
#[derive(Debug)]
pub struct Hub {
    run: u64,
    config: HubConfig,
    inner: Mutex<Inner>,
    closed: AtomicBool,
    /// Subscriptions open (their tasks running).
    open: Arc<AtomicUsize>,
    counters: HubCounters,
}

/// Holds one of the hub's subscription slots while a subscription's task runs.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Hub {
    /// A hub for one run of the server, identified by `run`.
    pub fn new(run: u64, config: HubConfig, counters: HubCounters) -> Self {
        Self {
            run,
            config,
            inner: Mutex::new(Inner {
                next_seq: 1,
                journal: VecDeque::new(),
                subscribers: HashMap::new(),
                next_subscriber: 0,
            }),
            closed: AtomicBool::new(false),
            open: Arc::new(AtomicUsize::new(0)),
            counters,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `record` the next cursor, remembers it and offers it to every subscriber without
    /// waiting: a subscriber whose queue is full is cut off and will catch up from the store.
    pub fn publish(&self, mut record: TraceRecord) -> Arc<TraceRecord> {
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        record.cursor = Some(Cursor { run: self.run, seq });
        let record = Arc::new(record);
        inner.journal.push_back(JournalEntry {
            seq,
            rel_path: record.file.rel_path.clone(),
            backend: record.backend.clone(),
            dst: record.destination(),
            cached: record.cached(),
            labels: record.labels.clone(),
        });
        while inner.journal.len() > self.config.retention {
            inner.journal.pop_front();
        }
        inner
            .subscribers
            .retain(|_, tx| tx.try_send(Arc::clone(&record)).is_ok());
        record
    }

    /// Ends every subscription (at shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.lock().subscribers.clear();
    }

    /// Number of live queues (subscribers currently on the live stream).
    pub fn live_subscribers(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Registers a live queue and returns it with the journal entries after `last` and how
    /// many records after `last` are no longer retained. Done under one lock, so every record
    /// is either in the backlog or will arrive on the queue: none is lost or repeated.
    fn attach(
        &self,
        last: Option<u64>,
    ) -> (
        mpsc::Receiver<Arc<TraceRecord>>,
        Vec<JournalEntry>,
        u64,
        u64,
    ) {
        let (tx, rx) = mpsc::channel(self.config.queue.max(1));
        let mut inner = self.lock();
        let id = inner.next_subscriber;
        inner.next_subscriber += 1;
        // Once closed (checked under the lock `close` clears the queues with), no new live
        // queue: the subscriber gets the backlog, then its queue ends with the hub.
        if !self.closed.load(Ordering::SeqCst) {
            inner.subscribers.insert(id, tx);
        }
        // A cursor past the newest record (a client's own invention) means "from now on":
        // taken at face value it would skip the next records until their number reached it.
        let newest = inner.next_seq - 1;
        let last = last.map_or(newest, |l| l.min(newest));
        let oldest = inner.journal.front().map_or(inner.next_seq, |e| e.seq);
        let missed = oldest.saturating_sub(last + 1);
        let backlog = inner
            .journal
            .iter()
            .filter(|e| e.seq > last)
            .cloned()
            .collect();
        (rx, backlog, missed, last)
    }

    /// Starts a subscription: records after `after` (replayed from the store, then live), or
    /// live records only when `after` is `None`. The returned queue holds at most `capacity`
    /// events; the subscription ends when the receiver is dropped or the hub closes. Refused
    /// when `max_subscribers` are open.
    pub fn subscribe(
        self: &Arc<Self>,
        store: Arc<TraceStore>,
        after: Option<Cursor>,
        filter: Filter,
        capacity: usize,
    ) -> Result<mpsc::Receiver<SubscriptionEvent>, TooManySubscribers> {
        let max = self.config.max_subscribers.max(1);
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(TooManySubscribers)?;
        let slot = Slot(Arc::clone(&self.open));
        let (out, rx) = mpsc::channel(capacity.max(1));
        let hub = Arc::clone(self);
        tokio::spawn(async move {
            hub.counters.subscribers.inc();
            let _ = hub.run_subscription(store, after, &filter, &out).await;
            hub.counters.subscribers.dec();
            drop(slot);
        });
        Ok(rx)
    }

    /// The subscription loop; returns `Err` when the subscriber has gone away.
    async fn run_subscription(
        &self,
        store: Arc<TraceStore>,
        after: Option<Cursor>,
        filter: &Filter,
        out: &mpsc::Sender<SubscriptionEvent>,
    ) -> Result<(), mpsc::error::SendError<SubscriptionEvent>> {
        let cursor = |seq: u64| Cursor { run: self.run, seq };
        let mut last = match after {
            Some(c) if c.run == self.run => Some(c.seq),
            Some(c) => {
                // A cursor from an earlier run: everything retained from this run is new.
                out.send(SubscriptionEvent::Lag(Lag {
                    after: Some(c),
                    resumed: None,
                    missed: 0,
                    reason: "the cursor is from an earlier run of the server; replaying \
                             every record retained since it started (older records are in \
                             the store's files)"
                        .into(),
                }))
                .await?;
                Some(0)
            }
            None => None,
        };
        let mut fell_behind = false;
        loop {
            let (mut live, backlog, missed, from) = self.attach(last);
            if missed > 0 || fell_behind {
                self.counters.lags.inc();
                out.send(SubscriptionEvent::Lag(Lag {
                    after: (from > 0).then(|| cursor(from)),
                    resumed: Some(cursor(from + missed)),
                    missed,
                    reason: if fell_behind {
                        "subscriber fell behind the live stream; catching up from the store"
                    } else {
                        "records older than the retention can no longer be replayed"
                    }
                    .into(),
                }))
                .await?;
            }
            last = Some(from + missed);
            for entry in backlog {
                last = Some(entry.seq);
                if !filter.matches(entry.dst, &entry.backend, entry.cached) {
                    continue;
                }
                // Reading back is file I/O and parsing: off the async threads.
                let store = Arc::clone(&store);
                let read = tokio::task::spawn_blocking(move || {
                    store
                        .read(&entry.rel_path)
                        .map_err(crate::record::RecordError::from)
                        .and_then(|file| TraceRecord::from_file(file, entry.backend, entry.labels))
                })
                .await;
                let read = read.unwrap_or_else(|e| {
                    Err(crate::record::RecordError::Store(
                        crate::store::StoreError::Malformed {
                            path: String::new(),
                            why: format!("read-back task failed: {e}"),
                        },
                    ))
                });
                let event = match read {
                    Ok(mut record) => {
                        record.cursor = Some(cursor(entry.seq));
                        SubscriptionEvent::Record(Arc::new(record))
                    }
                    Err(e) => SubscriptionEvent::Lag(Lag {
                        after: Some(cursor(entry.seq - 1)),
                        resumed: Some(cursor(entry.seq)),
                        missed: 1,
                        reason: format!("record can no longer be read back: {e}"),
                    }),
                };
                out.send(event).await?;
            }
            loop {
                let record = tokio::select! {
                    record = live.recv() => record,
                    // A subscriber that went away ends its task now, not at the next record.
                    () = out.closed() => return Ok(()),
                };
                let Some(record) = record else { break };
                let seq = record.cursor.map_or(0, |c| c.seq);
                if last.is_some_and(|l| seq <= l) {
                    continue;
                }
                last = Some(seq);
                if filter.matches(record.destination(), &record.backend, record.cached()) {
                    out.send(SubscriptionEvent::Record(record)).await?;
                }
            }
            if self.closed.load(Ordering::SeqCst) {
                return Ok(());
            }
            fell_behind = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn_id::ConnectionIds;

    const LINES: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/backends/tests/fixtures/scamper-20211212/trace-icmp-paris.json"
    ));

    struct Setup {
        hub: Arc<Hub>,
        store: Arc<TraceStore>,
        _dir: tempfile::TempDir,
    }

    fn setup(queue: usize, retention: usize) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(TraceStore::open(dir.path(), "v").expect("store"));
        let hub = Arc::new(Hub::new(
            7,
            HubConfig {
                queue,
                retention,
                max_subscribers: 3,
            },
            HubCounters::default(),
        ));
        Setup {
            hub,
            store,
            _dir: dir,
        }
    }

    fn publish(s: &Setup, n: u64) {
        let ids = ConnectionIds::default();
        let id = ids.validate(&format!("h_1_{n:016X}")).expect("id");
        let file = s
            .store
            .write(&id, LINES, 1_795_314_448, None)
            .expect("write");
        let record = TraceRecord::from_file(file, "scamper", BTreeMap::new()).expect("record");
        s.hub.publish(record);
    }

    async fn attached(hub: &Hub, n: usize) {
        for _ in 0..1000 {
            if hub.live_subscribers() == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!(
            "subscriber never attached: {} live, wanted {n}",
            hub.live_subscribers()
        );
    }

    /// Drains `rx` until `records` records arrived; returns their sequence numbers and lags.
    async fn collect(
        rx: &mut mpsc::Receiver<SubscriptionEvent>,
        records: usize,
    ) -> (Vec<u64>, Vec<Lag>) {
        let (mut seqs, mut lags) = (Vec::new(), Vec::new());
        while seqs.len() < records {
            match rx.recv().await.expect("subscription open") {
                SubscriptionEvent::Record(r) => seqs.push(r.cursor.expect("cursor").seq),
                SubscriptionEvent::Lag(l) => lags.push(l),
            }
        }
        (seqs, lags)
    }

    #[tokio::test]
    async fn a_stalled_subscriber_never_blocks_publishing_and_catches_up_exactly_once() {
        let s = setup(2, 1000);
        let mut slow = s
            .hub
            .subscribe(Arc::clone(&s.store), None, Filter::default(), 1)
            .expect("subscribed");
        let mut fast = s
            .hub
            .subscribe(Arc::clone(&s.store), None, Filter::default(), 100)
            .expect("subscribed");
        attached(&s.hub, 2).await;
        // 50 records while nobody reads: publishing never waits on a subscriber.
        for n in 1..=50 {
            publish(&s, n);
            tokio::task::yield_now().await;
            let _ = fast.try_recv().map(drop);
        }
        assert!(
            s.hub.live_subscribers() < 2,
            "the stalled subscriber is cut off"
        );
        let (seqs, lags) = collect(&mut slow, 50).await;
        assert_eq!(
            seqs,
            (1..=50).collect::<Vec<_>>(),
            "every record once, in order"
        );
        assert!(!lags.is_empty(), "the subscriber is told it fell behind");
        assert!(lags.iter().all(|l| l.missed == 0), "{lags:?}");
        // Caught up, it is back on the live stream.
        publish(&s, 51);
        let (seqs, _) = collect(&mut slow, 1).await;
        assert_eq!(seqs, [51]);
    }

    /// A subscription that starts after the hub closed (a call queued behind the server's
    /// concurrency limit during shutdown) gets what is retained and ends, rather than waiting
    /// for records that will never come and holding the shutdown up.
    #[tokio::test]
    async fn a_subscription_after_close_replays_and_ends() {
        let s = setup(16, 100);
        publish(&s, 1);
        s.hub.close();
        let mut rx = s
            .hub
            .subscribe(
                Arc::clone(&s.store),
                Some(Cursor { run: 7, seq: 0 }),
                Filter::default(),
                4,
            )
            .expect("subscribed");
        let (seqs, _) = collect(&mut rx, 1).await;
        assert_eq!(seqs, [1]);
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(end, Ok(None)), "the subscription ended: {end:?}");
        assert_eq!(s.hub.live_subscribers(), 0);
    }

    #[tokio::test]
    async fn subscriptions_beyond_the_limit_are_refused_until_one_ends() {
        let s = setup(16, 100);
        let open: Vec<_> = (0..3)
            .map(|_| {
                s.hub
                    .subscribe(Arc::clone(&s.store), None, Filter::default(), 4)
                    .expect("within the limit")
            })
            .collect();
        attached(&s.hub, 3).await;
        let refused = s
            .hub
            .subscribe(Arc::clone(&s.store), None, Filter::default(), 4)
            .expect_err("a fourth is refused");
        assert_eq!(refused, TooManySubscribers(3));
        drop(open);
        // A subscription whose receiver is gone ends at once, and frees its slot.
        for _ in 0..1000 {
            if s.hub
                .subscribe(Arc::clone(&s.store), None, Filter::default(), 4)
                .is_ok()
            {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("no slot freed after the subscribers left");
    }

    #[tokio::test]
    async fn a_cursor_past_the_newest_record_subscribes_from_now_on() {
        let s = setup(16, 100);
        publish(&s, 1);
        let mut rx = s
            .hub
            .subscribe(
                Arc::clone(&s.store),
                Some(Cursor {
                    run: 7,
                    seq: u64::MAX,
                }),
                Filter::default(),
                16,
            )
            .expect("subscribed");
        attached(&s.hub, 1).await;
        publish(&s, 2);
        let (seqs, lags) = collect(&mut rx, 1).await;
        assert_eq!(seqs, [2], "the next record, not silence until seq u64::MAX");
        assert!(lags.is_empty(), "{lags:?}");
    }

    #[tokio::test]
    async fn beyond_the_retention_the_subscriber_is_told_how_many_it_missed() {
        let s = setup(2, 10);
        let mut slow = s
            .hub
            .subscribe(Arc::clone(&s.store), None, Filter::default(), 1)
            .expect("subscribed");
        attached(&s.hub, 1).await;
        for n in 1..=30 {
            publish(&s, n);
            tokio::task::yield_now().await;
        }
        let mut got = Vec::new();
        let mut missed = 0;
        while got.len() + missed < 30 {
            match slow.recv().await.expect("open") {
                SubscriptionEvent::Record(r) => got.push(r.cursor.expect("cursor").seq),
                SubscriptionEvent::Lag(l) => missed += l.missed as usize,
            }
        }
        assert_eq!(got.len() + missed, 30, "{got:?}");
        assert!(missed > 0);
        assert_eq!(got.last(), Some(&30));
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    }

    #[tokio::test]
    async fn resuming_replays_from_the_store_with_filters_and_a_foreign_cursor_is_flagged() {
        let s = setup(16, 100);
        for n in 1..=5 {
            publish(&s, n);
        }
        let after = Some(Cursor { run: 7, seq: 2 });
        let mut resumed = s
            .hub
            .subscribe(Arc::clone(&s.store), after, Filter::default(), 16)
            .expect("subscribed");
        let (seqs, lags) = collect(&mut resumed, 3).await;
        assert_eq!(seqs, [3, 4, 5]);
        assert!(lags.is_empty());

        let none = Filter {
            backend: Some("engine".into()),
            ..Filter::default()
        };
        let mut filtered = s
            .hub
            .subscribe(
                Arc::clone(&s.store),
                Some(Cursor { run: 7, seq: 0 }),
                none,
                16,
            )
            .expect("subscribed");
        attached(&s.hub, 2).await;
        publish(&s, 6);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), filtered.recv())
                .await
                .is_err(),
            "filtered records are not delivered"
        );

        let foreign = Some(Cursor { run: 6, seq: 99 });
        let mut rx = s
            .hub
            .subscribe(Arc::clone(&s.store), foreign, Filter::default(), 16)
            .expect("subscribed");
        let first = rx.recv().await.expect("event");
        assert!(
            matches!(first, SubscriptionEvent::Lag(ref l) if l.reason.contains("earlier run")),
            "{first:?}"
        );
        let (seqs, _) = collect(&mut rx, 6).await;
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    }
}
