//! The in-memory dead-letter queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, Result};

/// A [`DeadLetterQueue`] in memory: letters in insertion order (oldest first), gone when
/// the process ends.
///
/// It holds at most a [capacity](Self::with_capacity) of letters ([`DEFAULT_DLQ_CAPACITY`],
/// 100,000, by default), so that a long-running process whose handlers keep failing does
/// not grow without bound: when it is full, the oldest letter makes room for the new one,
/// logged at `warn` (with the dropped letter's id and subscription) and counted in
/// `orchestrator_dlq_evicted_total`. (Refusing the new letter instead would hand the
/// delivery back to its transport at once, to fail and be refused again in a loop.) For
/// dead letters that must all be kept, use a durable queue: the file store's, or a
/// broker's.
///
/// Clones share the same letters, so a clone handed to the transport and one kept for
/// inspection see the same queue.
///
/// ```
/// use orchestrator_bus::InMemoryDeadLetterQueue;
/// use orchestrator_core::{DeadLetterQuery, DeadLetterQueue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> orchestrator_core::Result<()> {
/// let dlq = InMemoryDeadLetterQueue::new();
/// let inspector = dlq.clone();
/// assert!(inspector.list(&DeadLetterQuery::default()).await?.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct InMemoryDeadLetterQueue {
    letters: Arc<Mutex<Letters>>,
    capacity: usize,
}

/// How many letters an [`InMemoryDeadLetterQueue`] holds by default.
pub const DEFAULT_DLQ_CAPACITY: usize = 100_000;

impl Default for InMemoryDeadLetterQueue {
    fn default() -> Self {
        Self {
            letters: Arc::default(),
            capacity: DEFAULT_DLQ_CAPACITY,
        }
    }
}

/// Letters keyed by insertion number, with an index from letter id to that number.
#[derive(Default)]
struct Letters {
    by_seq: BTreeMap<u64, DeadLetter>,
    seq_of: HashMap<String, u64>,
    next_seq: u64,
}

impl InMemoryDeadLetterQueue {
    /// An empty queue of the default capacity, dropping the oldest letter when full.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue holding at most `capacity` letters (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            ..Self::default()
        }
    }

    /// How many letters it holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn letters(&self) -> MutexGuard<'_, Letters> {
        // Every update below finishes both maps before it can panic (only allocation
        // failure could interrupt it, and that aborts), so a poisoned lock still guards
        // consistent data: keep using it rather than failing every later call.
        self.letters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for InMemoryDeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryDeadLetterQueue")
            .field("len", &self.letters().by_seq.len())
            .finish()
    }
}

