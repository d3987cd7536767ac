//! How the CLI prints: readable lines by default, JSON with `--json`.

use chrono::{DateTime, SecondsFormat, Utc};
use orchestrator::core::{EventEnvelope, cloudevents};
use serde_json::Value;

use crate::CliResult;

/// How much of a payload a readable line shows.
const PAYLOAD_CHARS: usize = 160;

/// An event as its CloudEvents JSON object, the wire format of every backend.
pub(crate) fn event_json(event: &EventEnvelope) -> CliResult<Value> {
    Ok(serde_json::from_slice(&cloudevents::encode(event)?)?)
}

/// Prints `value` as pretty JSON.
pub(crate) fn print_json(value: &Value) -> CliResult {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A time as RFC 3339 with milliseconds, in UTC.
pub(crate) fn time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The payload, compact and cut short.
pub(crate) fn payload(event: &EventEnvelope) -> String {
    if !event.is_json() {
        return format!(
            "<{} bytes of {}>",
            event.data_bytes().len(),
            event.content_type()
        );
    }
    match event.data::<Value>() {
        Ok(value) => shorten(&value.to_string(), PAYLOAD_CHARS),
        Err(_) => "<invalid JSON>".to_owned(),
    }
}

/// `text` cut to `max` characters, with an ellipsis when cut.
pub(crate) fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// One readable line for an event: time, type, id, where it is stored, payload.
pub(crate) fn event_line(event: &EventEnvelope) -> String {
    let place = match (
        event.stream_id(),
        event.stream_version(),
        event.global_position(),
    ) {
        (Some(stream), Some(version), Some(position)) => {
            format!(" {stream}#{version} @{position}")
        }
        (Some(stream), _, _) => format!(" {stream}"),
        _ => String::new(),
    };
    format!(
        "{} {} {}{} {}",
        time(event.time()),
        event.event_type(),
        event.id(),
        place,
        payload(event)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_payloads_are_cut() {
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
    }
}
