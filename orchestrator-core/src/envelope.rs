//! The event envelope: one type for every event, everywhere.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::cloudevents;
use crate::error::{Error, Result};

/// The content type of JSON payloads, the default.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// The content type of payloads encoded with the [`crate::codec::Bincode`] codec.
pub const CONTENT_TYPE_BINCODE: &str = "application/x-bincode";
/// The source given to events whose creator names none.
pub const DEFAULT_SOURCE: &str = "urn:orchestrator";

/// A typed event: a serde type with a stable type name and a schema version.
///
/// ```
/// use orchestrator_core::{Event, EventEnvelope};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String, amount_cents: u64 }
///
/// impl Event for OrderPlaced {
///     const EVENT_TYPE: &'static str = "order.placed";
///     const SCHEMA_VERSION: u32 = 2;
/// }
///
/// let placed = OrderPlaced { order_id: "o-1".into(), amount_cents: 9_999 };
/// let envelope = EventEnvelope::from_event(&placed)?;
/// assert_eq!(envelope.event_type(), "order.placed");
/// assert_eq!(envelope.schema_version(), 2);
/// assert_eq!(envelope.to_event::<OrderPlaced>()?, placed);
/// # Ok::<(), orchestrator_core::Error>(())
/// ```
pub trait Event: Serialize + DeserializeOwned {
    /// The event type, dot-separated (`"order.placed"`), as routed by topic patterns.
    const EVENT_TYPE: &'static str;
    /// The version of this type's schema; bump it when the shape changes.
    const SCHEMA_VERSION: u32 = 1;
}

/// W3C trace context carried with an event so that a trace crosses every broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The `traceparent` header value (`00-<trace id>-<span id>-<flags>`).
    pub traceparent: String,
    /// The `tracestate` header value, if any.
    pub tracestate: Option<String>,
}

/// An event's id: a UUIDv7 for events made here; any non-empty string for events that
/// arrive from other CloudEvents producers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(Arc<str>);

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        Self::parse(id).map_err(serde::de::Error::custom)
    }
}

impl EventId {
    /// An id from a string known to be non-empty.
    pub(crate) fn from_checked(id: &str) -> Self {
        Self(Arc::from(id))
    }

    /// A fresh UUIDv7 id (ids made later sort after ids made earlier).
    pub fn new() -> Self {
        Self(Uuid::now_v7().to_string().into())
    }

