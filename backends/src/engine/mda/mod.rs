//! Multipath discovery (MDA, Augustin et al.) as a state machine without I/O, like
//! [`ParisTrace`](super::paris::ParisTrace): it says which probes to send, takes the replies
//! matched to its flows, and records which flow met which router at which TTL.
//!
//! A *flow* is one value of what load balancers hash (the engine varies the source port, or
//! the echo identifier); flows are numbered from 0 here and the engine maps them to ports.
//!
//! # Rules
//!
//! The trace goes hop by hop. At TTL `t` the routers found at the previous responsive TTL are
//! the *parents*; each parent `v` is expanded with flows known to pass through `v` (its
//! *group*). A group that has seen `k` distinct next hops is done once `n(k + 1)` of its probes
//! were settled ([`probes_to_rule_out`], the stopping rule at 95% or 99% confidence), or at the
//! first answer from the destination (the path ends there). Silence counts as one more next
//! hop, `*` (an anonymous router, as in the MDA papers): a probe that stays silent does not end
//! its group, so the routers that do answer at that TTL are still found; a group whose `n(2)`
//! probes all stay silent is a silent hop. An unreachable from a router ends that flow's branch,
//! not the group.
//!
//! - When a group has too few flows through `v`, fresh flows are probed at `v`'s TTL to find
//!   more (node control, as scamper's `tracelb`), at most [`NODE_CONTROL`] times the rule's
//!   count per group and TTL: a parent that few flows reach (per-packet balancing, a route
//!   change) is expanded with the flows found rather than spending the whole budget.
//! - When there is a single parent, every flow passes through it, so any flow serves and no
//!   probe is spent finding flows (the MDA-Lite observation, Vermeulen et al. 2018).
//! - The first probe of a group at a new TTL goes alone: if it meets the destination, one probe
//!   settled the group, as in scamper; otherwise the rest of the `n(2)` go in one batch.
//! - Probes are sent in rounds: the next round is decided once everything sent is answered or
//!   has used its `attempts` (each `wait` long).
//! - A group with no answer carries its parent over the silent TTL; `gap_limit` silent TTLs
//!   in a row end it. The trace ends when no group is left, at `max_ttl`, or when
//!   `max_probes` were sent (the TTL being probed then is closed with what it found).
//! - Flows that stayed silent where others of their group answered are not followed further:
//!   what lies behind an anonymous router beside responsive ones is found only through flows
//!   that meet a responsive router later. Such silence, or a branch ending in an unreachable,
//!   also means not every flow reaches the next TTL's parents, so a single parent there is
//!   not taken as crossed by every flow.
//!
//! New routers found at a parent's TTL by the extra flows become parents too; the stopping
//! rule at that earlier TTL is not re-run for them (one more node there than the rule was sized
//! for), which is the same trade-off MDA-Lite makes. Their link in comes from the parent every
//! flow crossed at the TTL before, when there was one; otherwise the probes cannot tell which
//! router led to them and they have none.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::paris::Answer;
use super::{Kind, MAX_ATTEMPT, MAX_PROBES, MAX_TTL, MAX_WAIT, ProbeId, Reply};
pub use crate::Confidence;

#[cfg(test)]
pub(crate) mod tests;

/// Probes that must all land on the `k - 1` next hops already seen before a `k`-th is ruled
/// out (`k` ≥ 2; smaller `k` is taken as 2): the least `n` for which `n` probes spread evenly
/// over `k` next hops miss one of them with probability at most ε = 1 − confidence. By
/// inclusion–exclusion that probability is `Σ_{i=1}^{k−1} (−1)^{i+1} C(k, i) ((k − i) / k)^n`;
/// the search starts from the union bound `k ((k − 1) / k)^n ≤ ε` (the closed form Diamond-Miner
/// uses, sometimes one too many) and walks down. This reproduces scamper's table exactly for
/// every `k` it has (2 to 99): 6, 11, 16, 21, 27 ... at 95% and 8, 15, 21, 28, 36 ... at 99%.
pub fn probes_to_rule_out(k: usize, confidence: Confidence) -> u32 {
    let eps = confidence.failure();
    let k = k.max(2);
    let kf = k as f64;
    let miss = |n: u32| {
        let mut sum = 0.0;
        let mut binomial = 1.0;
        for i in 1..k {
            binomial *= (k - i + 1) as f64 / i as f64;
            let term = binomial * ((k - i) as f64 / kf).powi(n as i32);
            sum += if i % 2 == 1 { term } else { -term };
        }
        sum
    };
    let upper = ((eps / kf).ln() / ((kf - 1.0) / kf).ln()).ceil().max(1.0);
    // n grows like k ln(k / ε): far below i32::MAX for any k a hop can have.
    let mut n = upper as u32;
    while n > 1 && miss(n - 1) <= eps {
        n -= 1;
    }
    n
}

