//! Which running trace a reply belongs to: the prober decodes a packet statelessly and looks up
//! its flow here. A flow is registered while its trace runs; a reply for any other flow (a trace
//! that ended, another prober's, a forged one that passed the tag) is counted and dropped. One
//! map entry per flow of a running trace, nothing per probe. Only the prober thread uses it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use super::mda::FlowIx;
use super::{Flow, Reply};
use crate::Probe;

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

impl From<&Flow> for FlowKey {
    fn from(flow: &Flow) -> Self {
        Self {
            dst: flow.dst,
            probe: flow.probe,
            sport: flow.sport,
            dport: flow.dport,
        }
    }
}

/// The trace running a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The trace's slot in the prober.
    pub trace: usize,
    /// The flow's number within its trace (0 for a single-path trace).
    pub flow: FlowIx,
    /// The trace's salt, in every tag of its probes.
    pub salt: u32,
}

/// The running traces' flows.
#[derive(Debug, Default)]
pub struct FlowTable {
    flows: HashMap<FlowKey, Owner>,
}

impl FlowTable {
    /// Routes replies for `key` to `owner`; false if a running trace already has `key`.
    pub fn insert(&mut self, key: FlowKey, owner: Owner) -> bool {
        match self.flows.entry(key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert(owner);
                true
            }
        }
    }

    /// Forgets `key`; later replies for it have no owner.
    pub fn remove(&mut self, key: &FlowKey) {
        self.flows.remove(key);
    }

    /// The trace running `key`, if any.
    pub fn owner(&self, key: &FlowKey) -> Option<Owner> {
        self.flows.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{LAB_DST, udp_reply};
    use crate::engine::{Kind, ProbeId};

    #[test]
    fn a_flow_has_one_owner_until_it_is_removed() {
        let mut table = FlowTable::default();
        let reply = udp_reply(ProbeId { ttl: 1, attempt: 0 }, LAB_DST, Kind::TimeExceeded);
        let key = FlowKey::of(&reply);
        let first = Owner {
            trace: 3,
            flow: 0,
            salt: 7,
        };
        let second = Owner {
            trace: 4,
            flow: 2,
            salt: 8,
        };
        assert_eq!(table.owner(&key), None);
        assert!(table.insert(key, first));
        assert!(
            !table.insert(key, second),
            "a running flow is not taken twice"
        );
        assert_eq!(table.owner(&key), Some(first));
        let other = FlowKey {
            sport: key.sport.wrapping_add(1),
            ..key
        };
        assert_eq!(table.owner(&other), None, "another port is another flow");
        table.remove(&key);
        assert_eq!(table.owner(&key), None);
        assert!(
            table.insert(key, second),
            "a removed flow can be taken again"
        );
        assert_eq!(table.owner(&key), Some(second));
    }
}