    /// An id from a string; empty strings are an [`Error::InvalidInput`].
    pub fn parse(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() {
            return Err(Error::invalid("event id", "must not be empty"));
        }
        Ok(Self(id.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a UUID, when it is one.
    pub fn as_uuid(&self) -> Option<Uuid> {
        Uuid::parse_str(&self.0).ok()
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for EventId {
    fn from(id: Uuid) -> Self {
        Self(id.to_string().into())
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for EventId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

/// Where a stored event sits: its stream, its version in the stream and its global position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoredPosition {
    /// The event's version within its stream; the first event of a stream has version 1.
    pub stream_version: u64,
    /// The event's position in the store's global order; the first event has position 1,
    /// and positions strictly increase (they may have gaps on some backends).
    pub global_position: u64,
}

/// An event with its metadata: what travels over every transport and sits in every store.
///
/// Build one with [`EventEnvelope::new`] (any serde payload, encoded as JSON),
/// [`EventEnvelope::from_event`] (a typed [`Event`]) or [`EventEnvelope::from_bytes`]; read it
/// with [`id`](Self::id), [`event_type`](Self::event_type) and [`data`](Self::data).
///
/// ```
/// use orchestrator_core::EventEnvelope;
/// use serde_json::json;
///
/// let event = EventEnvelope::new("user.created", &json!({"user_id": "123"}))?
///     .with_source("urn:users-service")
///     .with_correlation_id("req-42");
/// assert_eq!(event.event_type(), "user.created");
/// let payload: serde_json::Value = event.data()?;
/// assert_eq!(payload["user_id"], "123");
/// # Ok::<(), orchestrator_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EventEnvelope {
    // Shared: a clone (one per subscriber, per retry, per store read) costs a reference
    // count, and moving an envelope moves one pointer. `with_*` copies on write.
    pub(crate) inner: Arc<Fields>,
}

/// The envelope's contents, shared between clones until one of them is changed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fields {
    pub(crate) id: EventId,
    pub(crate) event_type: Arc<str>,
    pub(crate) schema_version: u32,
    pub(crate) source: Arc<str>,
    pub(crate) time: DateTime<Utc>,
    pub(crate) subject: Option<String>,
    pub(crate) data_schema: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) trace: Option<TraceContext>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) content_type: Arc<str>,
    pub(crate) data: Bytes,
    /// `data` is known to be valid JSON: written by serde_json, or parsed as JSON by a
    /// decoder. Encoding to CloudEvents then writes it without parsing it again.
    pub(crate) data_is_json: KnownJson,
    pub(crate) stream_id: Option<String>,
    pub(crate) position: Option<StoredPosition>,
}

/// Whether an envelope's payload is known to be valid JSON. Not part of the event: two
/// envelopes that differ only in it are equal.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KnownJson(pub(crate) bool);

impl PartialEq for KnownJson {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl EventEnvelope {
    /// A new event of `event_type` whose payload is `data` encoded as JSON.
    ///
    /// The id is a fresh UUIDv7, the time is now, the schema version 1.
    pub fn new(event_type: impl Into<String>, data: &impl Serialize) -> Result<Self> {
        let bytes = serde_json::to_vec(data)
            .map_err(|e| Error::encode(format!("payload is not serializable as JSON: {e}")))?;
        let mut event = Self::from_bytes(event_type, CONTENT_TYPE_JSON, bytes)?;
        event.fields_mut().data_is_json = KnownJson(true);
        Ok(event)
    }

    /// A new event of `event_type` carrying raw `data` of the given content type.
    pub fn from_bytes(
        event_type: impl Into<String>,
        content_type: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Result<Self> {
        let event_type = event_type.into();
        validate_event_type(&event_type)?;
        let content_type = content_type.into();
        if content_type.trim().is_empty() {
            return Err(Error::invalid(
                "content type",
                "must not be empty; use \"application/json\" for JSON payloads",
            ));
        }
        Ok(Self::from_fields(Fields {
            id: EventId::new(),
            event_type: intern_event_type(&event_type),
            schema_version: 1,
            source: shared_str(DEFAULT_SOURCE),
            time: Utc::now(),
            subject: None,
            data_schema: None,
            correlation_id: None,
            causation_id: None,
            trace: None,
            headers: BTreeMap::new(),
            content_type: shared_str(&content_type),
            data: data.into(),
            data_is_json: KnownJson(false),
            stream_id: None,
            position: None,
        }))
    }

    pub(crate) fn from_fields(fields: Fields) -> Self {
        Self {
            inner: Arc::new(fields),
        }
    }

    pub(crate) fn fields_mut(&mut self) -> &mut Fields {
        Arc::make_mut(&mut self.inner)
    }

    /// An envelope for a typed event, with its type name and schema version.
    pub fn from_event<E: Event>(event: &E) -> Result<Self> {
        Ok(Self::new(E::EVENT_TYPE, event)?.with_schema_version(E::SCHEMA_VERSION))
    }

    /// Decodes this envelope into the typed event `E`, checking that the type names match.
    pub fn to_event<E: Event>(&self) -> Result<E> {
        if &*self.inner.event_type != E::EVENT_TYPE {
            return Err(Error::decode(
                "type",
                format!(
                    "event is of type `{}`, not `{}`",
                    self.inner.event_type,
                    E::EVENT_TYPE
                ),
            ));
        }
        self.data()
    }

    /// The event's unique id (a UUIDv7 for events made here, so ids sort by creation time).
    pub fn id(&self) -> &EventId {
        &self.inner.id
    }

    /// The event type, e.g. `"order.placed"`.
    pub fn event_type(&self) -> &str {
        &self.inner.event_type
    }

    /// The event type as a shared string (cloning it does not allocate).
    pub fn event_type_shared(&self) -> Arc<str> {
        Arc::clone(&self.inner.event_type)
    }

    /// The version of the payload's schema.
    pub fn schema_version(&self) -> u32 {
        self.inner.schema_version
    }

    /// Who produced the event (a URI reference).
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// When the event happened.
    pub fn time(&self) -> DateTime<Utc> {
        self.inner.time
    }

    /// The CloudEvents `subject`, if any.
    pub fn subject(&self) -> Option<&str> {
        self.inner.subject.as_deref()
    }

    /// The CloudEvents `dataschema`, if any.
    pub fn data_schema(&self) -> Option<&str> {
        self.inner.data_schema.as_deref()
    }

    /// The id shared by every event of one business transaction.
    pub fn correlation_id(&self) -> Option<&str> {
        self.inner.correlation_id.as_deref()
    }

    /// The id of the event or command that caused this one.
    pub fn causation_id(&self) -> Option<&str> {
        self.inner.causation_id.as_deref()
    }

    /// The W3C trace context, if the event was published inside a trace.
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.inner.trace.as_ref()
    }

    /// Free headers (CloudEvents extensions on the wire).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.inner.headers
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner.headers.get(name).map(String::as_str)
    }

    /// The payload's content type.
    pub fn content_type(&self) -> &str {
        &self.inner.content_type
    }

    /// Whether the payload is JSON (`application/json` or any `+json` type).
    pub fn is_json(&self) -> bool {
        is_json_content_type(&self.inner.content_type)
    }

    /// The raw payload bytes.
    pub fn data_bytes(&self) -> &Bytes {
        &self.inner.data
    }

    /// Decodes the payload into any serde type, `serde_json::Value` included.
    ///
    /// JSON payloads are decoded with serde_json, bincode payloads with the bincode codec;
    /// other content types are an [`Error::Decode`].
    pub fn data<T: DeserializeOwned>(&self) -> Result<T> {
        if self.is_json() {
            serde_json::from_slice(&self.inner.data)
                .map_err(|e| Error::decode("data", format!("payload does not fit the type: {e}")))
        } else if &*self.inner.content_type == CONTENT_TYPE_BINCODE {
            crate::codec::Bincode::decode_payload(&self.inner.data)
        } else {
            Err(Error::decode(
                "datacontenttype",
                format!(
                    "cannot decode a `{}` payload into a typed value; read data_bytes() instead",
                    self.inner.content_type
                ),
            ))
        }
    }

    /// The stream this event belongs to (set before appending, or by the store).
    pub fn stream_id(&self) -> Option<&str> {
        self.inner.stream_id.as_deref()
    }

    /// For stored events, the stream version and global position.
    pub fn position(&self) -> Option<StoredPosition> {
        self.inner.position
    }

    /// For stored events, the version within the stream.
    pub fn stream_version(&self) -> Option<u64> {
        self.inner.position.map(|p| p.stream_version)
    }

    /// For stored events, the global position.
    pub fn global_position(&self) -> Option<u64> {
        self.inner.position.map(|p| p.global_position)
    }

    /// The key that orders delivery: events with the same key are delivered in order.
    /// It is the stream id, or the event id when there is none.
    pub fn partition_key(&self) -> String {
        match &self.inner.stream_id {
            Some(s) => s.clone(),
            None => self.inner.id.to_string(),
        }
    }

    /// Sets the id (for tests and for re-creating an event read from elsewhere).
    pub fn with_id(mut self, id: impl Into<EventId>) -> Self {
        self.fields_mut().id = id.into();
        self
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.fields_mut().schema_version = version;
        self
    }

    /// Sets the source.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.fields_mut().source = source.into().into();
        self
    }

    /// Sets the time.
    pub fn with_time(mut self, time: DateTime<Utc>) -> Self {
        self.fields_mut().time = time;
        self
    }

    /// Sets the CloudEvents `subject`.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.fields_mut().subject = Some(subject.into());
        self
    }