/// How one multipath trace probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MdaConfig {
    /// The stopping rule's confidence.
    pub confidence: Confidence,
    /// Highest TTL probed, at most [`MAX_TTL`].
    pub max_ttl: u8,
    /// Probes per (flow, TTL), 1..=`MAX_ATTEMPT + 1`.
    pub attempts: u8,
    /// How long to wait for the answer to one probe, at most [`MAX_WAIT`].
    pub wait: Duration,
    /// Consecutive silent TTLs that end a branch.
    pub gap_limit: u8,
    /// Probes the trace may send in all, at most [`MAX_PROBES`].
    pub max_probes: u32,
}

impl MdaConfig {
    /// The configuration with every field clamped into what probes can carry.
    pub fn clamped(self) -> Self {
        Self {
            max_ttl: self.max_ttl.clamp(1, MAX_TTL),
            attempts: self.attempts.clamp(1, MAX_ATTEMPT + 1),
            gap_limit: self.gap_limit.max(1),
            max_probes: self.max_probes.clamp(1, MAX_PROBES),
            wait: self.wait.min(MAX_WAIT),
            ..self
        }
    }
}

/// A flow's number within one trace.
pub type FlowIx = u16;

/// One probe to send: which flow, which TTL and attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MdaProbe {
    /// The flow.
    pub flow: FlowIx,
    /// TTL and attempt.
    pub id: ProbeId,
}

/// What the trace wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these probes (possibly none), then poll again at `wake` or on a reply.
    Probe {
        /// Probes to send now.
        send: Vec<MdaProbe>,
        /// When to poll again without a reply.
        wake: Instant,
    },
    /// The trace is over.
    Done,
}

/// One (flow, TTL): its attempts and its answer.
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    sent: u8,
    tx: [Option<Instant>; (MAX_ATTEMPT + 1) as usize],
    answer: Option<Answer>,
}

impl Cell {
    fn last_tx(&self) -> Option<Instant> {
        self.sent
            .checked_sub(1)
            .and_then(|i| self.tx[usize::from(i)])
    }
}

/// Fresh flows node control may probe for one group at one TTL, as a multiple of the number of
/// probes the stopping rule asks of the group.
pub const NODE_CONTROL: u32 = 2;

/// A parent and the flows it is expanded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    /// The router the flows pass through; `None` before the first hop.
    parent: Option<IpAddr>,
    /// Its TTL (0 before the first hop).
    parent_ttl: u8,
    /// Silent TTLs between the parent and the TTL being probed.
    gap: u8,
    /// Every flow passes through the parent (it is the only one).
    any_flow: bool,
    /// Fresh flows probed at the parent's TTL for this group (node control).
    fresh: u32,
}

impl Group {
    /// The group of router `parent`, found at `ttl`.
    fn of(parent: IpAddr, ttl: u8) -> Self {
        Self {
            parent: Some(parent),
            parent_ttl: ttl,
            gap: 0,
            any_flow: false,
            fresh: 0,
        }
    }
}

/// What a group's probes at one TTL found.
#[derive(Debug, Default)]
struct Tally {
    answered: u32,
    silent: u32,
    next_hops: Vec<IpAddr>,
    /// The destination answered: the path ends here.
    ends: bool,
    /// Some answer ended its flow's branch (the destination, or an unreachable).
    branch_ended: bool,
}

impl Tally {
    /// Probes settled, answered or silent.
    fn settled(&self) -> u32 {
        self.answered + self.silent
    }

    /// Next hops seen, silence counting as one (`*`).
    fn next_hop_count(&self) -> usize {
        self.next_hops.len() + usize::from(self.silent > 0)
    }

    /// Every flow probed went on to a router of the next TTL.
    fn all_go_on(&self) -> bool {
        self.silent == 0 && !self.branch_ended
    }
}

/// A link found: from a router, over `silent` unresponsive hops, to a router, the destination,
/// or nothing (`to: None`, a branch that went silent until the gap limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The near end.
    pub from: IpAddr,
    /// Silent hops in between.
    pub silent: u8,
    /// The far end.
    pub to: Option<IpAddr>,
    /// The probes that crossed it, as (TTL, flow), answered by `to`.
    pub probes: Vec<(u8, FlowIx)>,
}

