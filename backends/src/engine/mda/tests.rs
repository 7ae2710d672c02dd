use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::{Confidence, FlowIx, MdaConfig, MdaProbe, MdaTrace, Step, probes_to_rule_out};
use crate::engine::tests::{LAB_DST, udp_reply};
use crate::engine::{Kind, ProbeId, Reply};

const DST: IpAddr = LAB_DST;
const WAIT: Duration = Duration::from_secs(1);

fn config(confidence: Confidence) -> MdaConfig {
    MdaConfig {
        confidence,
        max_ttl: 30,
        attempts: 2,
        wait: WAIT,
        gap_limit: 3,
        max_probes: 3000,
    }
}

fn ip(a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, a, b))
}

fn reply(id: ProbeId, from: IpAddr, kind: Kind) -> Reply {
    udp_reply(id, from, kind)
}

/// A well-mixed branch choice for `flow` at a load balancer seeded with `salt`, as an L4 hash
/// would give (SipHash with fixed keys).
pub(crate) fn branch(flow: FlowIx, salt: u32, ways: u32) -> u32 {
    let mut h = std::hash::DefaultHasher::new();
    (flow, salt).hash(&mut h);
    (h.finish() % u64::from(ways)) as u32
}

/// The lab: r1 (1.2), r2 (2.2), then r3a (3.2) or r3b (4.2) by flow hash, then r4 answering
/// from the interface the probe came in on (5.2 from r3a, 6.2 from r3b), then the destination.
fn lab(salt: u32) -> impl Fn(FlowIx, ProbeId) -> Option<Reply> {
    diamond(salt, false)
}

/// [`lab`], with r3b `anonymous` (never answering) if asked.
fn diamond(salt: u32, anonymous: bool) -> impl Fn(FlowIx, ProbeId) -> Option<Reply> {
    move |flow, id| {
        let a = branch(flow, salt, 2) == 0;
        let from = match id.ttl {
            1 => ip(1, 2),
            2 => ip(2, 2),
            3 if a => ip(3, 2),
            3 if anonymous => return None,
            3 => ip(4, 2),
            4 if a => ip(5, 2),
            4 => ip(6, 2),
            _ => return Some(reply(id, DST, Kind::Unreachable { code: 3 })),
        };
        Some(reply(id, from, Kind::TimeExceeded))
    }
}

/// Runs `trace` against `respond`, replies 1 ms after their probe; returns every probe sent
/// and the time taken. Bounded to 10,000 polls.
pub(crate) fn run(
    trace: &mut MdaTrace,
    respond: impl Fn(FlowIx, ProbeId) -> Option<Reply>,
) -> (Vec<MdaProbe>, Duration) {
    run_from(trace, Instant::now(), respond)
}

/// [`run`] with simulated time starting at `start`.
pub(crate) fn run_from(
    trace: &mut MdaTrace,
    start: Instant,
    respond: impl Fn(FlowIx, ProbeId) -> Option<Reply>,
) -> (Vec<MdaProbe>, Duration) {
    let mut now = start;
    let mut sent = Vec::new();
    for _ in 0..10_000 {
        match trace.poll(now) {
            Step::Done => return (sent, now - start),
            Step::Probe { send, wake } => {
                if send.is_empty() {
                    now = wake;
                    continue;
                }
                for p in send {
                    trace.sent(p, now);
                    sent.push(p);
                    if let Some(r) = respond(p.flow, p.id) {
                        assert!(trace.on_reply(p.flow, r, now + Duration::from_millis(1)));
                    }
                }
                now += Duration::from_millis(1);
            }
        }
    }
    panic!("trace did not end in 10,000 polls");
}

fn links(trace: &MdaTrace) -> BTreeSet<(IpAddr, u8, Option<IpAddr>)> {
    trace
        .links()
        .iter()
        .map(|l| (l.from, l.silent, l.to))
        .collect()
}

#[test]
fn the_stopping_rule_gives_scampers_table() {
    let table: [(usize, u32, u32); 10] = [
        (2, 6, 8),
        (3, 11, 15),
        (4, 16, 21),
        (5, 21, 28),
        (6, 27, 36),
        (7, 33, 43),
        (8, 38, 51),
        (9, 44, 58),
        (10, 51, 66),
        (16, 90, 115),
    ];
    for (k, p95, p99) in table {
        assert_eq!(probes_to_rule_out(k, Confidence::P95), p95, "k={k} at 95%");
        assert_eq!(probes_to_rule_out(k, Confidence::P99), p99, "k={k} at 99%");
    }
    // The entries where the union bound alone says one more.
    assert_eq!(probes_to_rule_out(8, Confidence::P95), 38);
    assert_eq!(probes_to_rule_out(38, Confidence::P99), 309);
    assert_eq!(probes_to_rule_out(99, Confidence::P95), 746);
    assert_eq!(probes_to_rule_out(99, Confidence::P99), 906);
    assert_eq!(probes_to_rule_out(0, Confidence::P95), 6);
}