    /// Sets the CloudEvents `dataschema`.
    pub fn with_data_schema(mut self, schema: impl Into<String>) -> Self {
        self.fields_mut().data_schema = Some(schema.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.fields_mut().correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.fields_mut().causation_id = Some(id.into());
        self
    }

    /// Marks this event as caused by `cause`: copies its correlation id (or its id when it has
    /// none) and sets the causation id to its id.
    pub fn caused_by(mut self, cause: &EventEnvelope) -> Self {
        self.fields_mut().correlation_id = Some(
            cause
                .inner
                .correlation_id
                .clone()
                .unwrap_or_else(|| cause.inner.id.to_string()),
        );
        self.fields_mut().causation_id = Some(cause.inner.id.to_string());
        self
    }

    /// Sets the W3C trace context.
    pub fn with_trace_context(mut self, trace: TraceContext) -> Self {
        self.fields_mut().trace = Some(trace);
        self
    }

    /// Removes the trace context.
    pub fn without_trace_context(mut self) -> Self {
        self.fields_mut().trace = None;
        self
    }

    /// Adds a header. Header names travel as CloudEvents extension attributes, so they must
    /// be lowercase ASCII letters and digits and must not be one of the reserved attribute
    /// names; anything else is an [`Error::InvalidInput`]. So is a header over the limits
    /// every consumer's decoder enforces: more than
    /// [`MAX_EXTENSIONS`](crate::cloudevents::MAX_EXTENSIONS) headers, a name longer than
    /// [`MAX_EXTENSION_NAME_LEN`](crate::cloudevents::MAX_EXTENSION_NAME_LEN) or a value
    /// longer than [`MAX_EXTENSION_VALUE_LEN`](crate::cloudevents::MAX_EXTENSION_VALUE_LEN)
    /// bytes.
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self> {
        let (name, value) = (name.into(), value.into());
        validate_header_name(&name)?;
        if value.len() > cloudevents::MAX_EXTENSION_VALUE_LEN {
            return Err(Error::invalid(
                "header value",
                format!(
                    "header `{name}`: {}",
                    cloudevents::value_too_long(value.len())
                ),
            ));
        }
        let headers = &self.inner.headers;
        if headers.len() >= cloudevents::MAX_EXTENSIONS && !headers.contains_key(&name) {
            return Err(Error::invalid(
                "header",
                format!(
                    "`{name}` would be one header too many: {}",
                    cloudevents::too_many_extensions(headers.len() + 1)
                ),
            ));
        }
        self.fields_mut().headers.insert(name, value);
        Ok(self)
    }

    /// Sets the stream this event belongs to (its partition key in transports).
    pub fn with_stream_id(mut self, stream_id: impl Into<String>) -> Self {
        self.fields_mut().stream_id = Some(stream_id.into());
        self
    }

    /// Records where a store put this event. Stores call this; users rarely need to.
    pub fn with_position(mut self, stream_id: impl Into<String>, position: StoredPosition) -> Self {
        self.fields_mut().stream_id = Some(stream_id.into());
        self.fields_mut().position = Some(position);
        self
    }

    /// Clears the stored position (for re-appending an event read from elsewhere).
    pub fn without_position(mut self) -> Self {
        self.fields_mut().position = None;
        self
    }

    /// Replaces the event type (for upcasters and transforms).
    pub fn with_event_type(mut self, event_type: impl Into<String>) -> Result<Self> {
        let event_type = event_type.into();
        validate_event_type(&event_type)?;
        self.fields_mut().event_type = intern_event_type(&event_type);
        Ok(self)
    }

    /// Replaces the payload with `data` encoded as JSON (for upcasters and transforms).
    pub fn with_data(mut self, data: &impl Serialize) -> Result<Self> {
        self.fields_mut().data = serde_json::to_vec(data)
            .map_err(|e| Error::encode(format!("payload is not serializable as JSON: {e}")))?
            .into();
        self.fields_mut().content_type = shared_str(CONTENT_TYPE_JSON);
        self.fields_mut().data_is_json = KnownJson(true);
        Ok(self)
    }

    /// Replaces the payload with raw bytes of the given content type.
    pub fn with_data_bytes(
        mut self,
        content_type: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Self {
        self.fields_mut().content_type = content_type.into().into();
        self.fields_mut().data = data.into();
        self.fields_mut().data_is_json = KnownJson(false);
        self
    }
}

/// The attribute names CloudEvents and orchestrator reserve; headers may not use them.
pub(crate) const RESERVED_ATTRIBUTES: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "dataschema",
    "datacontenttype",
    "data",
    "data_base64",
    "schemaversion",
    "correlationid",
    "causationid",
    "traceparent",
    "tracestate",
    "streamid",
    "streamversion",
    "globalposition",
];

/// A shared string for `s`, reusing one allocation for the values nearly every event
/// carries (the JSON content type, the default source).
pub(crate) fn shared_str(s: &str) -> Arc<str> {
    static JSON: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from(CONTENT_TYPE_JSON));
    static SOURCE: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from(DEFAULT_SOURCE));
    match s {
        CONTENT_TYPE_JSON => Arc::clone(&JSON),
        DEFAULT_SOURCE => Arc::clone(&SOURCE),
        other => Arc::from(other),
    }
}

