//! [`RedisDeadLetterQueue`]: dead letters in a stream of their own, indexed by letter id.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, Error, Result, cloudevents};
use redis::aio::ConnectionManager;
use serde_json::value::RawValue;

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

fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A letter as JSON, the event embedded verbatim as its CloudEvent.
pub(crate) fn encode_letter(letter: &DeadLetter) -> Result<String> {
    let event = cloudevents::encode(&letter.event)?;
    let event = String::from_utf8(event)
        .map_err(|_| Error::encode("a CloudEvents JSON encoding is not UTF-8"))?;
    let text = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    Ok(format!(
        r#"{{"id":{},"topic":{},"subscription":{},"reason":{},"attempts":{},"first_failure_at":{},"last_failure_at":{},"event":{}}}"#,
        text(&letter.id),
        text(&letter.topic),
        text(&letter.subscription),
        text(&letter.reason),
        letter.attempts,
        text(&time_text(letter.first_failure_at)),
        text(&time_text(letter.last_failure_at)),
        event
    ))
}

/// Reads a letter written by [`encode_letter`].
pub(crate) fn decode_letter(json: &[u8]) -> Result<DeadLetter> {
    let bad = |field: &str, reason: &str| Error::decode(format!("letter.{field}"), reason);
    let attrs: BTreeMap<String, &RawValue> = serde_json::from_slice(json)
        .map_err(|e| Error::decode("letter", format!("not a JSON object: {e}")))?;
    let string = |name: &str| -> Result<String> {
        let raw = attrs.get(name).ok_or_else(|| bad(name, "missing"))?;
        serde_json::from_str::<String>(raw.get()).map_err(|_| bad(name, "not a string"))
    };
    let time = |name: &str| -> Result<DateTime<Utc>> {
        let text = string(name)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| bad(name, "not an RFC 3339 time"))
    };
    let attempts = attrs
        .get("attempts")
        .and_then(|raw| serde_json::from_str::<u32>(raw.get()).ok())
        .ok_or_else(|| bad("attempts", "missing or not a number"))?;
    let event = attrs.get("event").ok_or_else(|| bad("event", "missing"))?;
    Ok(DeadLetter {
        id: string("id")?,
        event: cloudevents::decode(event.get().as_bytes())?,
        topic: string("topic")?,
        subscription: string("subscription")?,
        reason: string("reason")?,
        attempts,
        first_failure_at: time("first_failure_at")?,
        last_failure_at: time("last_failure_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
