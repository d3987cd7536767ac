//! Working with dead letters: list, inspect, reprocess, discard, and the failure report
//! that answers "what is failing and why".
//!
//! These tools sit on the core [`DeadLetterQueue`] trait, so they work the same on the
//! in-memory queue and on every backend's durable one.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, Error, Result, Transport};

/// The dead-letter tools of one transport. Get them from
/// [`EventBus::dead_letters`](crate::EventBus::dead_letters).
#[derive(Clone)]
pub struct DeadLetters {
    queue: Arc<dyn DeadLetterQueue>,
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("queue", &self.queue.name())
            .field("transport", &self.transport.name())
            .finish()
    }
}

/// One line of the failure report: failures sharing event type, subscription and error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    /// The event type.
    pub event_type: String,
    /// The subscription that failed.
    pub subscription: String,
    /// The error (the dead letter's reason).
    pub error: String,
    /// How many dead letters share these.
    pub count: usize,
    /// The oldest last-failure time among them.
    pub oldest: DateTime<Utc>,
    /// The newest last-failure time among them.
    pub newest: DateTime<Utc>,
}

/// What is failing and why: dead letters grouped by event type, subscription and error,
/// largest groups first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureReport {
    /// How many dead letters there are in all.
    pub total: usize,
    /// The groups, by count descending.
    pub groups: Vec<FailureGroup>,
}

impl DeadLetters {
    /// The tools over `queue`, reprocessing through `transport`.
    pub fn new(queue: Arc<dyn DeadLetterQueue>, transport: Arc<dyn Transport>) -> Self {
        Self { queue, transport }
    }

    /// The queue underneath.
    pub fn queue(&self) -> &Arc<dyn DeadLetterQueue> {
        &self.queue
    }

    /// Lists dead letters, oldest first, filtered and paged by `query`.
    pub async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        self.queue.list(query).await
    }

    /// One dead letter, with its event, reason, attempts and failure times.
    pub async fn inspect(&self, id: &str) -> Result<DeadLetter> {
        self.queue.get(id).await?.ok_or_else(|| not_found(id))
    }

    /// How many dead letters are parked.
    pub async fn count(&self) -> Result<usize> {
        self.queue.len().await
    }

    /// Sends a dead letter's event back to its original subscription (attempts start again
    /// at 1), then removes it from the queue. If the redelivery fails the letter stays.
    pub async fn reprocess(&self, id: &str) -> Result<()> {
        let letter = self.inspect(id).await?;
        self.transport
            .redeliver(&letter.subscription, &letter.topic, letter.event.clone())
            .await?;
        // Removed after the redelivery: a crash between the two leaves a duplicate, never a
        // loss.
        self.queue.remove(id).await?;
        Ok(())
    }

    /// Reprocesses every dead letter matching `query`'s filters (its paging is ignored);
    /// returns how many were sent back.
    pub async fn reprocess_all(&self, query: &DeadLetterQuery) -> Result<usize> {
        let ids = self.matching_ids(query).await?;
        for id in &ids {
            self.reprocess(id).await?;
        }
        Ok(ids.len())
    }

    /// Discards a dead letter for good; returns it.
    pub async fn discard(&self, id: &str) -> Result<DeadLetter> {
        self.queue.remove(id).await?.ok_or_else(|| not_found(id))
    }

    /// Discards every dead letter matching `query`'s filters; returns how many.
    pub async fn discard_all(&self, query: &DeadLetterQuery) -> Result<usize> {
        let ids = self.matching_ids(query).await?;
        for id in &ids {
            self.queue.remove(id).await?;
        }
        Ok(ids.len())
    }

    /// Groups the dead letters by event type, subscription and error, with counts and the
    /// oldest and newest failure of each group.
    pub async fn report(&self) -> Result<FailureReport> {
        let mut groups: BTreeMap<(String, String, String), FailureGroup> = BTreeMap::new();
        let mut total = 0;
        for letter in self.all(&DeadLetterQuery::default()).await? {
            total += 1;
            let key = (
                letter.event.event_type().to_owned(),
                letter.subscription.clone(),
                letter.reason.clone(),
            );
            let at = letter.last_failure_at;
            groups
                .entry(key)
                .and_modify(|g| {
                    g.count += 1;
                    g.oldest = g.oldest.min(at);
                    g.newest = g.newest.max(at);
                })
                .or_insert_with(|| FailureGroup {
                    event_type: letter.event.event_type().to_owned(),
                    subscription: letter.subscription,
                    error: letter.reason,
                    count: 1,
                    oldest: at,
                    newest: at,
                });
        }
        let mut groups: Vec<FailureGroup> = groups.into_values().collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.count));
        Ok(FailureReport { total, groups })
    }

    /// Every letter matching the query's filters, page by page.
    async fn all(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        const PAGE: usize = 500;
        let mut out = Vec::new();
        loop {
            let page = self
                .queue
                .list(&DeadLetterQuery {
                    offset: out.len(),
                    limit: PAGE,
                    ..query.clone()
                })
                .await?;
            let done = page.len() < PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    async fn matching_ids(&self, query: &DeadLetterQuery) -> Result<Vec<String>> {
        Ok(self
            .all(&DeadLetterQuery {
                offset: 0,
                ..query.clone()
            })
            .await?
            .into_iter()
            .map(|l| l.id)
            .collect())
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound {
        what: format!("dead letter `{id}`"),
    }
}