/// The shared string of an event type: every envelope of one type points at the same
/// allocation (up to [`MAX_INTERNED_TYPES`] distinct types; later ones get their own).
///
/// Besides the memory, this lets layers that look an event's type up on every delivery
/// (routing, metric handles) recognise it by address before comparing bytes. Decoders
/// and constructors call it; it is public for transports that build envelopes or topics
/// themselves.
pub fn intern_event_type(event_type: &str) -> Arc<str> {
    use std::collections::HashSet;
    use std::sync::{PoisonError, RwLock};
    static TYPES: std::sync::LazyLock<RwLock<HashSet<Arc<str>>>> =
        std::sync::LazyLock::new(RwLock::default);
    // Inserts only; a poisoned lock still holds a consistent set.
    if let Some(known) = TYPES
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(event_type)
    {
        return Arc::clone(known);
    }
    let mut types = TYPES.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = types.get(event_type) {
        return Arc::clone(known);
    }
    let shared: Arc<str> = Arc::from(event_type);
    if types.len() < MAX_INTERNED_TYPES {
        types.insert(Arc::clone(&shared));
    }
    shared
}

/// The shared string of a valid event type, or why it is not valid: what decoders call for
/// every event they read. The last valid type is remembered per thread, so a run of events
/// of one type (a replay page, a batch from a broker) costs a comparison each, not a
/// validation and a look-up in the shared set (whose lock and counters the threads would
/// otherwise contend for).
pub(crate) fn checked_event_type(event_type: &str) -> Result<Arc<str>> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(known) = last.as_ref()
            && **known == *event_type
        {
            return Ok(Arc::clone(known));
        }
        validate_event_type(event_type)?;
        let shared = intern_event_type(event_type);
        *last = Some(Arc::clone(&shared));
        Ok(shared)
    })
}