#[test]
fn a_single_path_costs_the_rule_per_hop_and_one_probe_at_the_destination() {
    let mut trace = MdaTrace::new(config(Confidence::P95));
    let (sent, _) = run(&mut trace, |_, id| {
        Some(if id.ttl <= 3 {
            reply(id, ip(id.ttl, 2), Kind::TimeExceeded)
        } else {
            reply(id, DST, Kind::Unreachable { code: 3 })
        })
    });
    // Three routers at n(2) = 6 probes each, then one probe meets the destination.
    assert_eq!(sent.len(), 6 * 3 + 1);
    let expect: BTreeSet<_> = [
        (ip(1, 2), 0, Some(ip(2, 2))),
        (ip(2, 2), 0, Some(ip(3, 2))),
        (ip(3, 2), 0, Some(DST)),
    ]
    .into();
    assert_eq!(links(&trace), expect);
    // One flow serves every TTL of a single path: six flows in all.
    assert_eq!(trace.flows(), 6);
}

#[test]
fn the_lab_diamond_is_found_whole_with_fewer_probes_than_scamper() {
    let expect: BTreeSet<_> = [
        (ip(1, 2), 0, Some(ip(2, 2))),
        (ip(2, 2), 0, Some(ip(3, 2))),
        (ip(2, 2), 0, Some(ip(4, 2))),
        (ip(3, 2), 0, Some(ip(5, 2))),
        (ip(4, 2), 0, Some(ip(6, 2))),
        (ip(5, 2), 0, Some(DST)),
        (ip(6, 2), 0, Some(DST)),
    ]
    .into();
    let mut counts = Vec::new();
    let mut whole = 0;
    for salt in 0..200 {
        let mut trace = MdaTrace::new(config(Confidence::P95));
        let (sent, _) = run(&mut trace, lab(salt));
        let found = links(&trace);
        // Whatever is found is real; at 95% confidence a run may miss a branch.
        assert!(found.is_subset(&expect), "salt {salt}: {found:?}");
        whole += usize::from(found == expect);
        // Every link is backed by the probes that crossed it.
        for link in trace.links() {
            for &(ttl, flow) in &link.probes {
                assert_eq!(trace.answer(ttl, flow).map(|a| a.reply.from), link.to);
            }
        }
        counts.push(sent.len());
    }
    assert!(whole >= 190, "whole diamond in {whole} of 200");
    counts.sort_unstable();
    let median = counts[counts.len() / 2];
    eprintln!(
        "probes: min {} median {median} max {}",
        counts[0],
        counts[counts.len() - 1]
    );
    // scamper's tracelb took 44 probes on this topology (tests/fixtures).
    assert!(median <= 44, "median {median} probes");
}

#[test]
fn ninety_nine_percent_spends_more_probes() {
    let count = |c| {
        let mut trace = MdaTrace::new(config(c));
        run(&mut trace, lab(7)).0.len()
    };
    assert!(count(Confidence::P99) > count(Confidence::P95));
}

#[test]
fn a_lost_probe_is_retried_and_a_silent_hop_is_crossed() {
    let mut trace = MdaTrace::new(config(Confidence::P95));
    let (sent, took) = run(&mut trace, |flow, id| match id.ttl {
        // Flow 0's first attempt at TTL 1 is lost.
        1 if flow == 0 && id.attempt == 0 => None,
        1 => Some(reply(id, ip(1, 2), Kind::TimeExceeded)),
        2 => None,
        _ => Some(reply(id, DST, Kind::Unreachable { code: 3 })),
    });
    assert!(sent.iter().any(|p| p.id.ttl == 1 && p.id.attempt == 1));
    let expect: BTreeSet<_> = [(ip(1, 2), 1, Some(DST))].into();
    assert_eq!(links(&trace), expect);
    // A hop is silent only once n(2) = 6 flows stayed silent there, each after both attempts.
    let silent = sent.iter().filter(|p| p.id.ttl == 2).count();
    assert_eq!(silent, 6 * 2);
    // Five waits: the retry at TTL 1, then at TTL 2 the lone first probe's two attempts and
    // the other five flows' two.
    assert!(took >= 5 * WAIT && took < 6 * WAIT, "{took:?}");
}

