//! CloudEvents 1.0, JSON structured mode: the wire format of every backend.
//!
//! An envelope becomes one JSON object with the required attributes `specversion` ("1.0"),
//! `id`, `source`, `type`, the optional `time` (RFC 3339), `subject`, `dataschema`,
//! `datacontenttype`, and `data` (JSON payloads, written verbatim) or `data_base64` (any
//! other content type). Orchestrator's own attributes are extensions: `schemaversion`,
//! `correlationid`, `causationid`, `traceparent`, `tracestate`, and for stored events
//! `streamid`, `streamversion` and `globalposition`. Headers are the remaining extensions.
//!
//! Decoding never panics: bad input is an [`Error::Decode`] naming the field at fault.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, cloudevents};
//! use serde_json::json;
//!
//! let event = EventEnvelope::new("order.placed", &json!({"order_id": "o-1"}))?;
//! let wire = cloudevents::encode(&event)?;
//! assert_eq!(cloudevents::decode(&wire)?, event);
//!
//! let err = cloudevents::decode(br#"{"specversion":"1.0","id":"1","source":"s"}"#).unwrap_err();
//! assert_eq!(err.decode_field(), Some("type"));
//! # Ok::<(), orchestrator_core::Error>(())
//! ```

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

use crate::envelope::{
    CONTENT_TYPE_JSON, EventEnvelope, EventId, Fields, StoredPosition, TraceContext,
    is_json_content_type, shared_str, validate_event_type, validate_extension_name,
};
use crate::error::{Error, Result};

/// The content type of a structured-mode CloudEvent in JSON.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// The only CloudEvents spec version this codec reads and writes.
pub const SPEC_VERSION: &str = "1.0";

#[derive(Serialize)]
struct Wire<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataschema: Option<&'a str>,
    datacontenttype: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    schemaversion: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    streamid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    streamversion: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    globalposition: Option<u64>,
    #[serde(flatten)]
    headers: &'a BTreeMap<String, String>,
}

/// Encodes an envelope as a CloudEvents JSON object.
///
/// Fails with [`Error::Encode`] when a JSON-typed payload is not valid JSON (or not UTF-8).
pub fn encode(event: &EventEnvelope) -> Result<Vec<u8>> {
    let event = &*event.inner;
    let raw;
    let (data, data_base64) = if event.data.is_empty() {
        (None, None)
    } else if is_json_content_type(&event.content_type) {
        let text = std::str::from_utf8(&event.data).map_err(|_| {
            Error::encode(format!(
                "event {}: payload is declared `{}` but is not UTF-8",
                event.id, event.content_type
            ))
        })?;
        raw = serde_json::from_str::<&RawValue>(text).map_err(|e| {
            Error::encode(format!(
                "event {}: payload is declared `{}` but is not valid JSON: {e}",
                event.id, event.content_type
            ))
        })?;
        (Some(raw), None)
    } else {
        (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&event.data)),
        )
    };
    let wire = Wire {
        specversion: SPEC_VERSION,
        id: event.id.as_str(),
        source: &event.source,
        event_type: &event.event_type,
        time: event.time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        subject: event.subject.as_deref(),
        dataschema: event.data_schema.as_deref(),
        datacontenttype: &event.content_type,
        data,
        data_base64,
        schemaversion: event.schema_version,
        correlationid: event.correlation_id.as_deref(),
        causationid: event.causation_id.as_deref(),
        traceparent: event.trace.as_ref().map(|t| t.traceparent.as_str()),
        tracestate: event.trace.as_ref().and_then(|t| t.tracestate.as_deref()),
        streamid: event.stream_id.as_deref(),
        streamversion: event.position.map(|p| p.stream_version),
        globalposition: event.position.map(|p| p.global_position),
        headers: &event.headers,
    };
    serde_json::to_vec(&wire).map_err(|e| Error::encode(e.to_string()))
}

