//! What travels: AMQP properties and headers around the CloudEvents JSON body.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use orchestrator_core::EventEnvelope;
use orchestrator_core::cloudevents::CLOUDEVENTS_JSON;

/// Header: the topic an event was published to (set on retries and redeliveries, where the
/// routing key is a queue name).
pub(crate) const TOPIC: &str = "x-orchestrator-topic";
/// Header: which delivery attempt a retried message is (absent: 1).
pub(crate) const ATTEMPT: &str = "x-orchestrator-attempt";
/// Header: when the message was first delivered to its group (RFC 3339).
pub(crate) const FIRST_ATTEMPT_AT: &str = "x-orchestrator-first-attempt-at";
/// Header: the reason given by the last nack.
pub(crate) const LAST_ERROR: &str = "x-orchestrator-last-error";
/// Dead-letter headers.
pub(crate) const LETTER_ID: &str = "x-orchestrator-letter-id";
pub(crate) const REASON: &str = "x-orchestrator-reason";
pub(crate) const ATTEMPTS: &str = "x-orchestrator-attempts";
pub(crate) const FIRST_FAILURE_AT: &str = "x-orchestrator-first-failure-at";
pub(crate) const LAST_FAILURE_AT: &str = "x-orchestrator-last-failure-at";
pub(crate) const GROUP: &str = "x-orchestrator-group";
/// Store headers: the stream an event belongs to, the writer's id for the record, and the
/// mark of a sync record (no event).
pub(crate) const STREAM_ID: &str = "x-orchestrator-stream-id";
pub(crate) const WRITE_ID: &str = "x-orchestrator-write-id";
pub(crate) const MARKER: &str = "x-orchestrator-marker";
/// W3C trace context, also as AMQP headers so that AMQP-level tooling sees it.
pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const TRACESTATE: &str = "tracestate";
/// Headers RabbitMQ adds when it dead-letters a message (from a retry queue back to the
/// work queue); dropped when we republish, so they do not pile up.
const BROKER_DEATH_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// AMQP delivery mode "persistent": the message is written to disk by durable queues.
pub(crate) const PERSISTENT: u8 = 2;

/// Reasons and errors longer than this are cut, so headers stay well within a frame.
pub(crate) const MAX_TEXT: usize = 8 * 1024;

/// The properties of an event message: CloudEvents content type, persistent, the event id
/// as message id, its time, its type, and the trace context as headers.
pub(crate) fn event_properties(event: &EventEnvelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(trace) = event.trace_context() {
        headers.insert(TRACEPARENT.into(), text(&trace.traceparent));
        if let Some(state) = &trace.tracestate {
            headers.insert(TRACESTATE.into(), text(state));
        }
    }
    let mut properties = BasicProperties::default()
        .with_content_type(CLOUDEVENTS_JSON.into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(u64::try_from(event.time().timestamp()).unwrap_or(0))
        .with_headers(headers);
    if let Ok(id) = ShortString::try_new(event.id().as_str()) {
        properties = properties.with_message_id(id);
    }
    if let Ok(kind) = ShortString::try_new(event.event_type()) {
        properties = properties.with_type(kind);
    }
    properties
}

/// A string header value.
pub(crate) fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// An integer header value.
pub(crate) fn number(value: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(value).unwrap_or(i64::MAX))
}

/// A time header value (RFC 3339, nanoseconds kept).
pub(crate) fn time(value: DateTime<Utc>) -> AMQPValue {
    text(&value.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// Cuts `value` to [`MAX_TEXT`] bytes at a character boundary.
pub(crate) fn truncate(value: &str) -> &str {
    if value.len() <= MAX_TEXT {
        return value;
    }
    let mut end = MAX_TEXT;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Sets (or replaces) one header.
pub(crate) fn set_header(
    properties: BasicProperties,
    name: &str,
    value: AMQPValue,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(name.into(), value);
    properties.with_headers(headers)
}

/// The headers of `properties` without those RabbitMQ adds when dead-lettering.
pub(crate) fn headers_without_deaths(properties: &BasicProperties) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old {
            if !BROKER_DEATH_HEADERS.contains(&name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// A string header (long or short string).
pub(crate) fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    match header(properties, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header, whichever integer type (or decimal text) the writer used.
pub(crate) fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    match header(properties, name)? {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().parse().ok(),
        _ => None,
    }
}

/// A boolean header.
pub(crate) fn header_bool(properties: &BasicProperties, name: &str) -> bool {
    matches!(header(properties, name), Some(AMQPValue::Boolean(true)))
}

/// A time header written by [`time`].
pub(crate) fn header_time(properties: &BasicProperties, name: &str) -> Option<DateTime<Utc>> {
    let raw = header_str(properties, name)?;
    DateTime::parse_from_rfc3339(&raw)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The retry tier of a delay: the next power of two of its milliseconds, at least 16.
///
/// Each tier is a queue of its own, because RabbitMQ expires per-message TTLs only at the
/// head of a queue: a long delay would hold shorter ones back. Within a tier delays differ
/// by at most a factor of two, so no message waits more than twice its delay.
pub(crate) fn retry_tier(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    ms.clamp(16, MAX_DELAY_MS).next_power_of_two()
}

/// The longest delay a nack may ask for (about 24 days, RabbitMQ's TTL limit is 2^32-1 ms).
pub(crate) const MAX_DELAY_MS: u64 = 1 << 31;

/// The `expiration` property of a delayed message, in milliseconds.
pub(crate) fn expiration(delay: Duration) -> ShortString {
    let ms = u64::try_from(delay.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_DELAY_MS);
    ShortString::from(ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_powers_of_two() {
        assert_eq!(retry_tier(Duration::ZERO), 16);
        assert_eq!(retry_tier(Duration::from_millis(20)), 32);
        assert_eq!(retry_tier(Duration::from_millis(300)), 512);
        assert_eq!(retry_tier(Duration::from_millis(512)), 512);
        assert_eq!(retry_tier(Duration::from_secs(86_400 * 365)), MAX_DELAY_MS);
        assert_eq!(expiration(Duration::from_millis(300)).as_str(), "300");
    }

    #[test]
    fn headers_round_trip() {
        let now = Utc::now();
        let p = BasicProperties::default();
        let p = set_header(p, ATTEMPT, number(3));
        let p = set_header(p, LAST_ERROR, text("boom"));
        let p = set_header(p, FIRST_ATTEMPT_AT, time(now));
        let p = set_header(p, "x-death", text("broker"));
        assert_eq!(header_u64(&p, ATTEMPT), Some(3));
        assert_eq!(header_str(&p, LAST_ERROR).as_deref(), Some("boom"));
        assert_eq!(header_time(&p, FIRST_ATTEMPT_AT), Some(now));
        assert!(!headers_without_deaths(&p).contains_key("x-death"));
        assert!(headers_without_deaths(&p).contains_key(ATTEMPT));
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_TEXT && cut.chars().all(|c| c == 'é'));
    }
}
