//! The single-path (Paris) trace as a state machine without I/O: it says which probes to send
//! and when to wake up, takes the replies the engine matched to its flow, and decides when the
//! trace is over. Time is passed in, so every rule is tested without a network or a clock.
//!
//! # Rules
//!
//! - TTLs are probed in parallel, a window of [`ParisConfig::gap_limit`] TTLs at a time: the
//!   next window opens when a router answers at the highest TTL sent, or, once everything sent
//!   is settled, up to `gap_limit` past the highest answer. A path of `d` hops costs `d` probes
//!   when `d` is a multiple of the window, and at most `gap_limit - 1` more otherwise.
//! - A TTL without an answer `wait` after its last probe is probed again, up to `attempts`.
//! - The trace is complete once the destination answered (echo reply, port unreachable from it,
//!   TCP RST or SYN-ACK) and every TTL below it answered or used all its attempts; an ICMP
//!   unreachable from a router ends it the same way as `UNREACH`.
//! - Without an end, `gap_limit` consecutive silent TTLs past the highest answer stop it
//!   (`GAPLIMIT`), and having nothing more to send at `max_ttl` stops it (`HOPLIMIT`).

use std::time::{Duration, Instant};

use super::{Kind, MAX_ATTEMPT, MAX_TTL, MAX_WAIT, ProbeId, Reply};

/// How one Paris trace probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParisConfig {
    /// Highest TTL probed, at most [`MAX_TTL`].
    pub max_ttl: u8,
    /// Probes per TTL, 1..=`MAX_ATTEMPT + 1`.
    pub attempts: u8,
    /// How long to wait for the answer to one probe, at most [`MAX_WAIT`].
    pub wait: Duration,
    /// Consecutive silent TTLs that end a trace; also the probing window.
    pub gap_limit: u8,
}

impl ParisConfig {
    /// The configuration with every field clamped into what probes can carry.
    pub fn clamped(self) -> Self {
        Self {
            max_ttl: self.max_ttl.clamp(1, MAX_TTL),
            attempts: self.attempts.clamp(1, MAX_ATTEMPT + 1),
            wait: self.wait.min(MAX_WAIT),
            gap_limit: self.gap_limit.max(1),
        }
    }
}

/// Why a trace ended, with scamper's names for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The destination answered.
    Completed,
    /// A router answered ICMP destination unreachable, with this code.
    Unreach(u8),
    /// `gap_limit` consecutive TTLs stayed silent.
    GapLimit,
    /// `max_ttl` was probed without reaching the destination.
    HopLimit,
}

impl StopReason {
    /// scamper's `stop_reason` string.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Completed => "COMPLETED",
            StopReason::Unreach(_) => "UNREACH",
            StopReason::GapLimit => "GAPLIMIT",
            StopReason::HopLimit => "HOPLIMIT",
        }
    }

    /// scamper's `stop_data`: the ICMP code for `UNREACH`, else 0.
    pub fn data(self) -> u8 {
        match self {
            StopReason::Unreach(code) => code,
            _ => 0,
        }
    }
}

/// One answered probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The reply as matched.
    pub reply: Reply,
    /// When its probe was sent.
    pub tx: Instant,
    /// When the reply was read.
    pub rx: Instant,
}

/// What the trace wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these probes (possibly none), then call [`ParisTrace::poll`] again at `wake` or when
    /// a reply arrives, whichever is first.
    Probe {
        /// Probes to send now.
        send: Vec<ProbeId>,
        /// When to poll again without a reply.
        wake: Instant,
    },
    /// The trace is over.
    Done(StopReason),
}

/// Per-TTL progress.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Probes sent at this TTL so far.
    sent: u8,
    /// When each attempt was sent.
    tx: [Option<Instant>; (MAX_ATTEMPT + 1) as usize],
    /// Whether some attempt was answered.
    answered: bool,
}

impl Slot {
    fn last_tx(&self) -> Option<Instant> {
        self.sent
            .checked_sub(1)
            .and_then(|i| self.tx[usize::from(i)])
    }
}