#[test]
fn a_branch_silent_to_the_gap_limit_ends_as_a_star_link() {
    let mut trace = MdaTrace::new(config(Confidence::P95));
    let (_, _) = run(&mut trace, |flow, id| {
        let a = branch(flow, 3, 2) == 0;
        match id.ttl {
            1 => Some(reply(id, ip(1, 2), Kind::TimeExceeded)),
            2 if a => Some(reply(id, ip(3, 2), Kind::TimeExceeded)),
            2 => Some(reply(id, ip(4, 2), Kind::TimeExceeded)),
            _ if a => Some(reply(id, DST, Kind::Unreachable { code: 3 })),
            _ => None,
        }
    });
    let expect: BTreeSet<_> = [
        (ip(1, 2), 0, Some(ip(3, 2))),
        (ip(1, 2), 0, Some(ip(4, 2))),
        (ip(3, 2), 0, Some(DST)),
        (ip(4, 2), 3, None),
    ]
    .into();
    assert_eq!(links(&trace), expect);
}

#[test]
fn the_probe_budget_and_max_ttl_bound_a_trace_that_never_ends() {
    let mut trace = MdaTrace::new(MdaConfig {
        max_probes: 50,
        ..config(Confidence::P95)
    });
    let (sent, _) = run(&mut trace, |flow, id| {
        Some(reply(
            id,
            ip(id.ttl, branch(flow, 1, 8) as u8),
            Kind::TimeExceeded,
        ))
    });
    assert_eq!(sent.len(), 50);
    assert_eq!(trace.probes_sent(), 50);

    let mut trace = MdaTrace::new(MdaConfig {
        max_ttl: 4,
        ..config(Confidence::P95)
    });
    let (sent, _) = run(&mut trace, |_, id| {
        Some(reply(id, ip(id.ttl, 2), Kind::TimeExceeded))
    });
    assert!(sent.iter().all(|p| p.id.ttl <= 4));
    assert_eq!(sent.len(), 4 * 6);
}

#[test]
fn replies_nobody_waits_for_are_rejected() {
    let mut trace = MdaTrace::new(config(Confidence::P95));
    let t0 = Instant::now();
    let Step::Probe { send, .. } = trace.poll(t0) else {
        panic!("should probe");
    };
    assert_eq!(send.len(), 1);
    let probe = send[0];
    // Not yet reported sent, another flow, another attempt.
    let r = reply(probe.id, ip(1, 2), Kind::TimeExceeded);
    assert!(!trace.on_reply(probe.flow, r, t0));
    trace.sent(probe, t0);
    assert!(!trace.on_reply(probe.flow + 1, r, t0));
    let other = ProbeId {
        attempt: 1,
        ..probe.id
    };
    assert!(!trace.on_reply(probe.flow, reply(other, ip(1, 2), Kind::TimeExceeded), t0));
    assert!(trace.on_reply(probe.flow, r, t0));
    assert!(!trace.on_reply(probe.flow, r, t0), "a duplicate");
    assert_eq!(trace.rejected(), 4);
}

/// A silent first probe does not hide the router beside an anonymous one, and flows that went
/// through the anonymous router are not credited to its sibling at the next TTL.
#[test]
fn an_anonymous_router_hides_neither_its_sibling_nor_makes_false_links() {
    // What a trace may report: the responsive path, and, when every probe at TTL 3 happened
    // to take the anonymous branch (a 1/64 chance), TTL 4 seen across a silent hop.
    let truth: BTreeSet<_> = [
        (ip(1, 2), 0, Some(ip(2, 2))),
        (ip(2, 2), 0, Some(ip(3, 2))),
        (ip(3, 2), 0, Some(ip(5, 2))),
        (ip(5, 2), 0, Some(DST)),
        (ip(2, 2), 1, Some(ip(5, 2))),
        (ip(2, 2), 1, Some(ip(6, 2))),
        (ip(6, 2), 0, Some(DST)),
    ]
    .into();
    let mut found = 0;
    for salt in 0..200 {
        let mut trace = MdaTrace::new(config(Confidence::P95));
        run(&mut trace, diamond(salt, true));
        let links = links(&trace);
        assert!(links.is_subset(&truth), "salt {salt}: {links:?}");
        found += usize::from(links.contains(&(ip(2, 2), 0, Some(ip(3, 2)))));
    }
    assert!(found >= 190, "3.2 found in {found} of 200");
}

