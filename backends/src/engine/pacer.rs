//! The engine's global probe budget: a generic cell rate algorithm (GCRA) over probes, shared
//! by every trace. A trace reserves its whole batch and learns when it may send it; reservations
//! queue in the order they were made, so no trace starves and the long-run rate never exceeds
//! the budget, while `burst + 1` probes may leave back to back after an idle spell. A batch
//! leaves whole, once its last probe conforms: one larger than `burst` (a multipath round on a
//! wide load balancer) goes back to back, later, rather than spread.
//!
//! The arithmetic takes `now` as an argument, so it is tested without a clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A shared probes-per-second budget.
#[derive(Debug)]
pub struct Pacer {
    /// Time one probe occupies; zero means no limit.
    interval: Duration,
    /// How far ahead of the schedule a probe may go: `burst` intervals.
    tolerance: Duration,
    /// Theoretical arrival time: when the budget is next free.
    tat: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A budget of `pps` probes per second (0: unlimited) with bursts of up to `burst`.
    pub fn new(pps: u32, burst: u32) -> Self {
        let interval = if pps == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / pps
        };
        Self {
            interval,
            tolerance: interval * burst,
            tat: Mutex::new(None),
        }
    }

    /// Reserves `n` probes at `now`; returns when the batch may be sent (`now` or later).
    pub fn reserve(&self, n: u32, now: Instant) -> Instant {
        if self.interval.is_zero() || n == 0 {
            return now;
        }
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let free = tat.map_or(now, |t| t.max(now));
        // The batch's last probe must conform: free + (n-1)·interval − tolerance.
        let last = free + self.interval * (n - 1);
        let send_at = last.checked_sub(self.tolerance).map_or(now, |t| t.max(now));
        *tat = Some(free + self.interval * n);
        send_at
    }

    /// Gives back `n` reserved probes that will not be sent (their trace ended first), so
    /// later reservations are not held back for them; never to before `now`.
    pub fn refund(&self, n: u32, now: Instant) {
        if self.interval.is_zero() || n == 0 {
            return;
        }
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *tat {
            let back = t.checked_sub(self.interval * n).unwrap_or(now);
            *tat = Some(back.max(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let pacer = Pacer::new(0, 0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(pacer.reserve(64, now), now);
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_the_rate_holds() {
        let pacer = Pacer::new(1000, 10);
        let now = Instant::now();
        // 11 probes fit (the 11th is on schedule at +10 ms minus 10 ms of tolerance).
        for _ in 0..11 {
            assert_eq!(pacer.reserve(1, now), now);
        }
        assert_eq!(pacer.reserve(1, now), now + Duration::from_millis(1));
        assert_eq!(pacer.reserve(5, now), now + Duration::from_millis(6));
    }

    #[test]
    fn the_long_run_rate_is_the_budget() {
        let pacer = Pacer::new(10_000, 64);
        let start = Instant::now();
        let mut last = start;
        // 100,000 probes in batches of 5, each sent as soon as allowed.
        for _ in 0..20_000 {
            last = pacer.reserve(5, last);
        }
        let took = last - start;
        // 10 s for 100k probes, less the burst allowance, give or take one batch.
        let expected = Duration::from_secs(10) - Duration::from_micros(100) * 64;
        let diff = took.abs_diff(expected);
        assert!(
            diff <= Duration::from_micros(500),
            "{took:?} vs {expected:?}"
        );
    }

    #[test]
    fn refunded_probes_free_the_budget_they_held() {
        let pacer = Pacer::new(1000, 0);
        let now = Instant::now();
        // 100 probes book the next 100 ms; a trace that ends gives back the 60 it never sent.
        assert_eq!(pacer.reserve(100, now), now + Duration::from_millis(99));
        pacer.refund(60, now);
        assert_eq!(pacer.reserve(1, now), now + Duration::from_millis(40));
        // Never to before now: a refund cannot buy a burst beyond the budget's own.
        pacer.refund(1000, now);
        assert_eq!(pacer.reserve(1, now), now);
        // Unlimited: nothing to give back.
        Pacer::new(0, 0).refund(5, now);
    }

    #[test]
    fn an_idle_spell_refills_the_burst_but_no_more() {
        let pacer = Pacer::new(1000, 4);
        let now = Instant::now();
        assert_eq!(pacer.reserve(5, now), now);
        let later = now + Duration::from_secs(60);
        assert_eq!(pacer.reserve(5, later), later, "a full burst again");
        assert_eq!(pacer.reserve(1, later), later + Duration::from_millis(1));
    }
}
