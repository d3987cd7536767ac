//! Dead letters: deliveries that failed for good, parked with why, for people to look at.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::envelope::EventEnvelope;
use crate::error::Result;

/// The event type of a dead letter that stands for something that could not be read as an
/// event: a broker message that is no CloudEvent, or a store record the outbox relay could
/// not decode. Its payload says what was read, or why it could not be.
pub const UNDECODABLE_EVENT_TYPE: &str = "orchestrator.undecodable";

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

/// The JSON form of a dead letter, as backends store it: the letter's fields, times in
/// RFC 3339, and the event embedded verbatim as its CloudEvent.
#[derive(serde::Serialize, serde::Deserialize)]
struct LetterJson<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    subscription: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    reason: std::borrow::Cow<'a, str>,
    attempts: u32,
    first_failure_at: DateTime<Utc>,
    last_failure_at: DateTime<Utc>,
    #[serde(borrow)]
    event: &'a serde_json::value::RawValue,
}

impl DeadLetter {
    /// Encodes the letter as JSON (the event embedded as its CloudEvent), the form durable
    /// dead-letter queues store.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let event = crate::cloudevents::encode(&self.event)?;
        let event = std::str::from_utf8(&event)
            .map_err(|_| crate::Error::encode("a CloudEvents JSON encoding is not UTF-8"))?;
        let event: &serde_json::value::RawValue = serde_json::from_str(event)
            .map_err(|e| crate::Error::encode(format!("CloudEvents JSON: {e}")))?;
        let json = LetterJson {
            id: self.id.as_str().into(),
            topic: self.topic.as_str().into(),
            subscription: self.subscription.as_str().into(),
            reason: self.reason.as_str().into(),
            attempts: self.attempts,
            first_failure_at: self.first_failure_at,
            last_failure_at: self.last_failure_at,
            event,
        };
        serde_json::to_vec(&json).map_err(|e| crate::Error::encode(e.to_string()))
    }

    /// Decodes a letter written by [`DeadLetter::to_json`]; bad input is an
    /// [`crate::Error::Decode`] naming the field (`letter.<field>`), never a panic.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let json: LetterJson<'_> = serde_json::from_slice(bytes).map_err(|e| {
            let field = [
                "id",
                "topic",
                "subscription",
                "reason",
                "attempts",
                "first_failure_at",
                "last_failure_at",
                "event",
            ]
            .into_iter()
            .find(|f| e.to_string().contains(&format!("`{f}`")))
            .map_or_else(|| "letter".to_owned(), |f| format!("letter.{f}"));
            crate::Error::decode(field, e.to_string())
        })?;
        let event = crate::cloudevents::decode(json.event.get().as_bytes())?;
        Ok(Self {
            id: json.id.into_owned(),
            event,
            topic: json.topic.into_owned(),
            subscription: json.subscription.into_owned(),
            reason: json.reason.into_owned(),
            attempts: json.attempts,
            first_failure_at: json.first_failure_at,
            last_failure_at: json.last_failure_at,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_round_trip_through_json() {
        let event = EventEnvelope::new("order.placed", &serde_json::json!({"z": 1, "q": "\"x\""}))
            .unwrap()
            .with_header("tenant", "t")
            .unwrap();
        let now = Utc::now();
        let letter = DeadLetter::new(
            event,
            "order.placed".into(),
            "billing".into(),
            "ledger \"down\"".into(),
            3,
            now,
            now,
        );
        let json = letter.to_json().unwrap();
        assert_eq!(DeadLetter::from_json(&json).unwrap(), letter);
    }

    #[test]
    fn bad_letters_are_decode_errors() {
        assert_eq!(
            DeadLetter::from_json(b"nope").unwrap_err().decode_field(),
            Some("letter")
        );
        let err = DeadLetter::from_json(br#"{"id":"1"}"#).unwrap_err();
        assert!(matches!(err, crate::Error::Decode { .. }), "{err}");
    }
}
