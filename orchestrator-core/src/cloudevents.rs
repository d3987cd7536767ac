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
//! # Limits
//!
//! Every backend decodes what its broker hands it, from anyone who can publish, so decoding
//! must take time in proportion to the input and refuse what no real event looks like rather
//! than spend seconds of a worker on it. Decoding reads the object once and looks every
//! attribute up in a map, and refuses, as an [`Error::Decode`] whose reason names the
//! limit (a transport dead-letters such a message with that reason):
//!
//! - an object of more than [`MAX_ATTRIBUTES`] members (stopping at the first one over);
//! - more than [`MAX_EXTENSIONS`] extension attributes (headers);
//! - an extension name longer than [`MAX_EXTENSION_NAME_LEN`] bytes, or a value longer than
//!   [`MAX_EXTENSION_VALUE_LEN`].
//!
//! [`EventEnvelope::with_header`] refuses headers over the same limits, and [`encode`] an
//! envelope over them, so what one process publishes every other one decodes.
//!
//! There is no nesting limit because decoding does not recurse: `data` is checked to be JSON
//! by serde_json's scan for a raw value, which keeps a stack of its own instead of recursing,
//! and is kept as it came; an extension value that is an array or an object is refused at its
//! first byte. A handler that deserializes `data` with serde_json gets serde_json's own
//! recursion limit (128 levels), which is an error, not a crash.
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
use chrono::{DateTime, Datelike as _, SecondsFormat, Utc};
use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

use crate::envelope::{
    CONTENT_TYPE_JSON, EventEnvelope, EventId, Fields, KnownJson, RESERVED_ATTRIBUTES,
    StoredPosition, TraceContext, is_json_content_type, shared_str, validate_extension_name,
};
use crate::error::{Error, Result};

/// The content type of a structured-mode CloudEvent in JSON.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// The only CloudEvents spec version this codec reads and writes.
pub const SPEC_VERSION: &str = "1.0";

/// The most extension attributes (headers) an event may carry: 256.
///
/// Real events carry a handful (a tenant, a region, a few routing keys); 256 is far above
/// that and keeps the work of decoding one event small. Orchestrator's own extensions
/// (`correlationid`, `streamid`, …) do not count.
pub const MAX_EXTENSIONS: usize = 256;

/// The most members the JSON object of an event may have: 274, the 18 attributes
/// CloudEvents and orchestrator define plus [`MAX_EXTENSIONS`].
///
/// Every member counts, a repeated or `null` one too, as each costs work to read; decoding
/// stops at the first member over the limit, so an object with a hundred thousand keys costs
/// no more than one with 275.
pub const MAX_ATTRIBUTES: usize = RESERVED_ATTRIBUTES.len() + MAX_EXTENSIONS;

/// The longest extension attribute (header) name, in bytes: 64.
///
/// CloudEvents asks for names of at most 20 characters (a SHOULD); 64 leaves room for
/// producers that ignore that.
pub const MAX_EXTENSION_NAME_LEN: usize = 64;

/// The longest extension attribute (header) value, in bytes of its text (a number's or a
/// boolean's JSON text): 8 KiB.
///
/// That is the size W3C Baggage allows a whole `baggage` header and what HTTP servers
/// commonly allow one header line; larger values belong in the payload.
pub const MAX_EXTENSION_VALUE_LEN: usize = 8 * 1024;

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
    // A JSON payload (`data`) is written by `encode` after the rest, verbatim.
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

impl<'a> Wire<'a> {
    /// The wire form of `event`; `stored_in` (a stream) stands in for a stored position, with
    /// the widest version and global position, to measure the event as it will be stored.
    fn new(event: &'a Fields, data_base64: Option<String>, stored_in: Option<&'a str>) -> Self {
        let position = match stored_in {
            Some(_) => Some((u64::MAX, u64::MAX)),
            None => event
                .position
                .map(|p| (p.stream_version, p.global_position)),
        };
        Self {
            specversion: SPEC_VERSION,
            id: event.id.as_str(),
            source: &event.source,
            event_type: &event.event_type,
            time: event.time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            subject: event.subject.as_deref(),
            dataschema: event.data_schema.as_deref(),
            datacontenttype: &event.content_type,
            data_base64,
            schemaversion: event.schema_version,
            correlationid: event.correlation_id.as_deref(),
            causationid: event.causation_id.as_deref(),
            traceparent: event.trace.as_ref().map(|t| t.traceparent.as_str()),
            tracestate: event.trace.as_ref().and_then(|t| t.tracestate.as_deref()),
            streamid: stored_in.or(event.stream_id.as_deref()),
            streamversion: position.map(|p| p.0),
            globalposition: position.map(|p| p.1),
            headers: &event.headers,
        }
    }
}

