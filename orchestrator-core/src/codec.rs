//! Codecs: how an envelope or a payload becomes bytes.
//!
//! [`CloudEventsJson`] is the wire format every backend uses (see [`crate::cloudevents`]);
//! [`Bincode`] is a compact binary form for payloads and for stores' own records.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, codec::{Bincode, Codec, CloudEventsJson}};
//!
//! let event = EventEnvelope::new("order.placed", &serde_json::json!({"id": 1}))?;
//! for codec in [&CloudEventsJson as &dyn Codec, &Bincode] {
//!     assert_eq!(codec.decode(&codec.encode(&event)?)?, event);
//! }
//! # Ok::<(), orchestrator_core::Error>(())
//! ```

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::envelope::{
    CONTENT_TYPE_BINCODE, EventEnvelope, EventId, Fields, KnownJson, StoredPosition, TraceContext,
    checked_event_type, shared_str,
};
use crate::error::{Error, Result};

/// Turns envelopes into bytes and back.
pub trait Codec: Send + Sync {
    /// The codec's name, for logs and errors.
    fn name(&self) -> &'static str;
    /// Encodes an envelope.
    fn encode(&self, event: &EventEnvelope) -> Result<Vec<u8>>;
    /// Decodes an envelope; bad input is an [`Error::Decode`], never a panic.
    fn decode(&self, bytes: &[u8]) -> Result<EventEnvelope>;
}

/// CloudEvents 1.0 JSON structured mode, the wire contract.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloudEventsJson;

impl Codec for CloudEventsJson {
    fn name(&self) -> &'static str {
        "cloudevents-json"
    }
    fn encode(&self, event: &EventEnvelope) -> Result<Vec<u8>> {
        crate::cloudevents::encode(event)
    }
    fn decode(&self, bytes: &[u8]) -> Result<EventEnvelope> {
        crate::cloudevents::decode(bytes)
    }
}

/// Compact binary encoding with bincode 2 (serde mode, standard configuration).
///
/// Decoding refuses to allocate more than [`Bincode::MAX_LEN`] bytes, so corrupt input
/// cannot exhaust memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bincode;

type BincodeConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ Bincode::MAX_LEN }>,
>;

impl Bincode {
    /// The largest value the decoder accepts, in bytes (64 MiB).
    pub const MAX_LEN: usize = 64 * 1024 * 1024;

    fn config() -> BincodeConfig {
        bincode::config::standard().with_limit::<{ Self::MAX_LEN }>()
    }

    /// Encodes any serde value (a payload) with bincode. A value whose encoding is larger
    /// than [`MAX_LEN`](Self::MAX_LEN) — more than the decoder reads back — is refused
    /// with [`Error::TooLarge`] naming its size and the limit, so that nothing is ever
    /// written that could not be read again.
    pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>> {
        let bytes = bincode::serde::encode_to_vec(value, Self::config())
            .map_err(|e| Error::encode(format!("bincode: {e}")))?;
        if bytes.len() > Self::MAX_LEN {
            return Err(Error::TooLarge {
                size: bytes.len(),
                limit: Self::MAX_LEN,
            });
        }
        Ok(bytes)
    }

    /// Decodes a bincode payload into any serde type.
    pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
        let (value, used) = bincode::serde::decode_from_slice(bytes, Self::config())
            .map_err(|e| Error::decode("data", format!("bincode: {e}")))?;
        if used != bytes.len() {
            return Err(Error::decode(
                "data",
                format!("bincode: {} trailing bytes", bytes.len() - used),
            ));
        }
        Ok(value)
    }

    /// A new envelope whose payload is `value` in bincode (content type
    /// [`CONTENT_TYPE_BINCODE`]).
    pub fn envelope<T: Serialize>(event_type: &str, value: &T) -> Result<EventEnvelope> {
        EventEnvelope::from_bytes(
            event_type,
            CONTENT_TYPE_BINCODE,
            Self::encode_payload(value)?,
        )
    }
}

/// The envelope as bincode sees it, for decoding. Times are seconds and nanoseconds since
/// the epoch. [`RecordRef`] must list the same fields in the same order with the same types.
#[derive(Deserialize)]
struct Record<'a> {
    id: &'a str,
    event_type: &'a str,
    schema_version: u32,
    source: &'a str,
    time_secs: i64,
    time_nanos: u32,
    subject: Option<String>,
    data_schema: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    headers: BTreeMap<String, String>,
    content_type: &'a str,
    data: &'a [u8],
    stream_id: Option<String>,
    position: Option<(u64, u64)>,
}

/// The borrowed twin of [`Record`], for encoding without copying.
#[derive(Serialize)]
struct RecordRef<'a> {
    id: &'a str,
    event_type: &'a str,
    schema_version: u32,
    source: &'a str,
    time_secs: i64,
    time_nanos: u32,
    subject: Option<&'a str>,
    data_schema: Option<&'a str>,
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
    headers: &'a BTreeMap<String, String>,
    content_type: &'a str,
    data: &'a Bytes,
    stream_id: Option<&'a str>,
    position: Option<(u64, u64)>,
}

