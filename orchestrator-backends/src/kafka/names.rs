//! Kafka names: event types and groups to topic names, patterns to regular expressions.
//!
//! Kafka topic names allow ASCII letters, digits, `.`, `_` and `-`, at most 249 of them.
//! An event type becomes `<prefix><escaped type>`, where every byte outside
//! `[A-Za-z0-9.-]` — `_` included — is written `_XX` (two upper-case hex digits). So an
//! escaped segment never holds `__`, and the backend's own topics, named
//! `<prefix>__orchestrator.<what>`, can never match a pattern subscription.

use orchestrator_core::pattern::Segment;
use orchestrator_core::{Error, Result, TopicPattern};

/// The longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// One segment of an event topic in a regular expression (POSIX ERE, as librdkafka
/// evaluates subscriptions): unescaped characters or `_XX` escapes, never `__`.
const SEGMENT: &str = "([A-Za-z0-9-]|_[0-9A-F][0-9A-F])+";

/// Whether Kafka allows `b` in a topic name.
fn is_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._-".contains(&b)
}

/// Checks a prefix: only characters Kafka allows in topic names.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    if !prefix.bytes().all(is_topic_byte) {
        return Err(Error::invalid(
            "Kafka topic prefix",
            format!("`{prefix}`: use ASCII letters, digits, `.`, `_` or `-`"),
        ));
    }
    if prefix.len() > 100 {
        return Err(Error::invalid(
            "Kafka topic prefix",
            format!("`{prefix}` is longer than 100 characters"),
        ));
    }
    Ok(())
}

/// Checks a complete Kafka topic name.
pub(crate) fn validate_kafka_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic == "." || topic == ".." {
        return Err(Error::invalid(
            "Kafka topic",
            format!("`{topic}` is not a name"),
        ));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid(
            "Kafka topic",
            format!("`{topic}` is longer than {MAX_TOPIC_LEN} characters"),
        ));
    }
    if !topic.bytes().all(is_topic_byte) {
        return Err(Error::invalid(
            "Kafka topic",
            format!("`{topic}`: use ASCII letters, digits, `.`, `_` or `-`"),
        ));
    }
    Ok(())
}

/// Escapes a name: bytes outside `[A-Za-z0-9.-]` become `_XX`.
pub(crate) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push('_');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Undoes [`escape`]; `None` when `escaped` is not the escape of any UTF-8 name.
pub(crate) fn unescape(escaped: &str) -> Option<String> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = escaped.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The Kafka topic of an event topic (an event type): `<prefix><escaped topic>`.
pub(crate) fn event_topic(prefix: &str, topic: &str) -> Result<String> {
    let name = format!("{prefix}{}", escape(topic));
    if name.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid(
            "topic",
            format!(
                "`{topic}` makes the Kafka topic `{name}`, longer than Kafka's \
                 {MAX_TOPIC_LEN} characters"
            ),
        ));
    }
    Ok(name)
}

/// The event topic of a Kafka topic, if it is one under `prefix`.
pub(crate) fn logical_topic(prefix: &str, kafka_topic: &str) -> Option<String> {
    let rest = kafka_topic.strip_prefix(prefix)?;
    if rest.starts_with("__") {
        return None;
    }
    unescape(rest)
}

/// One of the backend's own topics: `<prefix>__orchestrator.<what>`.
pub(crate) fn internal(prefix: &str, what: &str) -> String {
    format!("{prefix}__orchestrator.{what}")
}

/// A consumer group's retry topic: `<prefix>__orchestrator.retry.<escaped group>`.
pub(crate) fn retry_topic(prefix: &str, group: &str) -> Result<String> {
    let name = internal(prefix, &format!("retry.{}", escape(group)));
    if name.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid(
            "consumer group",
            format!("`{group}` is too long for its Kafka retry topic `{name}`"),
        ));
    }
    Ok(name)
}

/// The retry topic that ephemeral groups share (each reads only the messages for it), so
/// that an ephemeral group leaves no topic behind: `<prefix>__orchestrator.retries.ephemeral`.
pub(crate) fn ephemeral_retry_topic(prefix: &str) -> String {
    internal(prefix, "retries.ephemeral")
}