/// One multipath trace in progress.
#[derive(Debug, Clone)]
pub struct MdaTrace {
    config: MdaConfig,
    /// Index `ttl`; index 0 unused.
    cells: Vec<BTreeMap<FlowIx, Cell>>,
    /// Probes sent and not settled, as (TTL, flow).
    open: Vec<(u8, FlowIx)>,
    /// Flows numbered so far.
    flows: u16,
    /// The TTL being expanded.
    ttl: u8,
    groups: Vec<Group>,
    /// The groups of the TTL before, as they were closed (to link late parents).
    closed: Vec<Group>,
    links: Vec<Link>,
    probes_sent: u32,
    rejected: usize,
    done: bool,
}

impl MdaTrace {
    /// A trace with `config` (clamped); nothing is sent until the first [`poll`](Self::poll).
    pub fn new(config: MdaConfig) -> Self {
        let config = config.clamped();
        Self {
            cells: vec![BTreeMap::new(); usize::from(config.max_ttl) + 1],
            config,
            open: Vec::new(),
            flows: 0,
            ttl: 1,
            groups: vec![Group {
                parent: None,
                parent_ttl: 0,
                gap: 0,
                any_flow: true,
                fresh: 0,
            }],
            closed: Vec::new(),
            links: Vec::new(),
            probes_sent: 0,
            rejected: 0,
            done: false,
        }
    }

    /// The configuration in use (after clamping).
    pub fn config(&self) -> &MdaConfig {
        &self.config
    }

    /// Records that `probe` left at `at`. Call once per probe [`poll`](Self::poll) asked for.
    pub fn sent(&mut self, probe: MdaProbe, at: Instant) {
        if let Some(cell) = self.cell_mut(probe.id.ttl, probe.flow)
            && let Some(tx) = cell.tx.get_mut(usize::from(probe.id.attempt))
        {
            *tx = Some(at);
        }
    }

    /// Takes a reply matched to flow `flow` of this trace; false (and counted) when no probe
    /// is waiting for it: an attempt not sent, a second answer to the same probe, or one to a
    /// probe already settled silent (its TTL may be closed).
    pub fn on_reply(&mut self, flow: FlowIx, reply: Reply, rx: Instant) -> bool {
        let open = self.open.contains(&(reply.id.ttl, flow));
        let accepted = open
            .then_some(())
            .and_then(|()| self.cell_mut(reply.id.ttl, flow))
            .and_then(|cell| {
                if cell.answer.is_some() || reply.id.attempt >= cell.sent {
                    return None;
                }
                let tx = cell.tx[usize::from(reply.id.attempt)]?;
                cell.answer = Some(Answer { reply, tx, rx });
                Some(())
            });
        if accepted.is_none() {
            self.rejected += 1;
        }
        accepted.is_some()
    }

    /// Decides what to do at `now`: probes to (re)send, or the end of the trace.
    pub fn poll(&mut self, now: Instant) -> Step {
        if self.done {
            return Step::Done;
        }
        let wait = self.config.wait;
        let mut send = Vec::new();
        let mut wake: Option<Instant> = None;
        let mut i = 0;
        while i < self.open.len() {
            let (ttl, flow) = self.open[i];
            let cell = self.cells[usize::from(ttl)][&flow];
            let due = cell.last_tx().map(|t| t + wait);
            if cell.answer.is_some() {
                self.open.swap_remove(i);
                continue;
            }
            match due {
                // Asked for but not yet reported sent: wait for it like an open probe.
                None => {}
                Some(due) if due > now => wake = Some(wake.map_or(due, |w| w.min(due))),
                // A retry is due; without attempts or budget left the probe is settled silent.
                Some(_) if cell.sent < self.config.attempts && self.has_room(send.len()) => send
                    .push(MdaProbe {
                        flow,
                        id: ProbeId {
                            ttl,
                            attempt: cell.sent,
                        },
                    }),
                Some(_) => {
                    self.open.swap_remove(i);
                    continue;
                }
            }
            i += 1;
        }
        if self.open.is_empty() {
            send = self.next_round();
        }
        let room = self.config.max_probes.saturating_sub(self.probes_sent);
        send.truncate(usize::try_from(room).unwrap_or(usize::MAX));
        if send.is_empty() && self.open.is_empty() {
            // Out of budget mid-TTL: what this TTL found is still linked.
            if !self.groups.is_empty() {
                self.close_ttl();
            }
            self.done = true;
            return Step::Done;
        }
        for p in &send {
            let cell = self.cells[usize::from(p.id.ttl)].entry(p.flow).or_default();
            cell.sent = p.id.attempt + 1;
            if p.id.attempt == 0 {
                self.open.push((p.id.ttl, p.flow));
            }
        }
        self.probes_sent += u32::try_from(send.len()).unwrap_or(u32::MAX);
        Step::Probe {
            wake: wake.unwrap_or(now + wait),
            send,
        }
    }