/// Decodes a CloudEvents JSON object into an envelope.
///
/// A missing `time` is read as the moment of decoding; a missing `datacontenttype` as
/// `application/json`. Under a JSON content type, `data_base64` must hold JSON (kept
/// without surrounding whitespace), as `data` must. Extensions other than orchestrator's
/// become headers (numbers and booleans as their JSON text).
pub fn decode(bytes: &[u8]) -> Result<EventEnvelope> {
    let mut attrs: Attrs<'_> = serde_json::from_slice(bytes)
        .map_err(|e| Error::decode("$", format!("not a JSON object: {e}")))?;

    let specversion =
        take_string(&mut attrs, "specversion")?.ok_or_else(|| missing("specversion"))?;
    if specversion != SPEC_VERSION {
        return Err(Error::decode(
            "specversion",
            format!("`{specversion}` is not supported; only \"1.0\" is"),
        ));
    }
    let id = take_string(&mut attrs, "id")?.ok_or_else(|| missing("id"))?;
    let id = EventId::parse(id).map_err(|_| Error::decode("id", "must not be empty"))?;
    let source = take_string(&mut attrs, "source")?.ok_or_else(|| missing("source"))?;
    if source.is_empty() {
        return Err(Error::decode("source", "must not be empty"));
    }
    let event_type = take_string(&mut attrs, "type")?.ok_or_else(|| missing("type"))?;
    validate_event_type(&event_type).map_err(|e| Error::decode("type", e.to_string()))?;
    let time = match take_string(&mut attrs, "time")? {
        Some(t) => DateTime::parse_from_rfc3339(&t)
            .map_err(|e| Error::decode("time", format!("`{t}` is not an RFC 3339 timestamp: {e}")))?
            .with_timezone(&Utc),
        None => Utc::now(),
    };
    let subject = take_string(&mut attrs, "subject")?;
    let data_schema = take_string(&mut attrs, "dataschema")?;
    let content_type =
        take_string(&mut attrs, "datacontenttype")?.unwrap_or_else(|| CONTENT_TYPE_JSON.to_owned());

    let data = attrs.remove("data");
    let data_base64 = take_string(&mut attrs, "data_base64")?;
    let data: Vec<u8> = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(Error::decode(
                "data_base64",
                "an event carries `data` or `data_base64`, not both",
            ));
        }
        (None, Some(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| Error::decode("data_base64", format!("not valid base64: {e}")))?;
            if is_json_content_type(&content_type) {
                json_payload_from_base64(bytes, &content_type)?
            } else {
                bytes
            }
        }
        (Some(raw), None) if is_json_content_type(&content_type) => raw.get().as_bytes().to_vec(),
        (Some(raw), None) => match serde_json::from_str::<String>(raw.get()) {
            Ok(text) => text.into_bytes(),
            Err(_) => {
                return Err(Error::decode(
                    "data",
                    format!(
                        "datacontenttype is `{content_type}`, which is not JSON, so `data` must \
                         be a string (or use `data_base64`)"
                    ),
                ));
            }
        },
        (None, None) => Vec::new(),
    };

    let schema_version = match take_integer(&mut attrs, "schemaversion")? {
        None => 1,
        Some(v) => u32::try_from(v)
            .map_err(|_| Error::decode("schemaversion", format!("{v} does not fit in 32 bits")))?,
    };
    let correlation_id = take_string(&mut attrs, "correlationid")?;
    let causation_id = take_string(&mut attrs, "causationid")?;
    let traceparent = take_string(&mut attrs, "traceparent")?;
    let tracestate = take_string(&mut attrs, "tracestate")?;
    let trace = match (traceparent, tracestate) {
        (Some(traceparent), tracestate) => Some(TraceContext {
            traceparent,
            tracestate,
        }),
        (None, Some(_)) => {
            return Err(Error::decode(
                "tracestate",
                "`tracestate` without `traceparent`",
            ));
        }
        (None, None) => None,
    };
    let stream_id = take_string(&mut attrs, "streamid")?;
    let stream_version = take_integer(&mut attrs, "streamversion")?;
    let global_position = take_integer(&mut attrs, "globalposition")?;
    let position = match (stream_version, global_position) {
        (Some(stream_version), Some(global_position)) => Some(StoredPosition {
            stream_version,
            global_position,
        }),
        (None, None) => None,
        (Some(_), None) => return Err(missing_pair("globalposition", "streamversion")),
        (None, Some(_)) => return Err(missing_pair("streamversion", "globalposition")),
    };
    if position.is_some() && stream_id.is_none() {
        return Err(missing_pair("streamid", "streamversion"));
    }

    let mut headers = BTreeMap::new();
    for (name, raw) in attrs.0 {
        let name = name.into_owned();
        validate_extension_name(&name).map_err(|e| Error::decode(name.clone(), e.to_string()))?;
        let value: serde_json::Value = serde_json::from_str(raw.get())
            .map_err(|e| Error::decode(name.clone(), e.to_string()))?;
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(Error::decode(
                    name,
                    format!(
                        "extension values must be strings, numbers or booleans, not {}",
                        json_kind(&other)
                    ),
                ));
            }
        };
        headers.insert(name, text);
    }

    Ok(EventEnvelope::from_fields(Fields {
        id,
        event_type: crate::envelope::intern_event_type(&event_type),
        schema_version,
        source: shared_str(&source),
        time,
        subject,
        data_schema,
        correlation_id,
        causation_id,
        trace,
        headers,
        content_type: shared_str(&content_type),
        data: data.into(),
        stream_id,
        position,
    }))
}

