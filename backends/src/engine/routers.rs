//! Pacing per router, so routers at Linux's default ICMP rate limits still answer.
//!
//! A Linux router sends one peer a burst of 6 ICMP errors, then one per `icmp_ratelimit`
//! (1 s on IPv4) or `net.ipv6.icmp.ratelimit` (100 ms on IPv6); many traces crossing it at
//! once get 6 answers and silence. The engine does not slow every router down for that (most
//! do not limit, and the throughput lab turns the limits off); it paces a router once it shows
//! the limit:
//!
//! - every reply teaches which routers answer at which TTL towards a destination prefix (/24
//!   on IPv4, /64 on IPv6, so new destinations of a known network find their routers); behind
//!   a load balancer the flows of one prefix reach several routers at the same TTL, so the
//!   engine keeps up to [`WIDTH`] of them, the most recent first;
//! - a probe retried at a TTL where routers are known counts as a silence of each of them (it
//!   cannot tell which branch its flow takes);
//! - from its first silence on, *retries* to a router are spaced by its family's interval,
//!   one at a time in the order they were asked for (a GCRA per router with no burst, since
//!   the router's own burst is spent by the time it shows), so each finds a token in the
//!   router's bucket; retries are few on a healthy network, so this costs little. A probe
//!   whose TTL has several routers takes a turn free at all of them and books it at each, so
//!   no branch of a load balancer gets more than its rate whichever branch the flow takes;
//! - three silences within [`RouterLimits::hold`] (so one lost packet does not slow a router
//!   down) mark the router *limited*: then first probes are spaced the same way, until `hold`
//!   passes without a silence. Silence cannot be told from loss: a lossy link (or one branch
//!   of a load balancer, whose silences count for its siblings too) slows its routers' first
//!   probes to one per interval as well — still answered, only later;
//! - a router that answers faster than a limited one can (more than [`FREE_ANSWERS`] plus two
//!   per interval since its first silence) is not limited, whatever its silences say: they are
//!   the silences of an anonymous router beside it behind a load balancer, or of a filter, and
//!   pacing it would only hold every probe at that TTL back;
//! - a probe is held back only while its trace can still use the answer: one whose turn would
//!   come later than the trace allows (its deadline less one wait) goes out at once and books
//!   no turn, as without pacing (the router will likely not answer it). Otherwise a router
//!   shared by many concurrent traces, such as the first hop, would queue probes past every
//!   trace's deadline and fail them all.
//!
//! The intervals are the kernel's plus 5%: its bucket refills exactly one token per interval,
//! counted in jiffies, and a probe the prober sends a little late brings the next one early;
//! at exactly the kernel's rate that next probe finds no token. The headroom banks a little of
//! the bucket with every paced probe, which absorbs such jitter.
//!
//! Everything else goes out at once. The arithmetic takes `now` as an argument, so it is tested
//! without a clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How limited routers are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterLimits {
    /// Gap between probes to a limited IPv4 router (Linux `net.ipv4.icmp_ratelimit`, 1 s,
    /// plus 5%: see the module docs).
    pub interval_v4: Duration,
    /// Gap between probes to a limited IPv6 router (`net.ipv6.icmp.ratelimit`, 100 ms, plus
    /// 5%).
    pub interval_v6: Duration,
    /// How long a router stays limited after it last showed the limit.
    pub hold: Duration,
}

impl RouterLimits {
    /// The interval for routers of `addr`'s family.
    fn interval_for(&self, addr: IpAddr) -> Duration {
        match addr {
            IpAddr::V4(_) => self.interval_v4,
            IpAddr::V6(_) => self.interval_v6,
        }
    }
}

impl Default for RouterLimits {
    fn default() -> Self {
        Self {
            interval_v4: Duration::from_millis(1050),
            interval_v6: Duration::from_millis(105),
            hold: Duration::from_secs(60),
        }
    }
}

/// Entries of the TTL map before it is cleared and relearned (a few MB at most).
const MAX_HINTS: usize = 65_536;
/// How often routers whose `hold` passed are dropped from the silent map (each lookup checks
/// its router's own `hold` meanwhile, so this bounds only the map's memory and the count).
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Silences within `hold` that show a router's limit.
const SILENCES: u32 = 3;
/// Answers a rate-limited Linux router can give at once (its bucket holds 6), plus one.
pub const FREE_ANSWERS: u32 = 7;
/// Routers kept per (prefix, TTL): the branches of a load balancer the engine tells apart.
pub const WIDTH: usize = 4;

