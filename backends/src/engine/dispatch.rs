//! Replies to the traces that wait for them: the receive threads decode a packet statelessly and
//! look up its flow here. A flow is registered while its trace runs; a reply for any other flow
//! (a trace that ended, another prober's, a forged one that passed the tag) is counted and
//! dropped. One map entry per running trace, nothing per probe.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::RwLock;
use std::time::Instant;

use tokio::sync::mpsc;

use super::Reply;
use crate::Probe;

/// Replies a single-path trace may have waiting before more are dropped (it legitimately gets
/// at most one per probe, 63 TTLs × 4 attempts).
pub const TRACE_QUEUE: usize = 256;
/// The same for a multipath trace, whose rounds can hold a few hundred probes.
pub const MDA_QUEUE: usize = 2048;

/// What identifies a flow in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The flow's destination.
    pub dst: IpAddr,
    /// Its transport.
    pub probe: Probe,
    /// Source port (echo identifier for ICMP).
    pub sport: u16,
    /// Destination port (0 for ICMP).
    pub dport: u16,
}

impl FlowKey {
    /// The flow `reply` answers.
    pub fn of(reply: &Reply) -> Self {
        Self {
            dst: reply.flow_dst,
            probe: reply.probe,
            sport: reply.sport,
            dport: reply.dport,
        }
    }
}

/// A matched reply and when it was read.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// The reply.
    pub reply: Reply,
    /// When the receive thread read it.
    pub rx: Instant,
}

/// What became of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for its trace.
    Delivered,
    /// No running trace has this flow (late, or not ours).
    NoFlow,
    /// Its trace's queue was full.
    Overflow,
}

/// The running traces' flows.
#[derive(Debug, Default)]
pub struct FlowTable {
    /// Each running flow's trace: its reply queue and salt.
    flows: RwLock<HashMap<FlowKey, (mpsc::Sender<Arrival>, u32)>>,
}

impl FlowTable {
    /// A trace's queue for replies: its sender goes into the table under each of the trace's
    /// flows ([`insert`](Self::insert)).
    pub fn queue(capacity: usize) -> (mpsc::Sender<Arrival>, mpsc::Receiver<Arrival>) {
        mpsc::channel(capacity)
    }

    /// Routes replies for `key` to `tx`, the trace with `salt`; false if a running trace
    /// already has `key`.
    pub fn insert(&self, key: FlowKey, tx: &mpsc::Sender<Arrival>, salt: u32) -> bool {
        let mut flows = self.flows.write().unwrap_or_else(|p| p.into_inner());
        match flows.entry(key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert((tx.clone(), salt));
                true
            }
        }
    }

    /// Forgets `key`; later replies for it count as [`Delivery::NoFlow`].
    pub fn unregister(&self, key: &FlowKey) {
        let mut flows = self.flows.write().unwrap_or_else(|p| p.into_inner());
        flows.remove(key);
    }

    /// The salt of the trace running `key`, if any.
    pub fn salt(&self, key: &FlowKey) -> Option<u32> {
        let flows = self.flows.read().unwrap_or_else(|p| p.into_inner());
        flows.get(key).map(|&(_, salt)| salt)
    }

    /// Hands `reply` to its trace.
    pub fn deliver(&self, reply: Reply, rx: Instant) -> Delivery {
        let flows = self.flows.read().unwrap_or_else(|p| p.into_inner());
        let Some((tx, _)) = flows.get(&FlowKey::of(&reply)) else {
            return Delivery::NoFlow;
        };
        match tx.try_send(Arrival { reply, rx }) {
            Ok(()) => Delivery::Delivered,
            // A receiver already dropped is a trace ending: its reply is late.
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::NoFlow,
            Err(mpsc::error::TrySendError::Full(_)) => Delivery::Overflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{LAB_DST, udp_reply};
    use crate::engine::{Kind, ProbeId};

    fn reply(ttl: u8) -> Reply {
        let id = ProbeId { ttl, attempt: 0 };
        udp_reply(id, LAB_DST, Kind::TimeExceeded)
    }

    #[test]
    fn a_trace_queue_holds_its_capacity_then_overflows_and_a_gone_trace_is_late() {
        let table = FlowTable::default();
        let key = FlowKey::of(&reply(1));
        let (tx, mut rx) = FlowTable::queue(2);
        assert!(table.insert(key, &tx, 7));
        assert!(
            !table.insert(key, &tx, 8),
            "a running flow is not taken twice"
        );
        assert_eq!(table.salt(&key), Some(7));
        let now = Instant::now();
        assert_eq!(table.deliver(reply(1), now), Delivery::Delivered);
        assert_eq!(table.deliver(reply(2), now), Delivery::Delivered);
        assert_eq!(table.deliver(reply(3), now), Delivery::Overflow);
        // Taking one makes room for one.
        assert_eq!(rx.try_recv().ok().map(|a| a.reply.id.ttl), Some(1));
        assert_eq!(table.deliver(reply(4), now), Delivery::Delivered);
        assert_eq!(rx.try_recv().ok().map(|a| a.reply.id.ttl), Some(2));
        assert_eq!(rx.try_recv().ok().map(|a| a.reply.id.ttl), Some(4));
        assert!(rx.try_recv().is_err());
        drop(rx);
        assert_eq!(table.deliver(reply(5), now), Delivery::NoFlow);
        table.unregister(&key);
        assert_eq!(table.salt(&key), None);
        assert_eq!(table.deliver(reply(6), now), Delivery::NoFlow);
    }
}
