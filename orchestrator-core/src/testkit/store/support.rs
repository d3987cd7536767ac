//! What the cases share: random names, event builders, checked store calls and assertions.

use std::collections::HashSet;
use std::fmt::Debug;

use chrono::{TimeZone, Utc};
use futures::StreamExt;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::timeout;
use uuid::Uuid;

use crate::envelope::{EventEnvelope, TraceContext};
use crate::error::{Error, Result};
use crate::store::{AppendResult, EventFilter, EventStore, EventStream, ExpectedVersion, ReadAll};

use super::{QUIET_PERIOD, RECEIVE_TIMEOUT};

pub(super) use ExpectedVersion::{Any, Exact, NoStream, StreamExists};

/// A limit larger than any case's number of events.
pub(super) const NO_LIMIT: usize = 100_000;

/// Random names for one case, so cases never see each other's streams and event types.
pub(super) struct Names {
    tag: String,
}

impl Names {
    pub(super) fn new() -> Self {
        Self {
            tag: Uuid::now_v7().simple().to_string(),
        }
    }

    pub(super) fn prefix(&self) -> String {
        format!("conformance-{}-", self.tag)
    }

    pub(super) fn stream(&self, name: &str) -> String {
        format!("{}{name}", self.prefix())
    }

    pub(super) fn event_type(&self, name: &str) -> String {
        format!("conformance.t{}.{name}", self.tag)
    }

    /// Every event of this case's streams.
    pub(super) fn all_ours(&self) -> EventFilter {
        EventFilter::all().stream_prefix(self.prefix())
    }
}

pub(super) fn skip(case: &str, store: &impl EventStore, why: &str) {
    eprintln!(
        "event store conformance: `{}` / `{case}` skipped: {why}",
        store.name()
    );
}

pub(super) fn event(event_type: &str, n: impl serde::Serialize) -> EventEnvelope {
    EventEnvelope::new(event_type, &json!({ "n": n })).unwrap()
}

pub(super) fn tag(event: EventEnvelope, name: &str, value: u64) -> EventEnvelope {
    event.with_header(name, value.to_string()).unwrap()
}

pub(super) fn header_u64(event: &EventEnvelope, name: &str) -> u64 {
    event
        .header(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("event {} came back without its `{name}` header", event.id()))
}

/// An event with every optional attribute set.
pub(super) fn rich_event(names: &Names) -> EventEnvelope {
    let time = Utc.with_ymd_and_hms(2030, 6, 7, 8, 9, 10).unwrap()
        + chrono::Duration::nanoseconds(123_456_789);
    EventEnvelope::new(
        names.event_type("order.placed"),
        &json!({ "amount_cents": 9999, "items": ["a", "b"], "order_id": "o-1" }),
    )
    .unwrap()
    .with_time(time)
    .with_schema_version(3)
    .with_source("urn:conformance:orders")
    .with_subject("order-1")
    .with_data_schema("https://example.com/schemas/order-placed.json")
    .with_correlation_id("correlation-1")
    .with_causation_id("cause-1")
    .with_trace_context(TraceContext {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        tracestate: Some("vendor=value".to_owned()),
    })
    .with_header("tenant", "acme")
    .unwrap()
    .with_header("region", "eu1")
    .unwrap()
    // The store's stream id wins over one the caller set.
    .with_stream_id("some-other-stream")
}

pub(super) fn global(event: &EventEnvelope) -> u64 {
    event
        .global_position()
        .unwrap_or_else(|| panic!("stored event {} has no global position", event.id()))
}

/// Checks that `actual` is `original` as stored at `version` of `stream`, field by field.
pub(super) fn assert_stored(
    actual: &EventEnvelope,
    original: &EventEnvelope,
    stream: &str,
    version: u64,
    what: &str,
) {
    let id = original.id();
    macro_rules! same {
        ($($field:ident),+) => {$(
            assert_eq!(
                actual.$field(),
                original.$field(),
                "{what}: event {id} came back with a different `{}`",
                stringify!($field)
            );
        )+};
    }
    same!(
        id,
        event_type,
        schema_version,
        source,
        time,
        subject,
        data_schema
    );
    same!(
        correlation_id,
        causation_id,
        trace_context,
        headers,
        content_type,
        data_bytes
    );
    assert_eq!(
        actual.stream_id(),
        Some(stream),
        "{what}: stream id of event {id}"
    );
    assert_eq!(
        actual.stream_version(),
        Some(version),
        "{what}: stream version of event {id}"
    );
    let position = actual
        .position()
        .unwrap_or_else(|| panic!("{what}: event {id} has no position"));
    assert_eq!(
        actual,
        &original.clone().with_position(stream, position),
        "{what}: event {id} differs from what was appended"
    );
}