/// The routers that answered at one TTL towards one prefix, the most recent first.
#[derive(Debug, Clone, Copy, Default)]
struct Seen([Option<IpAddr>; WIDTH]);

impl Seen {
    /// Puts `router` first, dropping the oldest when full.
    fn learn(&mut self, router: IpAddr) {
        let at = (self.0.iter())
            .position(|r| *r == Some(router) || r.is_none())
            .unwrap_or(WIDTH - 1);
        self.0[..=at].rotate_right(1);
        self.0[0] = Some(router);
    }

    fn routers(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.0.iter().map_while(|r| *r)
    }
}

/// A router that went silent recently.
#[derive(Debug, Clone, Copy)]
struct Silent {
    /// Silences since `since`.
    count: u32,
    since: Instant,
    /// When its next paced probe may go.
    next: Instant,
    /// When it is forgotten, unless it goes silent again.
    until: Instant,
    /// Answers it gave since `since`.
    answers: u32,
}

impl Silent {
    fn limited(&self) -> bool {
        self.count >= SILENCES
    }

    /// It answered faster since its first silence than a limited router could (a full bucket,
    /// then one per `interval`, given twice that).
    fn answers_freely(&self, now: Instant, interval: Duration) -> bool {
        let elapsed = now.saturating_duration_since(self.since).as_nanos();
        let intervals = elapsed / interval.as_nanos().max(1);
        u128::from(self.answers) > u128::from(FREE_ANSWERS) + 2 * intervals
    }
}

/// The engine-wide per-router pacing (see the module docs). The prober thread owns it: every
/// reply and every probe passes through it, so it takes no lock.
#[derive(Debug)]
pub struct RouterPacing {
    limits: RouterLimits,
    /// (destination prefix, TTL) → the routers that answered there.
    hints: HashMap<(IpAddr, u8), Seen>,
    /// Routers silent recently.
    silent: HashMap<IpAddr, Silent>,
    /// Of those, the limited ones.
    limited: usize,
    /// When `silent` is next rid of routers forgotten.
    prune_at: Instant,
}

impl RouterPacing {
    /// Pacing with `limits`.
    pub fn new(limits: RouterLimits) -> Self {
        Self {
            limits,
            hints: HashMap::new(),
            silent: HashMap::new(),
            limited: 0,
            prune_at: Instant::now(),
        }
    }

    /// `router` answered a probe to `dst` sent with `ttl`.
    pub fn learn(&mut self, dst: IpAddr, ttl: u8, router: IpAddr) {
        if self.hints.len() >= MAX_HINTS {
            self.hints.clear();
        }
        self.hints
            .entry((prefix(dst), ttl))
            .or_default()
            .learn(router);
        if !self.silent.is_empty()
            && let Some(s) = self.silent.get_mut(&router)
        {
            s.answers = s.answers.saturating_add(1);
        }
    }

    /// A probe to `dst` at `ttl` went unanswered: a silence of each router known there.
    pub fn silent(&mut self, dst: IpAddr, ttl: u8, now: Instant) {
        let Some(seen) = self.hints.get(&(prefix(dst), ttl)) else {
            return;
        };
        if self.silent.len() >= MAX_HINTS {
            self.silent.clear();
        }
        let hold = self.limits.hold;
        let fresh = Silent {
            count: 0,
            since: now,
            next: now,
            until: now,
            answers: 0,
        };
        for router in seen.routers() {
            let entry = self.silent.entry(router).or_insert(fresh);
            // Forgotten already, though not yet pruned: as if new.
            if entry.until <= now && entry.count > 0 {
                *entry = fresh;
            }
            if now.saturating_duration_since(entry.since) > hold {
                (entry.count, entry.since, entry.answers) = (0, now, 0);
            }
            entry.count += 1;
            entry.until = now + hold;
        }
        self.count(now);
    }

