//! Dead letters: deliveries that failed for good, parked with why, for people to look at.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::envelope::EventEnvelope;
use crate::error::Result;

/// A delivery that failed for good, with the story of its failure.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// This dead letter's id (a UUIDv7).
    pub id: String,
    /// The event.
    pub event: EventEnvelope,
    /// The topic it was published to.
    pub topic: String,
    /// The subscription (consumer group) that failed to handle it.
    pub subscription: String,
    /// Why it was dead-lettered (the last error).
    pub reason: String,
    /// How many delivery attempts were made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failure_at: DateTime<Utc>,
}

impl DeadLetter {
    /// A new dead letter with a fresh id.
    pub fn new(
        event: EventEnvelope,
        topic: String,
        subscription: String,
        reason: String,
        attempts: u32,
        first_failure_at: DateTime<Utc>,
        last_failure_at: DateTime<Utc>,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            event,
            topic,
            subscription,
            reason,
            attempts,
            first_failure_at,
            last_failure_at,
        }
    }
}

/// Which dead letters to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterQuery {
    /// Only letters of this event type.
    pub event_type: Option<String>,
    /// Only letters of this subscription.
    pub subscription: Option<String>,
    /// Skip this many matching letters (oldest first).
    pub offset: usize,
    /// Return at most this many.
    pub limit: usize,
}

impl Default for DeadLetterQuery {
    fn default() -> Self {
        Self {
            event_type: None,
            subscription: None,
            offset: 0,
            limit: 100,
        }
    }
}

impl DeadLetterQuery {
    /// Whether `letter` passes the query's filters (offset and limit aside).
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.event_type
            .as_deref()
            .is_none_or(|t| letter.event.event_type() == t)
            && self
                .subscription
                .as_deref()
                .is_none_or(|s| letter.subscription == s)
    }
}

/// Durable parking for failed deliveries.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync + 'static {
    /// The implementation's name.
    fn name(&self) -> &'static str;
    /// Parks a letter.
    async fn push(&self, letter: DeadLetter) -> Result<()>;
    /// Lists letters, oldest first.
    async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>>;
    /// One letter by id.
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>>;
    /// Removes a letter (to discard it, or to reprocess it); returns it if it was there.
    async fn remove(&self, id: &str) -> Result<Option<DeadLetter>>;
    /// How many letters are parked.
    async fn len(&self) -> Result<usize>;
    /// Whether no letter is parked.
    async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }
}