/// Checks that two lists hold the same events (by id) in the same order, naming the first
/// difference.
pub(super) fn assert_same_ids(actual: &[EventEnvelope], expected: &[EventEnvelope], what: &str) {
    let describe = |e: Option<&EventEnvelope>| match e {
        Some(e) => format!("{} at position {:?}", e.id(), e.global_position()),
        None => "nothing".to_owned(),
    };
    let first_difference = (0..actual.len().max(expected.len()))
        .find(|&i| actual.get(i).map(EventEnvelope::id) != expected.get(i).map(EventEnvelope::id));
    if let Some(i) = first_difference {
        panic!(
            "{what}: got {} events, expected {}; event #{i} is {}, expected {}",
            actual.len(),
            expected.len(),
            describe(actual.get(i)),
            describe(expected.get(i))
        );
    }
}

/// Checks that two reads returned the same stored events, equal in every field, in the same
/// order.
pub(super) fn assert_same_events(actual: &[EventEnvelope], expected: &[EventEnvelope], what: &str) {
    assert_same_ids(actual, expected, what);
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!(
            a,
            e,
            "{what}: event {} differs between the two reads",
            e.id()
        );
    }
}

pub(super) fn assert_wrong_version(
    result: Result<AppendResult>,
    stream: &str,
    expected: ExpectedVersion,
    actual: Option<u64>,
) {
    let what = format!("append to `{stream}` expecting {expected} while it is at {actual:?}");
    match result {
        Err(Error::WrongExpectedVersion {
            stream: s,
            expected: e,
            actual: a,
        }) => assert_eq!(
            (s.as_str(), e, a),
            (stream, expected, actual),
            "{what}: Error::WrongExpectedVersion {{ stream, expected, actual }} is wrong"
        ),
        Ok(result) => {
            panic!("{what} succeeded ({result:?}); it must fail with Error::WrongExpectedVersion")
        }
        Err(other) => panic!("{what} failed with `{other}`; expected Error::WrongExpectedVersion"),
    }
}

pub(super) fn assert_unsupported<T: Debug>(result: Result<T>, what: &str) {
    match result {
        Err(Error::Unsupported { .. }) => {}
        other => {
            panic!("{what}: expected Error::Unsupported (see the capabilities), got {other:?}")
        }
    }
}

pub(super) fn assert_invalid<T: Debug>(result: Result<T>, what: &str) {
    match result {
        Err(Error::InvalidInput { .. }) => {}
        other => panic!("{what}: expected Error::InvalidInput, got {other:?}"),
    }
}

/// Waits for every task, re-raising the first panic. Dropping the set (when a case fails)
/// aborts the tasks still running, so they cannot disturb the next case.
pub(super) async fn join_all<T: 'static>(mut tasks: JoinSet<T>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(value) => results.push(value),
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("a task of the case failed: {e}"),
            },
        }
    }
    results
}

pub(super) async fn append<S: EventStore>(
    store: &S,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<EventEnvelope>,
) -> AppendResult {
    let count = events.len();
    store
        .append(stream, expected, events)
        .await
        .unwrap_or_else(|e| {
            panic!("append of {count} event(s) to `{stream}` expecting {expected} failed: {e}")
        })
}

pub(super) async fn head<S: EventStore>(store: &S) -> u64 {
    store
        .head_position()
        .await
        .unwrap_or_else(|e| panic!("head_position failed: {e}"))
}

pub(super) async fn stream_version<S: EventStore>(store: &S, stream: &str) -> Option<u64> {
    store
        .stream_version(stream)
        .await
        .unwrap_or_else(|e| panic!("stream_version(`{stream}`) failed: {e}"))
}