/// The length in bytes of [`encode`]'s output for `event`, computed without encoding the
/// payload: what [`MaxEventSize`](crate::MaxEventSize) measures.
///
/// Exact whenever `encode` succeeds, except that whitespace around a JSON payload (which
/// `encode` drops) is counted: a JSON payload is written verbatim, any other as base64,
/// whose length is known in advance.
pub fn encoded_len(event: &EventEnvelope) -> usize {
    wire_len(&event.inner, None)
}

/// The length of the event as it will be encoded once stored in `stream`: with that stream
/// id, and the widest stream version and global position (20 digits each), so that what a
/// store accepts under a limit the relay can publish under the same limit.
pub fn stored_encoded_len(event: &EventEnvelope, stream: &str) -> usize {
    wire_len(&event.inner, Some(stream))
}

/// A quick upper bound of [`wire_len`], from the lengths of the event's strings, so that an
/// event far under a limit is passed without being measured: every byte of a string counted
/// as the six of its worst JSON escape (`\u001f`), plus 512 for the attribute names, the
/// numbers and the time.
pub(crate) fn wire_len_bound(event: &EventEnvelope, stored_in: Option<&str>) -> usize {
    let e = &*event.inner;
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let strings = e.id.as_str().len()
        + e.source.len()
        + e.event_type.len()
        + e.content_type.len()
        + opt(&e.subject)
        + opt(&e.data_schema)
        + opt(&e.correlation_id)
        + opt(&e.causation_id)
        + e.trace
            .as_ref()
            .map_or(0, |t| t.traceparent.len() + opt(&t.tracestate))
        + stored_in.map_or_else(|| opt(&e.stream_id), str::len)
        + e.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 1)
            .sum::<usize>();
    512 + strings.saturating_mul(6) + data_len(e)
}

/// The length of the payload's member, comma included.
fn data_len(event: &Fields) -> usize {
    let len = event.data.len();
    if len == 0 {
        0
    } else if is_json_content_type(&event.content_type) {
        // `,"data":` and the payload verbatim.
        8 + len
    } else {
        // `,"data_base64":"…"`, padded base64.
        17 + len.div_ceil(3) * 4
    }
}

fn wire_len(event: &Fields, stored_in: Option<&str>) -> usize {
    /// Counts bytes instead of keeping them.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Serializing borrowed strings and numbers into a counter cannot fail; were it to, the
    // count would only be short by what was not written, and `encode` fails the same way.
    let _ = serde_json::to_writer(&mut counter, &Wire::new(event, None, stored_in));
    counter.0 + data_len(event)
}

/// Encodes an envelope as a CloudEvents JSON object.
///
/// Fails with [`Error::Encode`] when a JSON-typed payload is not valid JSON (or not UTF-8),
/// or when the headers are over the [limits](self#limits) decoding enforces (an envelope
/// built with [`EventEnvelope::with_header`] never is).
pub fn encode(event: &EventEnvelope) -> Result<Vec<u8>> {
    let event = &*event.inner;
    if let Some(why) = headers_over_limits(&event.headers) {
        return Err(Error::encode(format!("event {}: {why}", event.id)));
    }
    // RFC 3339 writes four-digit years: a time outside them would be written in a form no
    // decoder reads back, and the event stored or sent unreadable.
    if !(0..=9999).contains(&event.time.year()) {
        return Err(Error::encode(format!(
            "event {}: its time {} is outside the years 0000 to 9999 that an RFC 3339 \
             timestamp (the CloudEvents `time`) can hold; give it a time in that range",
            event.id, event.time
        )));
    }
    let json_data = !event.data.is_empty() && is_json_content_type(&event.content_type);
    if json_data && !event.data_is_json.0 {
        // Bytes given as JSON by the caller: check them before sending them as such.
        let text = std::str::from_utf8(&event.data).map_err(|_| {
            Error::encode(format!(
                "event {}: payload is declared `{}` but is not UTF-8",
                event.id, event.content_type
            ))
        })?;
        serde_json::from_str::<&RawValue>(text).map_err(|e| {
            Error::encode(format!(
                "event {}: payload is declared `{}` but is not valid JSON: {e}",
                event.id, event.content_type
            ))
        })?;
    }
    let data_base64 = (!event.data.is_empty() && !json_data)
        .then(|| base64::engine::general_purpose::STANDARD.encode(&event.data));
    let mut out = Vec::with_capacity(384 + event.data.len() + event.data.len() / 3);
    serde_json::to_writer(&mut out, &Wire::new(event, data_base64, None))
        .map_err(|e| Error::encode(e.to_string()))?;
    if json_data {
        // The payload goes in verbatim, as the last member (`wire_len` counts it so too).
        if out.pop() != Some(b'}') {
            return Err(Error::encode("a CloudEvents encoding is not a JSON object"));
        }
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(&event.data);
        out.push(b'}');
    }
    Ok(out)
}

