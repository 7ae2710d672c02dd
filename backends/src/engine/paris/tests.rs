use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::{ParisConfig, ParisTrace, Step, StopReason};
use crate::engine::tests::{LAB_DST, udp_reply};
use crate::engine::{Kind, ProbeId, Reply};

const DST: IpAddr = LAB_DST;
const WAIT: Duration = Duration::from_secs(2);

fn config(max_ttl: u8) -> ParisConfig {
    ParisConfig {
        max_ttl,
        attempts: 2,
        wait: WAIT,
        gap_limit: 5,
    }
}

fn router(ttl: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, ttl, 2))
}

fn reply(ttl: u8, attempt: u8, from: IpAddr, kind: Kind) -> Reply {
    udp_reply(ProbeId { ttl, attempt }, from, kind)
}

/// What a path of `routers` hops then the destination answers to probe `id`, if anything:
/// `silent` TTLs never answer.
fn answer(id: ProbeId, routers: u8, silent: &[u8]) -> Option<Reply> {
    if silent.contains(&id.ttl) {
        return None;
    }
    Some(if id.ttl <= routers {
        reply(id.ttl, id.attempt, router(id.ttl), Kind::TimeExceeded)
    } else {
        reply(id.ttl, id.attempt, DST, Kind::Unreachable { code: 3 })
    })
}

/// Runs `trace` against a simulated path, replies arriving 1 ms after each probe; returns the
/// end, the time it took and every probe in the order sent. Bounded to 1000 polls.
fn run(
    trace: &mut ParisTrace,
    respond: impl Fn(ProbeId) -> Option<Reply>,
) -> (StopReason, Duration, Vec<ProbeId>) {
    let start = Instant::now();
    let mut now = start;
    let mut probes = Vec::new();
    for _ in 0..1000 {
        match trace.poll(now) {
            Step::Done(reason) => return (reason, now - start, probes),
            Step::Probe { send, wake } => {
                let mut replied = false;
                for id in send {
                    trace.sent(id, now);
                    probes.push(id);
                    if let Some(r) = respond(id) {
                        assert!(trace.on_reply(r, now + Duration::from_millis(1)));
                        replied = true;
                    }
                }
                now = if replied {
                    now + Duration::from_millis(1)
                } else {
                    wake
                };
            }
        }
    }
    panic!("trace did not end in 1000 polls");
}

fn ttls(probes: &[ProbeId]) -> Vec<u8> {
    probes.iter().map(|p| p.ttl).collect()
}

#[test]
fn a_short_path_costs_one_probe_per_hop() {
    let mut trace = ParisTrace::new(config(30));
    let (reason, took, probes) = run(&mut trace, |id| answer(id, 4, &[]));
    assert_eq!(reason, StopReason::Completed);
    assert_eq!(ttls(&probes), [1, 2, 3, 4, 5]);
    assert!(took < Duration::from_millis(10), "{took:?}");
    let answers = trace.answers();
    assert_eq!(
        answers.iter().map(|a| a.reply.id.ttl).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(answers[4].reply.from, DST);
    assert_eq!(trace.hop_count(), 5);
}

#[test]
fn the_window_slides_past_the_highest_answer() {
    let mut trace = ParisTrace::new(config(30));
    let (reason, _, probes) = run(&mut trace, |id| answer(id, 7, &[]));
    assert_eq!(reason, StopReason::Completed);
    // 1..=5 at once, then 6..=10 once TTL 5 answered as a router; the destination at 8.
    assert_eq!(ttls(&probes), (1..=10).collect::<Vec<_>>());
    assert_eq!(trace.hop_count(), 8);
    assert_eq!(trace.answers().len(), 8, "nothing past the destination");
    assert_eq!(trace.probes_sent(), 10);
}

#[test]
fn a_silent_hop_is_retried_then_left_out() {
    let mut trace = ParisTrace::new(config(30));
    let (reason, took, probes) = run(&mut trace, |id| answer(id, 4, &[2]));
    assert_eq!(reason, StopReason::Completed);
    assert_eq!(
        probes.iter().filter(|p| p.ttl == 2).count(),
        2,
        "two attempts at the silent TTL: {probes:?}"
    );
    assert_eq!(probes.last(), Some(&ProbeId { ttl: 2, attempt: 1 }));
    assert_eq!(took, WAIT * 2, "waits out both attempts, no longer");
    assert!(trace.answers().iter().all(|a| a.reply.id.ttl != 2));
}

#[test]
fn a_late_answer_to_a_first_attempt_still_counts() {
    let mut trace = ParisTrace::new(config(30));
    let now = Instant::now();
    let Step::Probe { send, .. } = trace.poll(now) else {
        panic!("no probes")
    };
    for id in &send {
        trace.sent(*id, now);
    }
    // Only TTL 1 answers (late); the rest stay silent.
    let late = now + WAIT + Duration::from_millis(500);
    let Step::Probe { send, .. } = trace.poll(now + WAIT) else {
        panic!("no retries")
    };
    assert_eq!(send.len(), 5, "every TTL retried");
    for id in &send {
        trace.sent(*id, now + WAIT);
    }
    assert!(trace.on_reply(reply(1, 0, router(1), Kind::TimeExceeded), late));
    assert!(
        !trace.on_reply(reply(1, 0, router(1), Kind::TimeExceeded), late),
        "a duplicate is rejected"
    );
    assert!(
        !trace.on_reply(reply(1, 0, router(9), Kind::TimeExceeded), late),
        "a second answer to the same probe from elsewhere is rejected"
    );
    assert!(
        !trace.on_reply(reply(1, 3, router(1), Kind::TimeExceeded), late),
        "an attempt never sent is rejected"
    );
    assert!(
        !trace.on_reply(reply(40, 0, router(1), Kind::TimeExceeded), late),
        "a TTL never sent is rejected"
    );
    assert_eq!(trace.rejected(), 4);
    let answers = trace.answers();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].tx, now, "RTT measured from the attempt answered");
}

