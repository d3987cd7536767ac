//! Which offsets a consumer may commit: per partition, the end of the run of settled
//! deliveries from the oldest one still in flight, so that acks arriving out of order never
//! commit past a delivery that is not settled yet.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One assigned partition.
#[derive(Debug)]
struct PartitionState {
    /// The topic's name, shared with every slot of it.
    topic: Arc<str>,
    /// Which assignment this state belongs to: settlements of an older one are ignored.
    generation: u64,
    /// Offsets handed out, oldest first, with whether each is settled.
    in_flight: VecDeque<(i64, bool)>,
    /// The offset to commit (the next one to read after the settled run), if it moved since
    /// it was last taken.
    pending: Option<i64>,
}

/// The settled offsets of every partition a consumer owns.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    partitions: HashMap<Arc<str>, HashMap<i32, PartitionState>>,
    next_generation: u64,
    dirty: bool,
}

/// A delivery's handle on its partition: the topic, partition, generation and offset.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) generation: u64,
    pub(crate) offset: i64,
}

impl Tracker {
    /// The consumer now owns `topic`/`partition` (again): a new generation.
    pub(crate) fn assign(&mut self, topic: &str, partition: i32) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let topic = self.topic_key(topic);
        self.partitions
            .entry(Arc::clone(&topic))
            .or_default()
            .insert(
                partition,
                PartitionState {
                    topic,
                    generation,
                    in_flight: VecDeque::new(),
                    pending: None,
                },
            );
    }

    /// The consumer lost `topic`/`partition`; returns the offset still to commit, if any.
    pub(crate) fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let parts = self.partitions.get_mut(topic)?;
        let state = parts.remove(&partition)?;
        if parts.is_empty() {
            self.partitions.remove(topic);
        }
        state.pending
    }

    /// The consumer lost every partition (it is closing); returns the offsets to commit.
    pub(crate) fn revoke_all(&mut self) -> Vec<(Arc<str>, i32, i64)> {
        let pending = self.take_pending();
        self.partitions.clear();
        pending
    }

    /// Records that the message at `offset` is handed out; `None` if the partition is not
    /// owned or the offset was already handed out in this generation (a re-fetch).
    pub(crate) fn begin(&mut self, topic: &str, partition: i32, offset: i64) -> Option<Slot> {
        let state = self.partitions.get_mut(topic)?.get_mut(&partition)?;
        if state
            .in_flight
            .back()
            .is_some_and(|&(last, _)| last >= offset)
        {
            return None;
        }
        state.in_flight.push_back((offset, false));
        Some(Slot {
            topic: Arc::clone(&state.topic),
            partition,
            generation: state.generation,
            offset,
        })
    }

    /// Whether `slot` belongs to the current assignment of its partition and is in flight.
    pub(crate) fn is_current(&self, slot: &Slot) -> bool {
        self.partitions
            .get(&*slot.topic)
            .and_then(|p| p.get(&slot.partition))
            .is_some_and(|s| s.generation == slot.generation)
    }

    /// Settles `slot`; returns whether it belonged to the current assignment (otherwise the
    /// partition moved on, and the message comes back from the last committed offset).
    pub(crate) fn settle(&mut self, slot: &Slot) -> bool {
        let Some(state) = self
            .partitions
            .get_mut(&*slot.topic)
            .and_then(|p| p.get_mut(&slot.partition))
            .filter(|s| s.generation == slot.generation)
        else {
            return false;
        };
        let Ok(i) = state
            .in_flight
            .binary_search_by_key(&slot.offset, |&(o, _)| o)
        else {
            return false;
        };
        state.in_flight[i].1 = true;
        let mut next = None;
        while let Some(&(offset, true)) = state.in_flight.front() {
            state.in_flight.pop_front();
            next = Some(offset + 1);
        }
        if next.is_some() {
            state.pending = next;
            self.dirty = true;
        }
        true
    }

    /// Whether some offset is waiting to be committed.
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The offsets that moved since the last call: (topic, partition, next offset to read).
    pub(crate) fn take_pending(&mut self) -> Vec<(Arc<str>, i32, i64)> {
        if !self.dirty {
            return Vec::new();
        }
        self.dirty = false;
        let mut out = Vec::new();
        for (topic, parts) in &mut self.partitions {
            for (&partition, state) in parts {
                if let Some(offset) = state.pending.take() {
                    out.push((Arc::clone(topic), partition, offset));
                }
            }
        }
        out
    }

    fn topic_key(&self, topic: &str) -> Arc<str> {
        self.partitions
            .get_key_value(topic)
            .map_or_else(|| Arc::from(topic), |(k, _)| Arc::clone(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_never_commit_past_a_gap() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        let slots: Vec<Slot> = (10..15).map(|o| t.begin("t", 0, o).unwrap()).collect();
        assert!(t.settle(&slots[1]) && t.settle(&slots[2]));
        assert!(t.take_pending().is_empty(), "10 is not settled yet");
        assert!(t.settle(&slots[0]));
        assert_eq!(t.take_pending(), vec![(Arc::from("t"), 0, 13)]);
        assert!(t.settle(&slots[4]));
        assert!(t.take_pending().is_empty());
        assert!(t.settle(&slots[3]));
        assert_eq!(t.take_pending(), vec![(Arc::from("t"), 0, 15)]);
    }

    #[test]
    fn a_new_assignment_ignores_old_settlements() {
        let mut t = Tracker::default();
        t.assign("t", 1);
        let old = t.begin("t", 1, 5).unwrap();
        assert_eq!(t.revoke("t", 1), None);
        assert!(!t.is_current(&old) && !t.settle(&old));
        t.assign("t", 1);
        let new = t.begin("t", 1, 5).unwrap();
        assert!(!t.is_current(&old) && t.is_current(&new));
        assert!(
            t.begin("t", 1, 5).is_none(),
            "a re-fetch is not handed out twice"
        );
        assert!(t.begin("t", 2, 0).is_none(), "partition 2 is not owned");
        assert!(t.settle(&new));
        assert_eq!(t.revoke("t", 1), Some(6));
    }
}