    /// When a probe to `dst` at `ttl` may be sent (`now` or later); reserves its slot. A
    /// `retry` is paced from the router's first silence, a first probe once it is limited. A
    /// probe whose slot would come after `latest` is not paced: `now`, and no slot is taken.
    pub fn reserve(
        &mut self,
        dst: IpAddr,
        ttl: u8,
        now: Instant,
        retry: bool,
        latest: Instant,
    ) -> Instant {
        if self.silent.is_empty() {
            return now;
        }
        self.prune(now);
        let Some(seen) = self.hints.get(&(prefix(dst), ttl)) else {
            return now;
        };
        // A router forgotten already (though not yet pruned) is not paced, nor one that is
        // only silent for a first probe, nor one that answers freely.
        let interval = self.limits.interval_for(dst);
        let paced = |s: &Silent| {
            s.until > now && (retry || s.limited()) && !s.answers_freely(now, interval)
        };
        let turn = (seen.routers())
            .filter_map(|r| self.silent.get(&r).filter(|s| paced(s)))
            .map(|s| s.next.max(now))
            .max();
        let Some(at) = turn.filter(|at| *at <= latest) else {
            return now;
        };
        let next = at + interval;
        for router in seen.routers() {
            if let Some(s) = self.silent.get_mut(&router).filter(|s| paced(s)) {
                s.next = next;
            }
        }
        at
    }

    /// Gives back the turn at `at` that [`reserve`](Self::reserve) booked for a probe to `dst`
    /// at `ttl` that will not be sent, where it is still its routers' last: the next probe
    /// booked there takes it. (A turn with others booked after it stays a gap.)
    pub fn release(&mut self, dst: IpAddr, ttl: u8, at: Instant) {
        let Some(seen) = self.hints.get(&(prefix(dst), ttl)) else {
            return;
        };
        let next = at + self.limits.interval_for(dst);
        for router in seen.routers() {
            if let Some(s) = self.silent.get_mut(&router)
                && s.next == next
            {
                s.next = at;
            }
        }
    }

    /// Drops the routers forgotten by `now` and recounts, at most once per [`PRUNE_EVERY`];
    /// returns the routers limited. Called on every paced lookup, and by the prober while idle
    /// so that the count falls to zero when the holds pass without traffic.
    pub fn prune(&mut self, now: Instant) -> usize {
        if !self.silent.is_empty() && now >= self.prune_at {
            self.prune_at = now + PRUNE_EVERY;
            self.silent.retain(|_, s| s.until > now);
            self.count(now);
        }
        self.limited
    }

    /// Counts the routers limited at `now` (those past their hold may still wait to be pruned).
    fn count(&mut self, now: Instant) {
        let limits = self.limits;
        self.limited = (self.silent.iter())
            .filter(|(router, s)| {
                s.limited()
                    && s.until > now
                    && !s.answers_freely(now, limits.interval_for(**router))
            })
            .count();
    }

    /// Routers limited now (as of the last silence or pruning).
    pub fn limited_routers(&self) -> usize {
        self.limited
    }
}