/// One Paris trace in progress.
#[derive(Debug, Clone)]
pub struct ParisTrace {
    config: ParisConfig,
    /// Index `ttl - 1`.
    slots: Vec<Slot>,
    /// The highest TTL probed so far.
    highest_sent: u8,
    /// The lowest TTL with an answer that ends the path, and why.
    end: Option<(u8, StopReason)>,
    answers: Vec<Answer>,
    /// The ICMP extensions some answers came with.
    extensions: Extensions,
    /// Replies for this flow that were not accepted (duplicates, unknown attempts).
    rejected: usize,
    stop: Option<StopReason>,
}

/// The ICMP extension structures (RFC 4884, as [`super::icmpext::find`] returns them) that came
/// with a trace's answers, by probe. Few routers send them, so this is usually empty and
/// allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct Extensions(Vec<(ProbeId, Box<[u8]>)>);

impl Extensions {
    /// None yet.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Keeps `extension`, which came with the answer to `id`.
    pub fn add(&mut self, id: ProbeId, extension: &[u8]) {
        self.0.push((id, extension.into()));
    }

    /// The extension structure that came with the answer to `id`, if any.
    pub fn get(&self, id: ProbeId) -> Option<&[u8]> {
        self.0.iter().find(|(p, _)| *p == id).map(|(_, e)| &**e)
    }
}

impl ParisTrace {
    /// A trace with `config` (clamped); nothing is sent until the first [`poll`](Self::poll).
    pub fn new(config: ParisConfig) -> Self {
        let config = config.clamped();
        Self {
            slots: vec![Slot::default(); usize::from(config.max_ttl)],
            config,
            highest_sent: 0,
            end: None,
            // Room for a typical path's answers, so they are not reallocated as they come.
            answers: Vec::with_capacity(usize::from(config.max_ttl.min(16))),
            extensions: Extensions::new(),
            rejected: 0,
            stop: None,
        }
    }

    /// The configuration in use (after clamping).
    pub fn config(&self) -> &ParisConfig {
        &self.config
    }

    /// Records that `id` left at `at`. Call once per probe [`poll`](Self::poll) asked for.
    pub fn sent(&mut self, id: ProbeId, at: Instant) {
        if let Some(slot) = self.slot_mut(id.ttl)
            && let Some(tx) = slot.tx.get_mut(usize::from(id.attempt))
        {
            *tx = Some(at);
        }
    }

    /// Takes a reply matched to this trace's flow; false (and counted) when it is not one the
    /// trace is waiting for: an attempt not sent, or a second answer to the same probe (from
    /// any address).
    pub fn on_reply(&mut self, reply: Reply, rx: Instant) -> bool {
        let ttl = reply.id.ttl;
        // One probe gets one answer: a second one, from anyone, is a duplicate (or a forgery
        // that got past the tag).
        let duplicate = self.answers.iter().any(|a| a.reply.id == reply.id);
        let tx = self.slot_mut(ttl).and_then(|slot| {
            let tx = (reply.id.attempt < slot.sent)
                .then(|| {
                    slot.tx
                        .get(usize::from(reply.id.attempt))
                        .copied()
                        .flatten()
                })
                .flatten()?;
            slot.answered = true;
            Some(tx)
        });
        let (Some(tx), false) = (tx, duplicate) else {
            self.rejected += 1;
            return false;
        };
        self.answers.push(Answer { reply, tx, rx });
        if let Some(reason) = ends_path(&reply)
            && self.end.is_none_or(|(at, _)| ttl < at)
        {
            self.end = Some((ttl, reason));
        }
        true
    }