    /// Everything sent is settled: the probes of the next round, moving up TTLs whose groups
    /// are all done; empty when the trace is over.
    fn next_round(&mut self) -> Vec<MdaProbe> {
        while !self.groups.is_empty() {
            self.adopt_late_parents();
            let mut send = Vec::new();
            for g in 0..self.groups.len() {
                self.expand(g, &mut send);
            }
            if !send.is_empty() {
                return send;
            }
            self.close_ttl();
        }
        Vec::new()
    }

    /// Routers found at the parents' TTL by flows probed there for node control are parents
    /// too.
    fn adopt_late_parents(&mut self) {
        let Some(pttl) = self.ttl.checked_sub(1).filter(|&t| t > 0) else {
            return;
        };
        if self
            .groups
            .iter()
            .any(|g| g.any_flow || g.parent_ttl != pttl)
        {
            return;
        }
        let mut late: Vec<(IpAddr, FlowIx)> = Vec::new();
        for (&flow, cell) in &self.cells[usize::from(pttl)] {
            if let Some(a) = cell.answer
                && !ends_branch(&a.reply)
                && !self.groups.iter().any(|g| g.parent == Some(a.reply.from))
                && !late.iter().any(|&(v, _)| v == a.reply.from)
            {
                late.push((a.reply.from, flow));
            }
        }
        // Linked from the router every flow crossed at the TTL before, if there was one.
        let before = match self.closed.as_slice() {
            [only] if only.any_flow => only.parent.map(|p| (p, only.gap)),
            _ => None,
        };
        for &(v, flow) in &late {
            if let Some((from, gap)) = before {
                self.add_link(from, gap, Some(v), Some((pttl, flow)));
            }
            self.groups.push(Group::of(v, pttl));
        }
    }

    /// Whether `flow` passes through `group`'s parent.
    fn in_group(&self, group: Group, flow: FlowIx) -> bool {
        group.any_flow
            || self.cells[usize::from(group.parent_ttl)]
                .get(&flow)
                .and_then(|c| c.answer)
                .is_some_and(|a| Some(a.reply.from) == group.parent)
    }

    fn tally(&self, group: Group) -> Tally {
        let mut tally = Tally::default();
        for (&flow, cell) in &self.cells[usize::from(self.ttl)] {
            if cell.sent == 0 || !self.in_group(group, flow) {
                continue;
            }
            match cell.answer {
                Some(a) => {
                    tally.answered += 1;
                    tally.ends |= a.reply.from == a.reply.flow_dst;
                    tally.branch_ended |= ends_branch(&a.reply);
                    if !tally.next_hops.contains(&a.reply.from) {
                        tally.next_hops.push(a.reply.from);
                    }
                }
                None => tally.silent += 1,
            }
        }
        tally
    }

    /// Adds to `send` what group `g` still needs at the current TTL.
    fn expand(&mut self, g: usize, send: &mut Vec<MdaProbe>) {
        let group = self.groups[g];
        let tally = self.tally(group);
        if tally.ends {
            return;
        }
        let target = probes_to_rule_out(tally.next_hop_count() + 1, self.config.confidence);
        let need = if tally.settled() == 0 {
            1
        } else if tally.settled() >= target {
            return;
        } else {
            target - tally.settled()
        };
        let ttl = self.ttl;
        let probed = &self.cells[usize::from(ttl)];
        let mut candidates: Vec<FlowIx> = if group.any_flow {
            (0..self.flows)
                .filter(|f| !probed.contains_key(f))
                .take(need as usize)
                .collect()
        } else {
            self.cells[usize::from(group.parent_ttl)]
                .iter()
                .filter(|(f, c)| {
                    !probed.contains_key(f)
                        && c.answer.is_some_and(|a| Some(a.reply.from) == group.parent)
                })
                .map(|(&f, _)| f)
                .take(need as usize)
                .collect()
        };
        // Flows already asked for by another group of this round are theirs.
        candidates.retain(|&f| !send.iter().any(|p| p.flow == f && p.id.ttl == ttl));
        let short = need as usize - candidates.len().min(need as usize);
        for flow in candidates {
            send.push(first_probe(flow, ttl));
        }
        // Fresh flows: at this TTL when any flow will do, else at the parent's TTL to find
        // more that pass through it.
        let (fresh_ttl, short) = if group.any_flow {
            (ttl, short)
        } else {
            let left = (NODE_CONTROL * target).saturating_sub(group.fresh);
            (group.parent_ttl, short.min(left as usize))
        };
        for _ in 0..short {
            let Some(flow) = self.new_flow() else { break };
            send.push(first_probe(flow, fresh_ttl));
            if !group.any_flow {
                self.groups[g].fresh += 1;
            }
        }
    }