#[async_trait]
impl DeadLetterQueue for InMemoryDeadLetterQueue {
    fn name(&self) -> &'static str {
        "in-memory"
    }

    /// Parks `letter` as the newest. A letter whose id is already parked replaces it and
    /// becomes the newest.
    async fn push(&self, letter: DeadLetter) -> Result<()> {
        let mut letters = self.letters();
        let replaces = letters.seq_of.contains_key(&letter.id);
        if !replaces
            && letters.by_seq.len() >= self.capacity
            && let Some((_, oldest)) = letters.by_seq.pop_first()
        {
            letters.seq_of.remove(&oldest.id);
            tracing::warn!(
                letter = %oldest.id,
                subscription = %oldest.subscription,
                capacity = self.capacity,
                "the in-memory dead-letter queue is full: its oldest letter was dropped"
            );
            metrics::counter!("orchestrator_dlq_evicted_total").increment(1);
        }
        let seq = letters.next_seq;
        letters.next_seq += 1;
        if let Some(old) = letters.seq_of.insert(letter.id.clone(), seq) {
            letters.by_seq.remove(&old);
        }
        letters.by_seq.insert(seq, letter);
        Ok(())
    }

    async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        Ok(self
            .letters()
            .by_seq
            .values()
            .filter(|l| query.matches(l))
            .skip(query.offset)
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let letters = self.letters();
        Ok(letters
            .seq_of
            .get(id)
            .and_then(|seq| letters.by_seq.get(seq))
            .cloned())
    }

    async fn remove(&self, id: &str) -> Result<Option<DeadLetter>> {
        let mut letters = self.letters();
        Ok(letters
            .seq_of
            .remove(id)
            .and_then(|seq| letters.by_seq.remove(&seq)))
    }

    async fn len(&self) -> Result<usize> {
        Ok(self.letters().by_seq.len())
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use orchestrator_core::EventEnvelope;

    use super::*;

    fn letter(event_type: &str, subscription: &str) -> DeadLetter {
        DeadLetter::new(
            EventEnvelope::new(event_type, &1).unwrap(),
            event_type.to_owned(),
            subscription.to_owned(),
            "boom".to_owned(),
            1,
            Utc::now(),
            Utc::now(),
        )
    }

    fn ids(letters: &[DeadLetter]) -> Vec<&str> {
        letters.iter().map(|l| l.id.as_str()).collect()
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_letter() {
        let dlq = InMemoryDeadLetterQueue::with_capacity(2);
        let (a, b, c) = (letter("a.x", "s"), letter("b.x", "s"), letter("c.x", "s"));
        for l in [&a, &b, &c] {
            dlq.push(l.clone()).await.unwrap();
        }
        let kept = dlq.list(&DeadLetterQuery::default()).await.unwrap();
        assert_eq!(ids(&kept), [b.id.as_str(), c.id.as_str()], "a made room");
        assert_eq!(dlq.get(&a.id).await.unwrap(), None);
        // Replacing a parked letter takes no room.
        dlq.push(b.clone()).await.unwrap();
        let kept = dlq.list(&DeadLetterQuery::default()).await.unwrap();
        assert_eq!(ids(&kept), [c.id.as_str(), b.id.as_str()]);
        assert_eq!(
            InMemoryDeadLetterQueue::new().capacity(),
            DEFAULT_DLQ_CAPACITY
        );
    }

    #[tokio::test]
    async fn lists_oldest_first_with_filters_and_paging() {
        let dlq = InMemoryDeadLetterQueue::new();
        let pushed = [
            letter("a.x", "s1"),
            letter("b.x", "s1"),
            letter("a.x", "s2"),
            letter("a.x", "s1"),
        ];
        for l in &pushed {
            dlq.push(l.clone()).await.unwrap();
        }
        let all = dlq.list(&DeadLetterQuery::default()).await.unwrap();
        assert_eq!(ids(&all), ids(&pushed));

        let query = DeadLetterQuery {
            event_type: Some("a.x".into()),
            subscription: Some("s1".into()),
            ..DeadLetterQuery::default()
        };
        let got = dlq.list(&query).await.unwrap();
        assert_eq!(ids(&got), [pushed[0].id.as_str(), pushed[3].id.as_str()]);

        let page = DeadLetterQuery {
            offset: 1,
            limit: 2,
            ..DeadLetterQuery::default()
        };
        assert_eq!(ids(&dlq.list(&page).await.unwrap()), ids(&pushed[1..3]));
    }

    #[tokio::test]
    async fn get_remove_len_and_shared_clones() {
        let dlq = InMemoryDeadLetterQueue::new();
        let other = dlq.clone();
        let l = letter("a.x", "s1");
        dlq.push(l.clone()).await.unwrap();
        assert_eq!(other.len().await.unwrap(), 1);
        assert_eq!(other.get(&l.id).await.unwrap(), Some(l.clone()));
        assert_eq!(other.remove(&l.id).await.unwrap(), Some(l.clone()));
        assert!(dlq.is_empty().await.unwrap());
        assert_eq!(dlq.get(&l.id).await.unwrap(), None);
        assert_eq!(dlq.remove(&l.id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn pushing_an_id_again_replaces_and_moves_it_last() {
        let dlq = InMemoryDeadLetterQueue::new();
        let (first, second) = (letter("a.x", "s"), letter("b.x", "s"));
        dlq.push(first.clone()).await.unwrap();
        dlq.push(second.clone()).await.unwrap();
        let mut again = first.clone();
        again.attempts = 5;
        dlq.push(again.clone()).await.unwrap();
        let all = dlq.list(&DeadLetterQuery::default()).await.unwrap();
        assert_eq!(all, [second, again]);
    }
}