/// A lease's topic, which is also its consumer group:
/// `<prefix>__orchestrator.lease.<escaped name>`.
pub(crate) fn lease_topic(prefix: &str, name: &str) -> Result<String> {
    let topic = internal(prefix, &format!("lease.{}", escape(name)));
    if topic.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid(
            "lease name",
            format!("`{name}` is too long for its Kafka topic `{topic}`"),
        ));
    }
    Ok(topic)
}

/// The dead-letter topic: `<prefix>__orchestrator.deadletters`.
pub(crate) fn dead_letter_topic(prefix: &str) -> String {
    internal(prefix, "deadletters")
}

/// The Kafka consumer group id of a group: `<prefix><group>`.
pub(crate) fn group_id(prefix: &str, group: &str) -> String {
    format!("{prefix}{group}")
}

/// What a consumer subscribes to for `pattern`: the topic name itself for an exact pattern,
/// else an anchored regular expression (`^…$`, which librdkafka treats as a regex) over the
/// Kafka topic names under `prefix`.
pub(crate) fn subscription(prefix: &str, pattern: &TopicPattern) -> Result<String> {
    if pattern.is_exact() {
        return event_topic(prefix, pattern.as_str());
    }
    let mut out = String::from("^");
    out.push_str(&prefix.replace('.', "\\."));
    for (i, segment) in pattern.segments().iter().enumerate() {
        let dot = if i == 0 { "" } else { "\\." };
        match segment {
            Segment::Literal(text) => {
                out.push_str(dot);
                out.push_str(&escape(text).replace('.', "\\."));
            }
            Segment::One => {
                out.push_str(dot);
                out.push_str(SEGMENT);
            }
            Segment::Any if i == 0 => out.push_str(&format!("({SEGMENT}(\\.{SEGMENT})*)?")),
            Segment::Any => out.push_str(&format!("(\\.{SEGMENT})*")),
        }
    }
    out.push('$');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips() {
        for name in ["order.placed", "a_b", "x:y/z", "ünï.cøde", "a-b.C9", "_"] {
            let escaped = escape(name);
            assert!(escaped.bytes().all(is_topic_byte), "{escaped}");
            assert!(!escaped.contains("__"), "{escaped}");
            assert_eq!(unescape(&escaped).as_deref(), Some(name));
        }
        assert_eq!(escape("user_created.v1"), "user_5Fcreated.v1");
        assert_eq!(unescape("bad_zz"), None);
        assert_eq!(unescape("bad_4"), None);
    }

    #[test]
    fn topic_names() {
        assert_eq!(
            event_topic("app.", "order.placed").unwrap(),
            "app.order.placed"
        );
        assert_eq!(
            logical_topic("app.", "app.order_3Aplaced").as_deref(),
            Some("order:placed")
        );
        assert_eq!(logical_topic("app.", "app.__orchestrator.retry.g"), None);
        assert_eq!(logical_topic("app.", "other.x"), None);
        assert_eq!(
            retry_topic("app.", "g:1").unwrap(),
            "app.__orchestrator.retry.g_3A1"
        );
        assert!(event_topic("", &"x".repeat(250)).is_err());
        assert_eq!(
            lease_topic("app.", "relay.default").unwrap(),
            "app.__orchestrator.lease.relay.default"
        );
        assert_eq!(
            lease_topic("", "saga:1").unwrap(),
            "__orchestrator.lease.saga_3A1"
        );
        assert!(lease_topic("", &"x".repeat(240)).is_err());
    }

    #[test]
    fn patterns_become_anchored_regexes() {
        let p = |s: &str| TopicPattern::parse(s).unwrap();
        assert_eq!(
            subscription("app.", &p("user.created")).unwrap(),
            "app.user.created"
        );
        assert_eq!(
            subscription("app.", &p("user.*")).unwrap(),
            format!("^app\\.user\\.{SEGMENT}$")
        );
        assert_eq!(
            subscription("", &p("order.#")).unwrap(),
            format!("^order(\\.{SEGMENT})*$")
        );
        assert_eq!(
            subscription("p.", &p("#")).unwrap(),
            format!("^p\\.({SEGMENT}(\\.{SEGMENT})*)?$")
        );
        assert_eq!(
            subscription("", &p("a_b.*")).unwrap(),
            format!("^a_5Fb\\.{SEGMENT}$")
        );
    }
}