/// Decodes a CloudEvents JSON object into an envelope.
///
/// A missing `time` is read as the moment of decoding; a missing `datacontenttype` as
/// `application/json`. Under a JSON content type, `data_base64` must hold JSON (kept
/// without surrounding whitespace), as `data` must. Extensions other than orchestrator's
/// become headers (numbers and booleans as their JSON text).
///
/// Input over one of the [limits](self#limits) is an [`Error::Decode`] whose reason names it,
/// as is input longer than [`MaxEventSize::MAX`](crate::MaxEventSize::MAX) (64 MiB); to
/// refuse input over a configured limit, decode with
/// [`MaxEventSize::decode`](crate::MaxEventSize::decode).
pub fn decode(bytes: &[u8]) -> Result<EventEnvelope> {
    crate::MaxEventSize::MAX.check_received(bytes)?;
    let mut attrs = Attrs::read(bytes)?;

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
    let event_type = crate::envelope::checked_event_type(&event_type)
        .map_err(|e| Error::decode("type", e.to_string()))?;
    let time = match take_string(&mut attrs, "time")? {
        Some(t) => {
            let time = DateTime::parse_from_rfc3339(&t)
                .map_err(|e| {
                    Error::decode("time", format!("`{t}` is not an RFC 3339 timestamp: {e}"))
                })?
                .with_timezone(&Utc);
            // An offset can carry a four-digit year out of range in UTC: such an event
            // could not be written again (see `encode`).
            if !(0..=9999).contains(&time.year()) {
                return Err(Error::decode(
                    "time",
                    format!("`{t}` is outside the years 0000 to 9999 in UTC"),
                ));
            }
            time
        }
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

    if attrs.0.len() > MAX_EXTENSIONS {
        return Err(Error::decode("$", too_many_extensions(attrs.0.len())));
    }
    let mut headers = BTreeMap::new();
    for (name, raw) in attrs.0 {
        // The name and the value are checked before anything repeats them in an error.
        validate_extension_name(&name).map_err(|e| Error::decode(shorten(&name), e.to_string()))?;
        let text = extension_text(raw).map_err(|why| Error::decode(name.as_ref(), why))?;
        if text.len() > MAX_EXTENSION_VALUE_LEN {
            return Err(Error::decode(name.as_ref(), value_too_long(text.len())));
        }
        headers.insert(name.into_owned(), text);
    }

    Ok(EventEnvelope::from_fields(Fields {
        id,
        event_type,
        schema_version,
        source: shared_str(&source),
        time,
        subject,
        data_schema,
        correlation_id,
        causation_id,
        trace,
        headers,
        // A JSON payload was parsed as JSON here: in `data`, or checked in `data_base64`.
        data_is_json: KnownJson(is_json_content_type(&content_type)),
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

/// The text of an extension value: a string's, a number's or a boolean's JSON text. An array
/// or an object is refused at its first byte, without reading it (it could nest deeply).
fn extension_text(raw: &RawValue) -> std::result::Result<String, String> {
    let kind = match raw.get().as_bytes().first() {
        Some(b'[') => Some("an array"),
        Some(b'{') => Some("an object"),
        _ => None,
    };
    if let Some(kind) = kind {
        return Err(format!(
            "extension values must be strings, numbers or booleans, not {kind}"
        ));
    }
    match serde_json::from_str(raw.get()).map_err(|e| e.to_string())? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!(
            "extension values must be strings, numbers or booleans, not {}",
            json_kind(&other)
        )),
    }
}

/// Why headers are over the limits, if they are.
pub(crate) fn headers_over_limits(headers: &BTreeMap<String, String>) -> Option<String> {
    if headers.len() > MAX_EXTENSIONS {
        return Some(too_many_extensions(headers.len()));
    }
    headers.iter().find_map(|(name, value)| {
        if name.len() > MAX_EXTENSION_NAME_LEN {
            Some(format!(
                "header `{}`: {}",
                shorten(name),
                name_too_long(name.len())
            ))
        } else if value.len() > MAX_EXTENSION_VALUE_LEN {
            Some(format!("header `{name}`: {}", value_too_long(value.len())))
        } else {
            None
        }
    })
}

pub(crate) fn too_many_extensions(count: usize) -> String {
    format!(
        "{count} extension attributes (headers), over the limit of {MAX_EXTENSIONS} \
         (cloudevents::MAX_EXTENSIONS); carry such data in the payload"
    )
}

pub(crate) fn name_too_long(len: usize) -> String {
    format!(
        "the name is {len} bytes long, over the limit of {MAX_EXTENSION_NAME_LEN} \
         (cloudevents::MAX_EXTENSION_NAME_LEN); use a shorter name"
    )
}

pub(crate) fn value_too_long(len: usize) -> String {
    format!(
        "the value is {len} bytes long, over the limit of {MAX_EXTENSION_VALUE_LEN} \
         (cloudevents::MAX_EXTENSION_VALUE_LEN); carry large values in the payload"
    )
}

/// A name as an error shows it: whole up to [`MAX_EXTENSION_NAME_LEN`] bytes, else its start
/// and `…` (an attacker's megabyte-long key must not be copied into every dead letter).
pub(crate) fn shorten(name: &str) -> Cow<'_, str> {
    if name.len() <= MAX_EXTENSION_NAME_LEN {
        return Cow::Borrowed(name);
    }
    let mut end = MAX_EXTENSION_NAME_LEN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &name[..end]))
}