#[test]
fn silence_ends_at_the_gap_limit() {
    let mut trace = ParisTrace::new(config(30));
    let (reason, took, probes) = run(&mut trace, |_| None);
    assert_eq!(reason, StopReason::GapLimit);
    assert_eq!(probes.len(), 10, "5 TTLs x 2 attempts: {probes:?}");
    assert_eq!(took, WAIT * 2);

    // A gap after answers: 1..=3 answer, 4.. never.
    let mut trace = ParisTrace::new(config(30));
    let (reason, _, probes) = run(&mut trace, |id| {
        (id.ttl <= 3).then(|| reply(id.ttl, id.attempt, router(id.ttl), Kind::TimeExceeded))
    });
    assert_eq!(reason, StopReason::GapLimit);
    assert_eq!(probes.iter().map(|p| p.ttl).max(), Some(8));
    assert_eq!(trace.hop_count(), 8);
}

#[test]
fn a_router_unreachable_ends_the_path_there() {
    let mut trace = ParisTrace::new(config(30));
    let (reason, _, _) = run(&mut trace, |id| {
        Some(if id.ttl < 3 {
            reply(id.ttl, id.attempt, router(id.ttl), Kind::TimeExceeded)
        } else {
            reply(id.ttl, id.attempt, router(3), Kind::Unreachable { code: 1 })
        })
    });
    assert_eq!(reason, StopReason::Unreach(1));
    assert_eq!((reason.name(), reason.data()), ("UNREACH", 1));
    assert_eq!(trace.hop_count(), 3);
}

#[test]
fn the_hop_limit_ends_a_long_path() {
    let mut trace = ParisTrace::new(config(3));
    let (reason, _, probes) = run(&mut trace, |id| answer(id, 20, &[]));
    assert_eq!(reason, StopReason::HopLimit);
    assert_eq!(ttls(&probes), [1, 2, 3]);
}

#[test]
fn configuration_is_clamped_to_what_probes_carry() {
    let trace = ParisTrace::new(ParisConfig {
        max_ttl: 255,
        attempts: 9,
        wait: WAIT,
        gap_limit: 0,
    });
    let c = trace.config();
    assert_eq!((c.max_ttl, c.attempts, c.gap_limit), (63, 4, 1));
}

#[test]
fn early_answers_do_not_open_the_next_window() {
    // Replies one at a time, TTL 1 first: the window must not slide past the destination at 5.
    let mut trace = ParisTrace::new(config(30));
    let now = Instant::now();
    let Step::Probe { send, .. } = trace.poll(now) else {
        panic!("no probes")
    };
    assert_eq!(ttls(&send), [1, 2, 3, 4, 5]);
    for id in &send {
        trace.sent(*id, now);
    }
    for ttl in 1..=4 {
        let at = now + Duration::from_micros(u64::from(ttl) * 10);
        assert!(trace.on_reply(reply(ttl, 0, router(ttl), Kind::TimeExceeded), at));
        match trace.poll(at) {
            Step::Probe { send, .. } => assert!(send.is_empty(), "after ttl {ttl}: {send:?}"),
            Step::Done(r) => panic!("done early: {r:?}"),
        }
    }
    let at = now + Duration::from_micros(50);
    assert!(trace.on_reply(reply(5, 0, DST, Kind::Unreachable { code: 3 }), at));
    assert_eq!(trace.poll(at), Step::Done(StopReason::Completed));
    assert_eq!(trace.probes_sent(), 5);
}

#[test]
fn a_silent_top_of_the_window_opens_the_next_once_settled() {
    // Routers at 1..=4 answer, 5 is silent, the destination is at 7.
    let mut trace = ParisTrace::new(config(30));
    let (reason, took, probes) = run(&mut trace, |id| {
        (id.ttl != 5).then(|| answer(id, 6, &[5])).flatten()
    });
    assert_eq!(reason, StopReason::Completed);
    // TTL 5 waited out twice, then 6..=9 at once, answered 1 ms later.
    assert_eq!(took, WAIT * 2 + Duration::from_millis(1));
    assert_eq!(ttls(&probes), [1, 2, 3, 4, 5, 5, 6, 7, 8, 9]);
    assert_eq!(trace.hop_count(), 7);
}
