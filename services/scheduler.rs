//! The scheduler: a bounded queue of jobs, run at most `concurrency` at a time.
//!
//! Submitting never waits: a full queue hands the job back, so the caller sheds it with a
//! reason. At shutdown, queued jobs are dropped unrun (a job's own `Drop` settles whatever it
//! owes) and running ones get a grace period before they are cancelled — dropped mid-flight,
//! which for a trace kills its process group.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::{gauge::Gauge, histogram::Histogram};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinSet,
    time::Instant,
};

/// What the scheduler measures (shared with the metrics registry).
#[derive(Debug, Clone)]
pub struct SchedulerMetrics {
    /// Jobs waiting in the queue.
    pub depth: Gauge,
    /// Seconds from submission to start.
    pub wait: Histogram,
}

#[derive(Debug)]
struct Queued<J> {
    job: J,
    at: Instant,
}

/// The submitting side of a scheduler.
#[derive(Debug)]
pub struct Scheduler<J> {
    tx: mpsc::Sender<Queued<J>>,
    running: Arc<AtomicU64>,
    concurrency: usize,
    metrics: SchedulerMetrics,
}

/// The receiving side, handed to [`run`].
#[derive(Debug)]
pub struct Jobs<J> {
    rx: mpsc::Receiver<Queued<J>>,
    running: Arc<AtomicU64>,
    concurrency: usize,
    metrics: SchedulerMetrics,
}

/// A scheduler with room for `capacity` waiting jobs, running `concurrency` at once.
pub fn scheduler<J>(
    capacity: usize,
    concurrency: usize,
    metrics: SchedulerMetrics,
) -> (Scheduler<J>, Jobs<J>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let running = Arc::new(AtomicU64::new(0));
    let concurrency = concurrency.max(1);
    (
        Scheduler {
            tx,
            running: Arc::clone(&running),
            concurrency,
            metrics: metrics.clone(),
        },
        Jobs {
            rx,
            running,
            concurrency,
            metrics,
        },
    )
}

/// A job the queue did not take, handed back.
#[derive(Debug)]
pub struct Refused<J> {
    pub job: J,
    /// The scheduler stopped (shutdown), rather than the queue being full.
    pub stopped: bool,
}

impl<J> Scheduler<J> {
    /// Queues `job`, or hands it back when the queue is full or the scheduler stopped.
    pub fn try_submit(&self, job: J) -> Result<(), Refused<J>> {
        self.tx
            .try_send(Queued {
                job,
                at: Instant::now(),
            })
            .map(|()| {
                self.metrics.depth.inc();
            })
            .map_err(|e| {
                let stopped = matches!(e, mpsc::error::TrySendError::Closed(_));
                Refused {
                    job: e.into_inner().job,
                    stopped,
                }
            })
    }

    /// (waiting, queue capacity, running, concurrency).
    pub fn state(&self) -> (usize, usize, u64, usize) {
        let capacity = self.tx.max_capacity();
        (
            capacity - self.tx.capacity(),
            capacity,
            self.running.load(Ordering::Relaxed),
            self.concurrency,
        )
    }
}

/// Runs queued jobs with `handle` until `shutdown` turns true; then drops the queued ones and
/// gives running ones `grace` before cancelling them.
pub async fn run<J, F, Fut>(
    jobs: Jobs<J>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    handle: F,
) where
    J: Send + 'static,
    F: Fn(J) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Jobs {
        mut rx,
        running,
        concurrency,
        metrics,
    } = jobs;
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Ok(permit) = permit else { break };
        let queued = tokio::select! {
            queued = rx.recv() => queued,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Some(Queued { job, at }) = queued else {
            break;
        };
        metrics.depth.dec();
        metrics.wait.observe(at.elapsed().as_secs_f64());
        running.fetch_add(1, Ordering::Relaxed);
        let work = handle(job);
        let running = Arc::clone(&running);
        tasks.spawn(async move {
            // Counted down however the task ends, cancellation included.
            let _done = RunningGuard(running);
            work.await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    rx.close();
    while let Ok(queued) = rx.try_recv() {
        metrics.depth.dec();
        drop(queued);
    }
    let finished =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            running = tasks.len(),
            "shutdown grace over: cancelling running jobs"
        );
        tasks.shutdown().await;
    }
}

