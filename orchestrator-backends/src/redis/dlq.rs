//! [`RedisDeadLetterQueue`]: dead letters in a stream of their own, indexed by letter id.

use async_trait::async_trait;
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, Error, Result};
use redis::aio::ConnectionManager;

use super::config::RedisConfig;
use super::conn::{Keys, parse_entries, protocol_error, with_retry};
use super::scripts;

/// The durable dead-letter queue of a [`RedisTransport`](super::RedisTransport).
///
/// Letters live in the stream `<prefix>dlq` (one entry per letter, oldest first, with fields
/// `id`, `type`, `subscription` and `letter`, the letter as JSON with the event as a CloudEvent)
/// and the hash `<prefix>dlq:index` (letter id → entry id). Get one from a transport with
/// [`Transport::dead_letter_queue`](orchestrator_core::Transport::dead_letter_queue) or
/// [`RedisTransport::redis_dead_letter_queue`](super::RedisTransport::redis_dead_letter_queue),
/// or on its own with [`RedisDeadLetterQueue::connect`].
#[derive(Clone)]
pub struct RedisDeadLetterQueue {
    pub(crate) manager: ConnectionManager,
    pub(crate) config: RedisConfig,
    pub(crate) keys: Keys,
}

impl std::fmt::Debug for RedisDeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDeadLetterQueue")
            .field("url", &self.config.redacted_url())
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisDeadLetterQueue {
    /// Connects to the dead-letter queue under `config`'s prefix.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let manager = config.manager().await?;
        Ok(Self::with_manager(manager, config))
    }

    pub(crate) fn with_manager(manager: ConnectionManager, config: RedisConfig) -> Self {
        let keys = Keys::new(&config.prefix);
        Self {
            manager,
            config,
            keys,
        }
    }

    /// The script call that parks `letter`; the caller may add the settling of a delivery.
    pub(crate) fn park_invocation<'a>(
        &self,
        invocation: &mut redis::ScriptInvocation<'a>,
        letter: &DeadLetter,
    ) -> Result<()> {
        let json = encode_letter(letter)?;
        invocation
            .key(self.keys.dlq())
            .key(self.keys.dlq_index())
            .arg(&letter.id)
            .arg(letter.event.event_type())
            .arg(&letter.subscription)
            .arg(json);
        Ok(())
    }

    async fn take(&self, id: &str, remove: bool) -> Result<Option<DeadLetter>> {
        let json: Option<Vec<u8>> = with_retry(&self.config, "dead-letter take", |_| {
            let mut manager = self.manager.clone();
            async move {
                scripts::TAKE_LETTER
                    .key(self.keys.dlq())
                    .key(self.keys.dlq_index())
                    .arg(id)
                    .arg(if remove { "1" } else { "0" })
                    .invoke_async(&mut manager)
                    .await
            }
        })
        .await?;
        json.map(|j| decode_letter(&j)).transpose()
    }
}

#[async_trait]
impl DeadLetterQueue for RedisDeadLetterQueue {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn push(&self, letter: DeadLetter) -> Result<()> {
        let mut invocation = scripts::DEAD_LETTER.prepare_invoke();
        self.park_invocation(&mut invocation, &letter)?;
        let _: i64 = with_retry(&self.config, "dead-letter push", |_| {
            let mut manager = self.manager.clone();
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut manager).await }
        })
        .await?;
        tracing::debug!(letter = %letter.id, event = %letter.event.id(), "dead letter parked");
        Ok(())
    }

    async fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        const PAGE: usize = 500;
        let mut out = Vec::new();
        if query.limit == 0 {
            return Ok(out);
        }
        let mut skip = query.offset;
        let mut start = "-".to_owned();
        loop {
            let page = with_retry(&self.config, "dead-letter list", |_| {
                let mut manager = self.manager.clone();
                let start = start.clone();
                async move {
                    redis::cmd("XRANGE")
                        .arg(self.keys.dlq())
                        .arg(start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async::<redis::Value>(&mut manager)
                        .await
                }
            })
            .await?;
            let entries = parse_entries(page)?;
            let full = entries.len() == PAGE;
            for entry in &entries {
                let fits = query
                    .event_type
                    .as_deref()
                    .is_none_or(|t| entry.text("type") == Some(t))
                    && query
                        .subscription
                        .as_deref()
                        .is_none_or(|s| entry.text("subscription") == Some(s));
                if !fits {
                    continue;
                }
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                let json = entry
                    .field("letter")
                    .ok_or_else(|| protocol_error("dead-letter entry without `letter`"))?;
                out.push(decode_letter(json)?);
                if out.len() >= query.limit {
                    return Ok(out);
                }
            }
            match entries.last() {
                Some(last) if full => start = format!("({}", last.id),
                _ => return Ok(out),
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.take(id, false).await
    }

    async fn remove(&self, id: &str) -> Result<Option<DeadLetter>> {
        self.take(id, true).await
    }

    async fn len(&self) -> Result<usize> {
        with_retry(&self.config, "dead-letter len", |_| {
            let mut manager = self.manager.clone();
            async move {
                redis::cmd("XLEN")
                    .arg(self.keys.dlq())
                    .query_async(&mut manager)
                    .await
            }
        })
        .await
    }
}

/// A letter as JSON, the event embedded verbatim as its CloudEvent (core's format).
pub(crate) fn encode_letter(letter: &DeadLetter) -> Result<String> {
    String::from_utf8(letter.to_json()?)
        .map_err(|_| Error::encode("a dead letter's JSON encoding is not UTF-8"))
}

/// Reads a letter written by [`encode_letter`].
pub(crate) fn decode_letter(json: &[u8]) -> Result<DeadLetter> {
    DeadLetter::from_json(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use orchestrator_core::EventEnvelope;

    #[test]
    fn letters_round_trip_exactly() {
        let event = EventEnvelope::new("order.placed", &serde_json::json!({"z": 1, "a": "\"q\""}))
            .unwrap()
            .with_header("tenant", "t")
            .unwrap();
        let letter = DeadLetter::new(
            event,
            "order.placed".into(),
            "billing".into(),
            "boom \"quoted\"\nline".into(),
            3,
            Utc::now(),
            Utc::now(),
        );
        let json = encode_letter(&letter).unwrap();
        assert_eq!(decode_letter(json.as_bytes()).unwrap(), letter);
    }

    #[test]
    fn broken_letters_are_decode_errors() {
        assert!(matches!(decode_letter(b"nope"), Err(Error::Decode { .. })));
        assert!(matches!(
            decode_letter(br#"{"id":"1"}"#),
            Err(Error::Decode { .. })
        ));
    }
}