/// A `data_base64` payload under a JSON content type (declared, or implied by a missing
/// `datacontenttype`): it must be JSON, as a `data` payload of that type is, and is kept as
/// the JSON text alone (surrounding whitespace dropped), the form `encode` writes as `data`.
/// Otherwise the envelope would carry a JSON content type over bytes `encode` refuses.
fn json_payload_from_base64(bytes: Vec<u8>, content_type: &str) -> Result<Vec<u8>> {
    let not_json = |why: String| {
        Error::decode(
            "data_base64",
            format!("datacontenttype is `{content_type}`, a JSON type, but the payload {why}"),
        )
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| not_json("is not UTF-8".to_owned()))?;
    let raw = serde_json::from_str::<&RawValue>(text)
        .map_err(|e| not_json(format!("is not valid JSON: {e}")))?;
    if raw.get().len() == bytes.len() {
        return Ok(bytes);
    }
    Ok(raw.get().as_bytes().to_vec())
}

fn missing(field: &str) -> Error {
    Error::decode(field, "required attribute is missing")
}

fn missing_pair(field: &str, because: &str) -> Error {
    Error::decode(field, format!("required when `{because}` is present"))
}

/// The top-level attributes of a CloudEvent, in one pass, borrowing keys and values from
/// the input where it can. Null values are dropped (CloudEvents: null means absent); a
/// repeated key keeps its last value.
struct Attrs<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Attrs<'a> {
    fn remove(&mut self, name: &str) -> Option<&'a RawValue> {
        let at = self.0.iter().position(|(k, _)| k == name)?;
        Some(self.0.swap_remove(at).1)
    }
}

impl<'de> Deserialize<'de> for Attrs<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Attrs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Attrs<'de>, M::Error> {
                let mut attrs: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(16);
                while let Some(Key(key)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    if value.get() == "null" {
                        attrs.retain(|(k, _)| *k != key);
                        continue;
                    }
                    match attrs.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = value,
                        None => attrs.push((key, value)),
                    }
                }
                Ok(Attrs(attrs))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// An object key, borrowed from the input unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(
                self,
                v: String,
            ) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// A JSON string's text: sliced straight from the input when it has no escapes.
fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'))
        && !inner.contains(['\\', '"'])
    {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

fn take_string(attrs: &mut Attrs<'_>, name: &str) -> Result<Option<String>> {
    match attrs.remove(name) {
        None => Ok(None),
        Some(raw) => json_string(raw)
            .map(|s| Some(s.into_owned()))
            .ok_or_else(|| Error::decode(name, format!("must be a string, found `{}`", raw.get()))),
    }
}

fn take_integer(attrs: &mut Attrs<'_>, name: &str) -> Result<Option<u64>> {
    let Some(raw) = attrs.remove(name) else {
        return Ok(None);
    };
    if let Ok(n) = raw.get().parse::<u64>() {
        return Ok(Some(n));
    }
    let value: serde_json::Value =
        serde_json::from_str(raw.get()).map_err(|e| Error::decode(name, e.to_string()))?;
    let parsed = match &value {
        serde_json::Value::Number(n) => n.as_u64(),
        // Integer extensions may arrive as strings from producers that only write strings.
        serde_json::Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    parsed.map(Some).ok_or_else(|| {
        Error::decode(
            name,
            format!("must be a non-negative integer, found `{}`", raw.get()),
        )
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