struct RunningGuard(Arc<AtomicU64>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use prometheus_client::metrics::histogram::exponential_buckets;

    use super::*;

    fn metrics() -> SchedulerMetrics {
        SchedulerMetrics {
            depth: Gauge::default(),
            wait: Histogram::new(exponential_buckets(0.001, 2.0, 10)),
        }
    }

    /// A job that records its drop, so tests see which jobs were run, dropped or cancelled.
    struct Job(u32, Arc<Mutex<Vec<u32>>>);

    impl Drop for Job {
        fn drop(&mut self) {
            self.1.lock().expect("lock").push(self.0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runs_at_most_concurrency_jobs_and_hands_back_what_does_not_fit() {
        let (scheduler, jobs) = scheduler::<Job>(3, 2, metrics());
        let ended = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            assert!(scheduler.try_submit(Job(i, Arc::clone(&ended))).is_ok());
        }
        let refused = scheduler.try_submit(Job(99, Arc::clone(&ended)));
        let back = refused.expect_err("the queue is full");
        assert!(!back.stopped);
        assert_eq!(back.job.0, 99, "the job comes back to be shed");
        drop(back);
        assert_eq!(scheduler.state().0, 3);
        assert_eq!(scheduler.metrics.depth.get(), 3);

        let peak = Arc::new(AtomicU64::new(0));
        let now = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = watch::channel(false);
        let (p, n) = (Arc::clone(&peak), Arc::clone(&now));
        let runner = tokio::spawn(run(
            jobs,
            stopped,
            Duration::from_secs(1),
            move |job: Job| {
                let (p, n) = (Arc::clone(&p), Arc::clone(&n));
                async move {
                    let at = n.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(at, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                    drop(job);
                }
            },
        ));
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(
            peak.load(Ordering::SeqCst),
            2,
            "never more than the concurrency"
        );
        assert_eq!(scheduler.state(), (0, 3, 0, 2));
        assert_eq!(scheduler.metrics.depth.get(), 0);
        let _ = stop.send(true);
        runner.await.expect("runner");
        let mut ended = ended.lock().expect("lock").clone();
        ended.sort_unstable();
        assert_eq!(ended, [0, 1, 2, 99]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_drops_queued_jobs_and_cancels_running_ones_after_the_grace() {
        let (scheduler, jobs) = scheduler::<Job>(8, 1, metrics());
        let ended = Arc::new(Mutex::new(Vec::new()));
        let finished = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            assert!(scheduler.try_submit(Job(i, Arc::clone(&ended))).is_ok());
        }
        let (stop, stopped) = watch::channel(false);
        let f = Arc::clone(&finished);
        let runner = tokio::spawn(run(
            jobs,
            stopped,
            Duration::from_secs(5),
            move |job: Job| {
                let f = Arc::clone(&f);
                async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    f.lock().expect("lock").push(job.0);
                }
            },
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(scheduler.state().2, 1, "one job running");
        let _ = stop.send(true);
        let started = Instant::now();
        runner.await.expect("runner");
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "the grace, then cancelled"
        );
        assert!(
            finished.lock().expect("lock").is_empty(),
            "nothing ran to the end"
        );
        let mut ended = ended.lock().expect("lock").clone();
        ended.sort_unstable();
        assert_eq!(
            ended,
            [0, 1, 2],
            "queued jobs dropped, the running one cancelled"
        );
        assert_eq!(scheduler.state(), (0, 8, 0, 1));
        assert_eq!(scheduler.metrics.depth.get(), 0);
        let late = Arc::new(Mutex::new(Vec::new()));
        let refused = scheduler.try_submit(Job(7, late)).expect_err("stopped");
        assert!(refused.stopped, "told apart from a full queue");
    }
}