/// `read_stream`, checking what every read must satisfy: the stream's events only, at
/// consecutive versions from `from`, at most `limit`, in position order.
pub(super) async fn read_stream<S: EventStore>(
    store: &S,
    stream: &str,
    from: u64,
    limit: usize,
) -> Vec<EventEnvelope> {
    let what = format!("read_stream(`{stream}`, from {from}, limit {limit})");
    let events = store
        .read_stream(stream, from, limit)
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"));
    assert!(
        events.len() <= limit,
        "{what} returned {} events",
        events.len()
    );
    let mut previous = 0;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e.stream_id(),
            Some(stream),
            "{what}: stream id of event {}",
            e.id()
        );
        assert_eq!(
            e.stream_version(),
            Some(from.max(1) + i as u64),
            "{what}: version of event #{i}"
        );
        assert!(
            global(e) > previous,
            "{what}: positions must strictly increase"
        );
        previous = global(e);
    }
    events
}

/// `read_all`, checking what every read must satisfy: at most `limit` events, each matching
/// the filter, at or after `from_position`, in strictly increasing position order.
pub(super) async fn read_all<S: EventStore>(store: &S, query: ReadAll) -> Vec<EventEnvelope> {
    let what = format!("read_all({query:?})");
    let events = store
        .read_all(query.clone())
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"));
    assert!(
        events.len() <= query.limit,
        "{what} returned {} events",
        events.len()
    );
    let mut previous = query.from_position.saturating_sub(1);
    for e in &events {
        assert!(
            query.filter.matches(e),
            "{what} returned event {} that does not match the filter",
            e.id()
        );
        assert!(
            e.stream_id().is_some(),
            "{what}: event {} has no stream id",
            e.id()
        );
        assert!(
            global(e) > previous,
            "{what}: position {} after {previous}",
            global(e)
        );
        previous = global(e);
    }
    events
}

/// Every event of `stream`, through `read_stream` or, without that capability, `read_all`.
pub(super) async fn read_back<S: EventStore>(store: &S, stream: &str) -> Vec<EventEnvelope> {
    if store.capabilities().read_stream {
        return read_stream(store, stream, 1, NO_LIMIT).await;
    }
    let filter = EventFilter::all().stream_prefix(stream);
    let mut events = read_all(store, ReadAll::from(0, NO_LIMIT).filter(filter)).await;
    events.retain(|e| e.stream_id() == Some(stream));
    events
}

pub(super) async fn subscribe<S: EventStore>(
    store: &S,
    from: u64,
    filter: EventFilter,
) -> EventStream {
    store
        .subscribe(from, filter.clone())
        .await
        .unwrap_or_else(|e| panic!("subscribe(from {from}, {filter:?}) failed: {e}"))
}

/// Up to `count` events from a subscription, checking each matches nothing twice and comes
/// in strictly increasing position order. Returns early if the subscription goes quiet for
/// [`RECEIVE_TIMEOUT`], so the caller's comparison names the missing event.
pub(super) async fn receive(sub: &mut EventStream, count: usize, what: &str) -> Vec<EventEnvelope> {
    let mut events: Vec<EventEnvelope> = Vec::with_capacity(count);
    let mut seen = HashSet::new();
    while events.len() < count {
        match timeout(RECEIVE_TIMEOUT, sub.next()).await {
            Ok(Some(Ok(e))) => {
                let previous = events.last().map_or(0, global);
                assert!(
                    global(&e) > previous,
                    "{what}: event {} at position {} delivered after position {previous} \
                     (a duplicate or out of order)",
                    e.id(),
                    global(&e)
                );
                assert!(
                    seen.insert(e.id().clone()),
                    "{what}: event {} delivered twice",
                    e.id()
                );
                events.push(e);
            }
            Ok(Some(Err(e))) => panic!("{what}: the subscription yielded an error: {e}"),
            Ok(None) => panic!("{what}: the subscription ended while the store is open"),
            Err(_) => {
                eprintln!(
                    "{what}: no event within {RECEIVE_TIMEOUT:?} after {} of {count}",
                    events.len()
                );
                break;
            }
        }
    }
    events
}

/// Checks that a subscription delivers nothing more for [`QUIET_PERIOD`].
pub(super) async fn assert_quiet(sub: &mut EventStream, what: &str) {
    match timeout(QUIET_PERIOD, sub.next()).await {
        Err(_) => {}
        Ok(Some(Ok(e))) => panic!(
            "{what}: unexpected event {} of type `{}` at position {:?}",
            e.id(),
            e.event_type(),
            e.global_position()
        ),
        Ok(Some(Err(e))) => panic!("{what}: the subscription yielded an error: {e}"),
        Ok(None) => panic!("{what}: the subscription ended while the store is open"),
    }
}