/// An unreachable from one next hop ends that branch, not the search for the others.
#[test]
fn an_unreachable_next_hop_does_not_stop_the_stopping_rule() {
    let mut whole = 0;
    for salt in 0..200 {
        let mut trace = MdaTrace::new(config(Confidence::P95));
        run(&mut trace, |flow, id| {
            let way = branch(flow, salt, 4) as u8;
            Some(match (id.ttl, way) {
                (1, _) => reply(id, ip(1, 2), Kind::TimeExceeded),
                // Administratively prohibited, from a router.
                (2, 0) => reply(id, ip(2, 9), Kind::Unreachable { code: 13 }),
                (2, w) => reply(id, ip(2, 1 + w), Kind::TimeExceeded),
                _ => reply(id, DST, Kind::Unreachable { code: 3 }),
            })
        });
        let next: BTreeSet<IpAddr> = (trace.links().iter())
            .filter(|l| l.from == ip(1, 2))
            .filter_map(|l| l.to)
            .collect();
        whole += usize::from(next.len() == 4);
    }
    assert!(whole >= 190, "all four next hops in {whole} of 200");
}

/// A parent that one flow alone reaches (per-packet balancing, a route change) is expanded
/// with what node control finds in a bounded number of fresh flows, not the whole budget.
#[test]
fn node_control_gives_up_on_a_parent_few_flows_reach() {
    let mut trace = MdaTrace::new(config(Confidence::P95));
    let (sent, _) = run(&mut trace, |flow, id| {
        let from = match id.ttl {
            1 => ip(1, 2),
            2 if flow == 0 => ip(2, 9),
            2 => ip(2, 2),
            3 => ip(3, 2),
            _ => return Some(reply(id, DST, Kind::Unreachable { code: 3 })),
        };
        Some(reply(id, from, Kind::TimeExceeded))
    });
    assert!(sent.len() < 80, "{} probes", sent.len());
    let links = links(&trace);
    for link in [
        (ip(2, 9), 0, Some(ip(3, 2))),
        (ip(2, 2), 0, Some(ip(3, 2))),
        (ip(3, 2), 0, Some(DST)),
    ] {
        assert!(links.contains(&link), "{link:?} in {links:?}");
    }
}

/// A router found at a parent's TTL only by node control's fresh flows is linked from the
/// router before it when every flow crossed that one.
#[test]
fn a_router_found_by_node_control_is_linked_in() {
    let mut late = 0;
    for salt in 0..50 {
        let mut trace = MdaTrace::new(config(Confidence::P95));
        // Two ways for the first eleven flows (the ones the rule spends at TTL 2), three after.
        run(&mut trace, |flow, id| {
            let way = if flow < 11 {
                branch(flow, salt, 2)
            } else {
                branch(flow, salt, 3)
            } as u8;
            let from = match id.ttl {
                1 => ip(1, 2),
                2 => ip(2, 2 + way),
                3 => ip(3, 2 + way),
                _ => return Some(reply(id, DST, Kind::Unreachable { code: 3 })),
            };
            Some(reply(id, from, Kind::TimeExceeded))
        });
        let links = links(&trace);
        // Every router with a link out has one in.
        for (from, _, _) in &links {
            if *from != ip(1, 2) {
                assert!(
                    links.iter().any(|(_, _, to)| *to == Some(*from)),
                    "salt {salt}: nothing leads to {from}: {links:?}"
                );
            }
        }
        late += usize::from(links.contains(&(ip(1, 2), 0, Some(ip(2, 4)))));
    }
    assert!(late > 0, "the third way was never found late");
}

/// Out of budget in the middle of a TTL, what that TTL found is still linked.
#[test]
fn the_last_ttl_probed_is_linked_when_the_budget_runs_out() {
    let mut trace = MdaTrace::new(MdaConfig {
        max_probes: 14,
        ..config(Confidence::P95)
    });
    let (sent, _) = run(&mut trace, |_, id| {
        Some(reply(id, ip(id.ttl, 2), Kind::TimeExceeded))
    });
    assert_eq!(sent.len(), 14);
    assert!(links(&trace).contains(&(ip(2, 2), 0, Some(ip(3, 2)))));
}

/// A reply to a probe already settled silent (both attempts waited out) is not taken: its TTL
/// may already be closed.
#[test]
fn a_reply_after_its_probe_was_given_up_is_rejected() {
    let mut trace = MdaTrace::new(config(Confidence::P95));
    let t0 = Instant::now();
    let mut now = t0;
    let mut first = None;
    // Both attempts of the first probe go unanswered; then the trace moves on.
    for _ in 0..3 {
        if let Step::Probe { send, wake } = trace.poll(now) {
            for p in send {
                trace.sent(p, now);
                first.get_or_insert(p);
            }
            now = wake;
        }
    }
    let probe = first.expect("a probe");
    let late = reply(probe.id, ip(1, 2), Kind::TimeExceeded);
    assert!(!trace.on_reply(probe.flow, late, now));
    assert_eq!(trace.rejected(), 1);
}