/// How many distinct event types [`intern_event_type`] keeps (against unbounded growth
/// when types come from outside).
pub const MAX_INTERNED_TYPES: usize = 4096;

/// Checks an event type: non-empty, no whitespace, dot-separated non-empty segments, and
/// none of the pattern characters `*` and `#`.
pub fn validate_event_type(event_type: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::invalid(
            "event type",
            format!("`{event_type}` {reason}"),
        ))
    };
    if event_type.is_empty() {
        return bad("is empty; name events like \"order.placed\"");
    }
    // The common case in one pass over the bytes (this runs for every published event):
    // printable ASCII without `*`, `#` or an empty segment is valid.
    let bytes = event_type.as_bytes();
    let mut segment_start = true;
    let mut plain = true;
    for &b in bytes {
        match b {
            b'.' if segment_start => {
                plain = false;
                break;
            }
            b'.' => segment_start = true,
            0x21..=0x7e if b != b'*' && b != b'#' => segment_start = false,
            _ => {
                plain = false;
                break;
            }
        }
    }
    if plain && !segment_start {
        return Ok(());
    }
    if event_type
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return bad("contains whitespace or control characters");
    }
    if event_type.contains(['*', '#']) {
        return bad("contains `*` or `#`, which are reserved for subscription patterns");
    }
    if event_type.split('.').any(str::is_empty) {
        return bad("has an empty segment; segments are separated by single dots");
    }
    Ok(())
}