impl Codec for Bincode {
    fn name(&self) -> &'static str {
        "bincode"
    }

    fn encode(&self, e: &EventEnvelope) -> Result<Vec<u8>> {
        let e = &*e.inner;
        let record = RecordRef {
            id: e.id.as_str(),
            event_type: &e.event_type,
            schema_version: e.schema_version,
            source: &e.source,
            time_secs: e.time.timestamp(),
            time_nanos: e.time.timestamp_subsec_nanos(),
            subject: e.subject.as_deref(),
            data_schema: e.data_schema.as_deref(),
            correlation_id: e.correlation_id.as_deref(),
            causation_id: e.causation_id.as_deref(),
            traceparent: e.trace.as_ref().map(|t| t.traceparent.as_str()),
            tracestate: e.trace.as_ref().and_then(|t| t.tracestate.as_deref()),
            headers: &e.headers,
            content_type: &e.content_type,
            data: &e.data,
            stream_id: e.stream_id.as_deref(),
            position: e.position.map(|p| (p.stream_version, p.global_position)),
        };
        Self::encode_payload(&record)
    }

    fn decode(&self, bytes: &[u8]) -> Result<EventEnvelope> {
        // Borrowing decode: strings and the payload are read in place, then copied once into
        // the envelope.
        let (r, used): (Record<'_>, usize) =
            bincode::serde::borrow_decode_from_slice(bytes, Self::config())
                .map_err(|e| Error::decode("$", format!("bincode: {e}")))?;
        if used != bytes.len() {
            return Err(Error::decode(
                "$",
                format!("bincode: {} trailing bytes", bytes.len() - used),
            ));
        }
        if r.id.is_empty() {
            return Err(Error::decode("id", "must not be empty"));
        }
        let id = EventId::from_checked(r.id);
        let event_type =
            checked_event_type(r.event_type).map_err(|e| Error::decode("type", e.to_string()))?;
        let time = DateTime::<Utc>::from_timestamp(r.time_secs, r.time_nanos)
            .ok_or_else(|| Error::decode("time", "out of range"))?;
        let trace = match (r.traceparent, r.tracestate) {
            (Some(traceparent), tracestate) => Some(TraceContext {
                traceparent,
                tracestate,
            }),
            (None, None) => None,
            (None, Some(_)) => return Err(Error::decode("tracestate", "without traceparent")),
        };
        Ok(EventEnvelope::from_fields(Fields {
            id,
            event_type,
            schema_version: r.schema_version,
            source: shared_str(r.source),
            time,
            subject: r.subject,
            data_schema: r.data_schema,
            correlation_id: r.correlation_id,
            causation_id: r.causation_id,
            trace,
            headers: r.headers,
            content_type: shared_str(r.content_type),
            data: Bytes::copy_from_slice(r.data),
            data_is_json: KnownJson(false),
            stream_id: r.stream_id,
            position: r
                .position
                .map(|(stream_version, global_position)| StoredPosition {
                    stream_version,
                    global_position,
                }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Payload {
        n: u64,
        name: String,
    }

    #[test]
    fn bincode_payload_round_trip() {
        let env = Bincode::envelope(
            "a.b",
            &Payload {
                n: 7,
                name: "x".into(),
            },
        )
        .unwrap();
        assert_eq!(env.content_type(), CONTENT_TYPE_BINCODE);
        assert_eq!(
            env.data::<Payload>().unwrap(),
            Payload {
                n: 7,
                name: "x".into()
            }
        );
    }

    #[test]
    fn bincode_envelope_round_trip() {
        let env = EventEnvelope::new("a.b", &serde_json::json!({"k": [1, 2]}))
            .unwrap()
            .with_correlation_id("c")
            .with_header("tenant", "t")
            .unwrap()
            .with_position(
                "s-1",
                StoredPosition {
                    stream_version: 3,
                    global_position: 9,
                },
            );
        let bytes = Bincode.encode(&env).unwrap();
        assert_eq!(Bincode.decode(&bytes).unwrap(), env);
    }

    #[test]
    fn bincode_garbage_is_a_decode_error() {
        let env = EventEnvelope::new("a.b", &1).unwrap();
        let bytes = Bincode.encode(&env).unwrap();
        for cut in 0..bytes.len() {
            assert!(Bincode.decode(&bytes[..cut]).is_err());
        }
        // A length prefix claiming gigabytes must not allocate them.
        let huge = [0xFCu8, 0xFF, 0xFF, 0xFF, 0x7F, 1, 2, 3];
        assert!(Bincode.decode(&huge).is_err());
    }
}