fn missing(field: &str) -> Error {
    Error::decode(field, "required attribute is missing")
}

fn missing_pair(field: &str, because: &str) -> Error {
    Error::decode(field, format!("required when `{because}` is present"))
}

/// The top-level attributes of a CloudEvent, read in one pass into a map (so each lookup
/// costs a logarithm of the count, never a scan), borrowing keys and values from the input
/// where it can. Null values are dropped (CloudEvents: null means absent); a repeated key
/// keeps its last value. More than [`MAX_ATTRIBUTES`] members stop the reading.
struct Attrs<'a>(BTreeMap<Cow<'a, str>, &'a RawValue>);

impl<'a> Attrs<'a> {
    fn read(bytes: &'a [u8]) -> Result<Self> {
        let mut over_limit = false;
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let read = ReadAttrs {
            over_limit: &mut over_limit,
        }
        .deserialize(&mut json)
        .and_then(|attrs| json.end().map(|()| attrs));
        read.map_err(|e| {
            if over_limit {
                Error::decode(
                    "$",
                    format!(
                        "the object has more than {MAX_ATTRIBUTES} members, the limit \
                         (cloudevents::MAX_ATTRIBUTES: the attributes CloudEvents and \
                         orchestrator define and {MAX_EXTENSIONS} extensions, \
                         cloudevents::MAX_EXTENSIONS; repeated and null members count); \
                         carry such data in the payload"
                    ),
                )
            } else {
                Error::decode("$", format!("not a JSON object: {e}"))
            }
        })
    }

    fn remove(&mut self, name: &str) -> Option<&'a RawValue> {
        self.0.remove(name)
    }
}

/// Reads [`Attrs`], noting in `over_limit` that it stopped at [`MAX_ATTRIBUTES`] (serde's
/// error type carries no kind of ours).
struct ReadAttrs<'f> {
    over_limit: &'f mut bool,
}

impl<'de> DeserializeSeed<'de> for ReadAttrs<'_> {
    type Value = Attrs<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Attrs<'de>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ReadAttrs<'_> {
    type Value = Attrs<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> std::result::Result<Attrs<'de>, M::Error> {
        let mut attrs = BTreeMap::new();
        let mut members = 0usize;
        while let Some(Key(key)) = map.next_key()? {
            members += 1;
            if members > MAX_ATTRIBUTES {
                *self.over_limit = true;
                return Err(serde::de::Error::custom("too many members"));
            }
            let value: &'de RawValue = map.next_value()?;
            if value.get() == "null" {
                attrs.remove(key.as_ref());
            } else {
                attrs.insert(key, value);
            }
        }
        Ok(Attrs(attrs))
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