/// The destination's network: /24 on IPv4, /64 on IPv6.
fn prefix(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(a) => {
            let [a, b, c, _] = a.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("addr")
    }

    /// Past every slot these tests take: a `latest` that never holds a probe back.
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn nothing_waits_until_a_router_shows_its_limit() {
        let mut pacing = RouterPacing::new(RouterLimits::default());
        let now = Instant::now();
        let far = now + DAY;
        pacing.learn(ip("10.77.100.5"), 1, ip("10.77.1.2"));
        for _ in 0..100 {
            assert_eq!(pacing.reserve(ip("10.77.100.9"), 1, now, false, far), now);
        }
        // Silence where no router is known teaches nothing.
        pacing.silent(ip("10.77.100.5"), 2, now);
        assert_eq!(pacing.limited_routers(), 0);
    }

    #[test]
    fn a_limited_router_gets_one_probe_per_interval_for_the_whole_prefix() {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let now = Instant::now();
        let far = now + DAY;
        pacing.learn(ip("10.77.100.5"), 1, ip("10.77.1.2"));
        pacing.learn(ip("10.77.100.5"), 2, ip("10.77.2.2"));
        // One or two silences may be loss; the third shows the limit.
        pacing.silent(ip("10.77.100.7"), 1, now);
        pacing.silent(ip("10.77.100.8"), 1, now);
        assert_eq!(pacing.limited_routers(), 0);
        assert_eq!(pacing.reserve(ip("10.77.100.1"), 1, now, false, far), now);
        pacing.silent(ip("10.77.100.9"), 1, now);
        assert_eq!(pacing.limited_routers(), 1);
        // Any destination of the /24, at the limited router's TTL: one per second, in order.
        let slots: Vec<Instant> = (1..=5u8)
            .map(|n| pacing.reserve(ip(&format!("10.77.100.{n}")), 1, now, false, far))
            .collect();
        let expect: Vec<Instant> = (0..5u32).map(|i| now + limits.interval_v4 * i).collect();
        assert_eq!(slots, expect);
        // Other TTLs, other networks: at once.
        assert_eq!(pacing.reserve(ip("10.77.100.1"), 2, now, false, far), now);
        assert_eq!(pacing.reserve(ip("10.78.100.1"), 1, now, false, far), now);
        // A slot in the past is not kept: the schedule restarts from now.
        let later = now + Duration::from_secs(30);
        assert_eq!(
            pacing.reserve(ip("10.77.100.1"), 1, later, false, far),
            later
        );
        // After the hold without new silence, the router is no longer paced.
        let free = now + limits.hold + Duration::from_secs(1);
        assert_eq!(pacing.reserve(ip("10.77.100.1"), 1, free, false, far), free);
        assert_eq!(pacing.limited_routers(), 0);
    }

    #[test]
    fn retries_are_paced_from_the_first_silence_first_probes_only_once_limited() {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let now = Instant::now();
        let far = now + DAY;
        pacing.learn(ip("10.77.100.5"), 1, ip("10.77.1.2"));
        pacing.silent(ip("10.77.100.5"), 1, now);
        assert_eq!(pacing.limited_routers(), 0);
        let dst = ip("10.77.100.6");
        let retries: Vec<Instant> = (0..3)
            .map(|_| pacing.reserve(dst, 1, now, true, far))
            .collect();
        let step = limits.interval_v4;
        assert_eq!(retries, [now, now + step, now + step * 2]);
        assert_eq!(pacing.reserve(dst, 1, now, false, far), now);
    }

    #[test]
    fn a_ttl_keeps_its_routers_most_recent_first() {
        let mut seen = Seen::default();
        for n in [1, 2, 1, 3, 4, 5, 3] {
            seen.learn(ip(&format!("10.77.3.{n}")));
        }
        let routers: Vec<IpAddr> = seen.routers().collect();
        let expect: Vec<IpAddr> = [3, 5, 4, 1].map(|n| ip(&format!("10.77.3.{n}"))).into();
        assert_eq!(routers, expect, "2 is the oldest, dropped for 5");
    }

    /// Behind a load balancer the flows of one prefix reach two routers at TTL 3; a retry may
    /// be either's, so its turn is free at both and booked at both: neither branch gets more
    /// than one probe per interval, whichever branch each flow takes.
    #[test]
    fn a_retry_behind_a_load_balancer_is_paced_for_every_branch() {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let now = Instant::now();
        let far = now + DAY;
        let (a, b) = (ip("10.77.3.2"), ip("10.77.4.2"));
        pacing.learn(ip("10.77.100.5"), 3, a);
        pacing.learn(ip("10.77.100.6"), 3, b);
        // The branch seen first is busy with another network: its turns come first there.
        pacing.learn(ip("10.88.0.1"), 3, a);
        pacing.silent(ip("10.88.0.1"), 3, now);
        let step = limits.interval_v4;
        for i in 0..2u32 {
            assert_eq!(
                pacing.reserve(ip("10.88.0.1"), 3, now, true, far),
                now + step * i
            );
        }
        // One silence at TTL 3 of the /24 is a silence of both branches.
        pacing.silent(ip("10.77.100.7"), 3, now);
        let retries: Vec<Instant> = (0..3)
            .map(|_| pacing.reserve(ip("10.77.100.8"), 3, now, true, far))
            .collect();
        assert_eq!(retries, [2, 3, 4].map(|i| now + step * i));
        // ...and the other network's next turn at `a` comes after them.
        assert_eq!(
            pacing.reserve(ip("10.88.0.1"), 3, now, true, far),
            now + step * 5
        );
        // First probes are not paced: neither branch is limited.
        assert_eq!(pacing.reserve(ip("10.77.100.8"), 3, now, false, far), now);
        assert_eq!(pacing.limited_routers(), 0);
    }

    /// Behind a load balancer with an anonymous branch, every retry at that TTL counts as a
    /// silence of the branch that answers; it answers far faster than a limited router could,
    /// so it is not paced (holding every probe at that TTL back for nothing). One answering at
    /// a limited router's pace stays paced.
    #[test]
    fn a_router_answering_faster_than_a_limit_allows_is_not_paced() {
        let limits = RouterLimits::default();
        let step = limits.interval_v4;
        let now = Instant::now();
        let far = now + DAY;
        let (dst, router) = (ip("10.77.100.5"), ip("10.77.3.2"));
        let limited = |answers: u32| {
            let mut pacing = RouterPacing::new(limits);
            pacing.learn(dst, 3, router);
            for _ in 0..3 {
                pacing.silent(dst, 3, now);
            }
            for _ in 0..answers {
                pacing.learn(dst, 3, router);
            }
            pacing
        };
        // Two intervals on: more than 7 + 2 · 2 answers is more than a limit allows.
        let later = now + step * 2;
        let mut free = limited(FREE_ANSWERS + 5);
        assert_eq!(free.reserve(dst, 3, later, true, far), later);
        assert_eq!(free.reserve(dst, 3, later, false, far), later);
        free.silent(dst, 3, later);
        assert_eq!(free.limited_routers(), 0);
        let mut paced = limited(FREE_ANSWERS + 4);
        assert_eq!(paced.reserve(dst, 3, later, true, far), later);
        assert_eq!(paced.reserve(dst, 3, later, true, far), later + step);
        assert_eq!(paced.limited_routers(), 1);
    }

    #[test]
    fn silences_spread_wider_than_the_hold_are_loss() {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let now = Instant::now();
        pacing.learn(ip("10.77.100.5"), 1, ip("10.77.1.2"));
        for i in 0..10u32 {
            pacing.silent(
                ip("10.77.100.5"),
                1,
                now + (limits.hold / 2 + Duration::from_secs(1)) * i,
            );
        }
        assert_eq!(pacing.limited_routers(), 0);
    }

    /// A router limited at `now` with 100 slots booked far past its hold, and a lookup 1 ms
    /// before the hold ends (still paced, nothing pruned); returns the pacing and the hold's
    /// end, when the next lookup is within the pruning period.
    fn limited_to_the_end_of_its_hold(dst: IpAddr, now: Instant) -> (RouterPacing, Instant) {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let far = now + DAY;
        pacing.learn(dst, 1, ip("10.77.1.2"));
        for _ in 0..3 {
            pacing.silent(dst, 1, now);
        }
        for _ in 0..100 {
            pacing.reserve(dst, 1, now, false, far);
        }
        let before = now + limits.hold - Duration::from_millis(1);
        assert!(pacing.reserve(dst, 1, before, false, far) > before);
        assert_eq!(pacing.limited_routers(), 1);
        (pacing, now + limits.hold)
    }

    #[test]
    fn a_limited_router_is_forgotten_once_its_hold_passes() {
        let (dst, now) = (ip("10.77.100.5"), Instant::now());
        let far = now + DAY;
        let (mut pacing, later) = limited_to_the_end_of_its_hold(dst, now);
        // At the hold's end, not pruned yet: not paced any more, slots booked or not.
        assert_eq!(pacing.reserve(dst, 1, later, false, far), later);
        assert_eq!(pacing.reserve(dst, 1, later, true, far), later);
        // Pruned at the first lookup a period later.
        let pruned = later + PRUNE_EVERY;
        assert_eq!(pacing.reserve(dst, 1, pruned, false, far), pruned);
        assert_eq!(pacing.limited_routers(), 0);
        // A new silence then starts from nothing: one is loss, not a limit, and its retry
        // goes at once rather than after the slots booked before.
        pacing.silent(dst, 1, pruned);
        assert_eq!(pacing.limited_routers(), 0);
        assert_eq!(pacing.reserve(dst, 1, pruned, true, far), pruned);
    }

    /// With no probe at all (the engine idle), pruning alone lets the count fall when the
    /// hold passes: the prober calls it once a second while routers are held limited.
    #[test]
    fn an_idle_prune_forgets_a_limited_router_after_its_hold() {
        let (dst, now) = (ip("10.77.100.5"), Instant::now());
        let (mut pacing, later) = limited_to_the_end_of_its_hold(dst, now);
        assert_eq!(pacing.prune(later - Duration::from_millis(1)), 1);
        assert_eq!(pacing.prune(later + PRUNE_EVERY), 0);
        assert_eq!(pacing.limited_routers(), 0);
    }

    #[test]
    fn a_silence_after_the_hold_starts_over_before_the_router_is_pruned() {
        let (dst, now) = (ip("10.77.100.5"), Instant::now());
        let (mut pacing, later) = limited_to_the_end_of_its_hold(dst, now);
        // One silence at the hold's end, the entry still in the map: loss, not a limit, and
        // its retry is not queued behind the slots booked in the earlier spell.
        pacing.silent(dst, 1, later);
        assert_eq!(pacing.limited_routers(), 0);
        assert_eq!(pacing.reserve(dst, 1, later, true, now + DAY), later);
    }

    #[test]
    fn ipv6_routers_are_paced_at_their_own_interval() {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let now = Instant::now();
        let far = now + DAY;
        pacing.learn(ip("fd77:100::5"), 3, ip("fd77:3::2"));
        for _ in 0..3 {
            pacing.silent(ip("fd77:100::9"), 3, now);
        }
        let first = pacing.reserve(ip("fd77:100::1"), 3, now, false, far);
        let second = pacing.reserve(ip("fd77:100::2"), 3, now, false, far);
        assert_eq!((first, second), (now, now + limits.interval_v6));
    }

    /// A trace that ends with probes still booked gives their turns back, latest first, so the
    /// traces booking after it are not held behind turns nobody uses.
    #[test]
    fn turns_of_probes_never_sent_are_given_back() {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let now = Instant::now();
        let far = now + DAY;
        let dst = ip("10.77.100.1");
        pacing.learn(dst, 1, ip("10.77.1.2"));
        pacing.silent(dst, 1, now);
        let step = limits.interval_v4;
        let booked: Vec<Instant> = (0..3)
            .map(|_| pacing.reserve(dst, 1, now, true, far))
            .collect();
        assert_eq!(booked, [now, now + step, now + step * 2]);
        // The middle one is not the last: it stays a gap; the last two go back.
        pacing.release(dst, 1, booked[1]);
        assert_eq!(pacing.reserve(dst, 1, now, true, far), now + step * 3);
        pacing.release(dst, 1, now + step * 3);
        pacing.release(dst, 1, booked[2]);
        assert_eq!(pacing.reserve(dst, 1, now, true, far), now + step * 2);
    }

    #[test]
    fn a_probe_is_not_held_past_what_its_trace_can_wait() {
        let limits = RouterLimits::default();
        let mut pacing = RouterPacing::new(limits);
        let now = Instant::now();
        let far = now + DAY;
        pacing.learn(ip("10.77.100.5"), 1, ip("10.77.1.2"));
        for _ in 0..3 {
            pacing.silent(ip("10.77.100.9"), 1, now);
        }
        let step = limits.interval_v4;
        // Five traces book the limited first hop's next five seconds.
        for i in 0..5u32 {
            assert_eq!(
                pacing.reserve(ip("10.77.100.1"), 1, now, false, far),
                now + step * i
            );
        }
        // One that must be sent within 2 s goes at once and takes no turn...
        let soon = now + step * 2;
        assert_eq!(pacing.reserve(ip("10.77.100.2"), 1, now, false, soon), now);
        // ...so the next trace that can wait still gets the sixth second.
        assert_eq!(
            pacing.reserve(ip("10.77.100.3"), 1, now, false, far),
            now + step * 5
        );
        // A turn exactly at `latest` is still taken.
        let sixth = now + step * 6;
        assert_eq!(
            pacing.reserve(ip("10.77.100.4"), 1, now, true, sixth),
            sixth
        );
    }
}