    /// Whether `pending` more probes fit the budget.
    fn has_room(&self, pending: usize) -> bool {
        (self.probes_sent as usize).saturating_add(pending) < self.config.max_probes as usize
    }

    fn new_flow(&mut self) -> Option<FlowIx> {
        let flow = self.flows;
        self.flows = self.flows.checked_add(1)?;
        Some(flow)
    }

    /// Every group at the current TTL is done: records its links and moves to the next TTL.
    fn close_ttl(&mut self) {
        let ttl = self.ttl;
        let mut next: Vec<Group> = Vec::new();
        // Whether every flow probed here went on to the next TTL's parents.
        let mut all_go_on = true;
        let groups = std::mem::take(&mut self.groups);
        for &group in &groups {
            let tally = self.tally(group);
            all_go_on &= tally.all_go_on();
            if tally.settled() == 0 {
                // Never probed here (out of budget or of flows through it): nothing known.
                all_go_on = false;
                continue;
            }
            if tally.answered == 0 {
                let gap = group.gap + 1;
                if gap < self.config.gap_limit {
                    next.push(Group {
                        gap,
                        fresh: 0,
                        ..group
                    });
                } else {
                    all_go_on = false;
                    if let Some(from) = group.parent {
                        self.add_link(from, gap, None, None);
                    }
                }
                continue;
            }
            let flows: Vec<(FlowIx, Reply)> = self.cells[usize::from(ttl)]
                .iter()
                .filter_map(|(&f, c)| Some((f, c.answer?.reply)))
                .filter(|&(f, _)| self.in_group(group, f))
                .collect();
            for (flow, reply) in flows {
                if let Some(from) = group.parent {
                    self.add_link(from, group.gap, Some(reply.from), Some((ttl, flow)));
                }
                if !ends_branch(&reply) && !next.iter().any(|g| g.parent == Some(reply.from)) {
                    next.push(Group::of(reply.from, ttl));
                }
            }
        }
        self.closed = groups;
        // A single parent that every flow reaches: any flow passes through it. (A parent
        // carried over silence keeps what it had.)
        if let [only] = next.as_mut_slice()
            && all_go_on
            && (only.gap == 0 || only.any_flow)
        {
            only.any_flow = true;
        }
        if ttl >= self.config.max_ttl {
            next.clear();
        }
        self.groups = next;
        self.ttl = ttl + 1;
    }

    fn add_link(
        &mut self,
        from: IpAddr,
        silent: u8,
        to: Option<IpAddr>,
        probe: Option<(u8, FlowIx)>,
    ) {
        let link = match self.links.iter_mut().find(|l| l.from == from && l.to == to) {
            Some(link) => link,
            None => {
                self.links.push(Link {
                    from,
                    silent,
                    to,
                    probes: Vec::new(),
                });
                self.links.last_mut().expect("just pushed")
            }
        };
        link.probes.extend(probe);
    }

    fn cell_mut(&mut self, ttl: u8, flow: FlowIx) -> Option<&mut Cell> {
        self.cells.get_mut(usize::from(ttl))?.get_mut(&flow)
    }

    /// The answered probes, ordered by TTL then flow.
    pub fn answers(&self) -> impl Iterator<Item = (FlowIx, &Answer)> {
        self.cells
            .iter()
            .flat_map(|m| m.iter().filter_map(|(&f, c)| Some((f, c.answer.as_ref()?))))
    }

    /// The answer of `flow` at `ttl`, if any.
    pub fn answer(&self, ttl: u8, flow: FlowIx) -> Option<&Answer> {
        self.cells
            .get(usize::from(ttl))?
            .get(&flow)?
            .answer
            .as_ref()
    }

    /// The links found, in the order found.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Probes sent so far.
    pub fn probes_sent(&self) -> u32 {
        self.probes_sent
    }

    /// Flows numbered so far.
    pub fn flows(&self) -> u16 {
        self.flows
    }

    /// Replies for this trace's flows that were not accepted.
    pub fn rejected(&self) -> usize {
        self.rejected
    }
}

fn first_probe(flow: FlowIx, ttl: u8) -> MdaProbe {
    MdaProbe {
        flow,
        id: ProbeId { ttl, attempt: 0 },
    }
}

/// Whether `reply` ends its branch: anything but a router's time exceeded (the destination's
/// answer, or an unreachable).
fn ends_branch(reply: &Reply) -> bool {
    !(reply.kind == Kind::TimeExceeded && reply.from != reply.flow_dst)
}