/// Checks a CloudEvents extension attribute name: lowercase ASCII letters and digits only,
/// at most [`MAX_EXTENSION_NAME_LEN`](cloudevents::MAX_EXTENSION_NAME_LEN) bytes.
pub fn validate_extension_name(name: &str) -> Result<()> {
    if name.len() > cloudevents::MAX_EXTENSION_NAME_LEN {
        return Err(Error::invalid(
            "extension attribute name",
            format!(
                "`{}`: {}",
                cloudevents::shorten(name),
                cloudevents::name_too_long(name.len())
            ),
        ));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(Error::invalid(
            "extension attribute name",
            format!("`{name}`: CloudEvents allows only lowercase ASCII letters and digits"),
        ));
    }
    Ok(())
}

fn validate_header_name(name: &str) -> Result<()> {
    validate_extension_name(name)?;
    if RESERVED_ATTRIBUTES.contains(&name) {
        return Err(Error::invalid(
            "header name",
            format!("`{name}` is a reserved attribute; set it through its own method"),
        ));
    }
    Ok(())
}

/// Whether a content type is JSON (`application/json`, `text/json` or any `+json` type).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let ends_with = |suffix: &str| {
        essence.len() >= suffix.len()
            && essence.as_bytes()[essence.len() - suffix.len()..]
                .eq_ignore_ascii_case(suffix.as_bytes())
    };
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("text/json")
        || ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Placed {
        order: String,
    }
    impl Event for Placed {
        const EVENT_TYPE: &'static str = "order.placed";
    }

    #[test]
    fn rejects_bad_event_types() {
        for bad in [
            "",
            "order placed",
            "order.*",
            "order.#",
            "order..placed",
            ".x",
            "x.",
            ".",
            "order.\tplaced",
            "order.placed\u{7f}",
            "order.plac\u{2003}ed",
            "*",
            "#",
        ] {
            assert!(
                matches!(EventEnvelope::new(bad, &1), Err(Error::InvalidInput { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn envelopes_of_one_type_share_its_string() {
        let a = EventEnvelope::new("order.interned", &1).unwrap();
        let b = EventEnvelope::new("order.interned", &2).unwrap();
        let c = EventEnvelope::new("order.other", &3)
            .unwrap()
            .with_event_type("order.interned")
            .unwrap();
        let decoded = crate::cloudevents::decode(&crate::cloudevents::encode(&a).unwrap()).unwrap();
        for e in [&b, &c, &decoded] {
            assert!(Arc::ptr_eq(&a.event_type_shared(), &e.event_type_shared()));
        }
        assert!(!Arc::ptr_eq(
            &a.event_type_shared(),
            &EventEnvelope::new("order.different", &1)
                .unwrap()
                .event_type_shared()
        ));
    }

    #[test]
    fn accepts_good_event_types() {
        for good in [
            "order.placed",
            "a",
            "com.example.v1.Thing-Happened_2",
            "é.ü",
            "x.y.z",
        ] {
            assert!(validate_event_type(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn typed_round_trip_checks_the_type() {
        let env = EventEnvelope::from_event(&Placed { order: "o".into() }).unwrap();
        assert_eq!(env.to_event::<Placed>().unwrap().order, "o");
        let other = env.with_event_type("order.shipped").unwrap();
        let err = other.to_event::<Placed>().unwrap_err();
        assert_eq!(err.decode_field(), Some("type"));
    }

    #[test]
    fn header_names_are_checked() {
        let env = EventEnvelope::new("a.b", &1).unwrap();
        assert!(env.clone().with_header("tenant", "t1").is_ok());
        assert!(env.clone().with_header("Tenant", "t1").is_err());
        assert!(env.clone().with_header("x-tenant", "t1").is_err());
        assert!(env.with_header("traceparent", "t1").is_err());
    }

    #[test]
    fn caused_by_propagates_correlation() {
        let first = EventEnvelope::new("a.b", &1).unwrap();
        let second = EventEnvelope::new("a.c", &2).unwrap().caused_by(&first);
        let third = EventEnvelope::new("a.d", &3).unwrap().caused_by(&second);
        let root = first.id().to_string();
        assert_eq!(third.correlation_id(), Some(root.as_str()));
        assert_eq!(third.causation_id(), Some(second.id().to_string().as_str()));
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type(
            "application/cloudevents+json; charset=utf-8"
        ));
        assert!(!is_json_content_type("application/octet-stream"));
    }
}