    /// Decides what to do at `now`: probes to (re)send, or the end of the trace.
    pub fn poll(&mut self, now: Instant) -> Step {
        if let Some(stop) = self.stop {
            return Step::Done(stop);
        }
        let wait = self.config.wait;
        let limit = self.end.map_or(self.highest_sent, |(ttl, _)| ttl - 1);
        let mut send = Vec::new();
        let mut wake: Option<Instant> = None;
        let mut pending = false;
        // Retries, and whether anything below the end is still open.
        for ttl in 1..=limit {
            let slot = self.slots[usize::from(ttl - 1)];
            if slot.answered {
                continue;
            }
            let Some(last) = slot.last_tx() else {
                // Asked for but not yet reported sent: wait for it like an open probe.
                pending = true;
                continue;
            };
            let due = last + wait;
            if due > now {
                pending = true;
                wake = earliest(wake, due);
            } else if slot.sent < self.config.attempts {
                send.push(ProbeId {
                    ttl,
                    attempt: slot.sent,
                });
                pending = true;
            }
        }
        if let Some((_, reason)) = self.end {
            if !pending && send.is_empty() {
                return self.finish(reason);
            }
        } else {
            let highest_answered = (1..=self.highest_sent)
                .rev()
                .find(|&ttl| self.slots[usize::from(ttl - 1)].answered)
                .unwrap_or(0);
            let gap = self.config.gap_limit;
            // A new window opens when a router answered at the highest TTL sent (the path goes
            // on past everything sent), or when everything sent is settled and the silence
            // past the highest answer is shorter than the gap limit. Answers below the top do
            // not slide it: the destination may be inside the window already.
            let window_end = if self.highest_sent == 0 {
                gap
            } else if highest_answered == self.highest_sent {
                self.highest_sent.saturating_add(gap)
            } else if !pending && send.is_empty() {
                highest_answered.saturating_add(gap)
            } else {
                self.highest_sent
            }
            .min(self.config.max_ttl);
            for ttl in self.highest_sent + 1..=window_end {
                send.push(ProbeId { ttl, attempt: 0 });
            }
            self.highest_sent = self.highest_sent.max(window_end);
            if send.is_empty() && !pending {
                let silent = self.highest_sent - highest_answered;
                let reason = if silent >= self.config.gap_limit {
                    StopReason::GapLimit
                } else {
                    StopReason::HopLimit
                };
                return self.finish(reason);
            }
        }
        for id in &send {
            if let Some(slot) = self.slot_mut(id.ttl) {
                slot.sent = id.attempt + 1;
            }
        }
        Step::Probe {
            wake: wake.unwrap_or(now + wait),
            send,
        }
    }

    fn finish(&mut self, reason: StopReason) -> Step {
        self.stop = Some(reason);
        Step::Done(reason)
    }

    fn slot_mut(&mut self, ttl: u8) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(ttl).checked_sub(1)?)
    }

    /// The answers up to the end of the path, sorted by TTL then attempt (the order scamper
    /// prints its hops in). Sorts them in place, so the trace's output needs no copy.
    pub fn answers(&mut self) -> &[Answer] {
        self.answers_and_extensions().0
    }

    /// [`answers`](Self::answers), and the ICMP extensions some of them came with.
    pub fn answers_and_extensions(&mut self) -> (&[Answer], &Extensions) {
        let last = self.end.map_or(MAX_TTL, |(ttl, _)| ttl);
        self.answers
            .sort_unstable_by_key(|a| (a.reply.id.ttl, a.reply.id.attempt, a.rx));
        let kept = self.answers.partition_point(|a| a.reply.id.ttl <= last);
        (&self.answers[..kept], &self.extensions)
    }

    /// Keeps the ICMP extension structure that came with the reply just accepted for `id`.
    pub fn add_extension(&mut self, id: ProbeId, extension: &[u8]) {
        self.extensions.add(id, extension);
    }

    /// Probes sent so far.
    pub fn probes_sent(&self) -> usize {
        self.slots.iter().map(|s| usize::from(s.sent)).sum()
    }

    /// The number of hops the result spans: the end of the path, else the highest TTL probed.
    pub fn hop_count(&self) -> u8 {
        self.end.map_or(self.highest_sent, |(ttl, _)| ttl)
    }

    /// Replies for this flow that were not accepted.
    pub fn rejected(&self) -> usize {
        self.rejected
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Whether `reply` ends the path, and how: the destination answering, or a router's
/// unreachable.
fn ends_path(reply: &Reply) -> Option<StopReason> {
    match reply.kind {
        Kind::TimeExceeded if reply.from != reply.flow_dst => None,
        Kind::Unreachable { code } if reply.from != reply.flow_dst => {
            Some(StopReason::Unreach(code))
        }
        _ => Some(StopReason::Completed),
    }
}

#[cfg(test)]
mod tests;
