//! What travels: Kafka headers around the CloudEvents JSON value. Dead letters travel in
//! core's shared JSON form (`DeadLetter::to_json`).

use chrono::{DateTime, SecondsFormat, Utc};
use orchestrator_core::cloudevents::CLOUDEVENTS_JSON;
use orchestrator_core::{EventEnvelope, Result};
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Header: the value's content type (`application/cloudevents+json`).
pub(crate) const CONTENT_TYPE: &str = "content-type";
/// Header: W3C trace context, also outside the JSON so that Kafka tooling sees it.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// Header: W3C trace state.
pub(crate) const TRACESTATE: &str = "tracestate";
/// Retry header: the event topic the message was published to.
pub(crate) const TOPIC: &str = "orchestrator-topic";
/// Retry header: which delivery attempt the message will be (decimal; absent: 1).
pub(crate) const ATTEMPT: &str = "orchestrator-attempt";
/// Retry header: when the message was first delivered to its group (RFC 3339).
pub(crate) const FIRST_ATTEMPT_AT: &str = "orchestrator-first-attempt-at";
/// Retry header: the reason given by the last nack.
pub(crate) const LAST_ERROR: &str = "orchestrator-last-error";
/// Retry header: when the message is due (milliseconds since the Unix epoch).
pub(crate) const DUE_AT: &str = "orchestrator-due-at";
/// Header of a retry message: the consumer group it is for (ephemeral groups share one
/// retry topic; each reads only its own).
pub(crate) const GROUP: &str = "orchestrator-group";

/// The event type given to a dead letter whose message was not a CloudEvent; its payload
/// is the message value as it arrived (`application/octet-stream`), and its headers
/// `kafkatopic`, `kafkapartition` and `kafkaoffset` say where it was read.
pub use orchestrator_core::dlq::UNDECODABLE_EVENT_TYPE;

/// Reasons and errors longer than this are cut, so headers stay small.
const MAX_TEXT: usize = 8 * 1024;

/// The headers of an event message: content type and trace context.
pub(crate) fn event_headers(event: &EventEnvelope) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(3).insert(Header {
        key: CONTENT_TYPE,
        value: Some(CLOUDEVENTS_JSON),
    });
    if let Some(trace) = event.trace_context() {
        headers = headers.insert(Header {
            key: TRACEPARENT,
            value: Some(trace.traceparent.as_str()),
        });
        if let Some(state) = &trace.tracestate {
            headers = headers.insert(Header {
                key: TRACESTATE,
                value: Some(state.as_str()),
            });
        }
    }
    headers
}

/// Where a message in a retry topic comes from and when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryInfo {
    /// The event topic it was published to.
    pub(crate) topic: String,
    /// The attempt it will be delivered as.
    pub(crate) attempt: u32,
    /// When it was first delivered (absent for redeliveries: set on delivery).
    pub(crate) first_attempt_at: Option<DateTime<Utc>>,
    /// The reason of the last nack.
    pub(crate) last_error: Option<String>,
    /// When it is due, in milliseconds since the epoch.
    pub(crate) due_at_ms: i64,
    /// The consumer group it is for (absent in messages written before it was recorded).
    pub(crate) group: Option<String>,
}

/// The headers of a retry message: the event's own, plus the retry story.
pub(crate) fn retry_headers(event: &EventEnvelope, info: &RetryInfo) -> OwnedHeaders {
    let attempt = info.attempt.to_string();
    let due = info.due_at_ms.to_string();
    let mut headers = event_headers(event)
        .insert(Header {
            key: TOPIC,
            value: Some(info.topic.as_str()),
        })
        .insert(Header {
            key: ATTEMPT,
            value: Some(attempt.as_str()),
        })
        .insert(Header {
            key: DUE_AT,
            value: Some(due.as_str()),
        });
    if let Some(first) = info.first_attempt_at {
        let first = time_text(first);
        headers = headers.insert(Header {
            key: FIRST_ATTEMPT_AT,
            value: Some(first.as_str()),
        });
    }
    if let Some(error) = &info.last_error {
        headers = headers.insert(Header {
            key: LAST_ERROR,
            value: Some(cut(error)),
        });
    }
    if let Some(group) = &info.group {
        headers = headers.insert(Header {
            key: GROUP,
            value: Some(group.as_str()),
        });
    }
    headers
}

/// The value of header `key` as text, if present and UTF-8.
pub(crate) fn header<'a, H: Headers>(headers: Option<&'a H>, key: &str) -> Option<&'a str> {
    headers?
        .iter()
        .filter(|h| h.key == key)
        .last()
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Reads the retry story of a message from a retry topic; `None` when `TOPIC` is missing.
pub(crate) fn read_retry<H: Headers>(headers: Option<&H>) -> Option<RetryInfo> {
    let topic = header(headers, TOPIC)?.to_owned();
    Some(RetryInfo {
        topic,
        attempt: header(headers, ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1),
        first_attempt_at: header(headers, FIRST_ATTEMPT_AT).and_then(parse_time),
        last_error: header(headers, LAST_ERROR).map(str::to_owned),
        due_at_ms: header(headers, DUE_AT)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0),
        group: header(headers, GROUP).map(str::to_owned),
    })
}

/// Cuts `text` to at most [`MAX_TEXT`] bytes, on a character boundary.
pub(crate) fn cut(text: &str) -> &str {
    if text.len() <= MAX_TEXT {
        return text;
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// RFC 3339 with as many fraction digits as needed (exact round trip).
pub(crate) fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// An envelope that carries the raw value of a message that is not a CloudEvent into the
/// dead-letter queue.
pub(crate) fn undecodable(
    value: &[u8],
    kafka_topic: &str,
    partition: i32,
    offset: i64,
) -> Result<EventEnvelope> {
    EventEnvelope::from_bytes(
        UNDECODABLE_EVENT_TYPE,
        "application/octet-stream",
        value.to_vec(),
    )?
    .with_header("kafkatopic", kafka_topic)?
    .with_header("kafkapartition", partition.to_string())?
    .with_header("kafkaoffset", offset.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_core::DeadLetter;

    #[test]
    fn letters_round_trip_exactly() {
        let event = EventEnvelope::new("order.placed", &serde_json::json!({"z": 1}))
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
        let json = letter.to_json().unwrap();
        assert_eq!(DeadLetter::from_json(&json).unwrap(), letter);
        assert!(matches!(
            DeadLetter::from_json(b"nope"),
            Err(orchestrator_core::Error::Decode { .. })
        ));
    }

    #[test]
    fn retry_headers_round_trip() {
        let event = EventEnvelope::new("a.b", &1).unwrap();
        let info = RetryInfo {
            topic: "a.b".into(),
            attempt: 3,
            first_attempt_at: Some(Utc::now()),
            last_error: Some("no".into()),
            due_at_ms: 42,
            group: Some("billing".into()),
        };
        let headers = retry_headers(&event, &info);
        assert_eq!(read_retry(Some(&headers)), Some(info));
        assert_eq!(header(Some(&headers), CONTENT_TYPE), Some(CLOUDEVENTS_JSON));
        assert_eq!(read_retry(Some(&event_headers(&event))), None);
    }

    #[test]
    fn undecodable_values_keep_their_bytes() {
        let e = undecodable(b"\xffjunk", "t.x", 2, 7).unwrap();
        assert_eq!(e.event_type(), UNDECODABLE_EVENT_TYPE);
        assert_eq!(e.data_bytes().as_ref(), b"\xffjunk");
        assert_eq!(e.header("kafkaoffset"), Some("7"));
    }
}
