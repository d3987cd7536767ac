//! The GraphQL output types: events, streams, sagas, dead letters, traces, the relay.

use async_graphql::{Enum, Json, Object, SimpleObject};
use chrono::{DateTime, Utc};
use orchestrator::core::{DeadLetter, EventEnvelope};
use orchestrator::saga::SagaSnapshot;
use serde_json::Value;

use super::error::{ApiError, ApiResult};

/// A stored event.
pub(crate) struct Event(pub(crate) EventEnvelope);

/// A stored event: its CloudEvents attributes, orchestrator extensions and place in the store.
#[Object]
impl Event {
    /// The event's id (a UUIDv7 for events made by orchestrator).
    async fn id(&self) -> &str {
        self.0.id().as_str()
    }

    /// The event type (`order.placed`).
    #[graphql(name = "type")]
    async fn event_type(&self) -> &str {
        self.0.event_type()
    }

    /// The version of the event type's schema the payload follows.
    async fn schema_version(&self) -> u32 {
        self.0.schema_version()
    }

    /// Where the event came from (CloudEvents `source`).
    async fn source(&self) -> &str {
        self.0.source()
    }

    /// When the event happened.
    async fn time(&self) -> DateTime<Utc> {
        self.0.time()
    }

    /// CloudEvents `subject`, if any.
    async fn subject(&self) -> Option<&str> {
        self.0.subject()
    }

    /// The id shared by every event of one request or workflow.
    async fn correlation_id(&self) -> Option<&str> {
        self.0.correlation_id()
    }

    /// The id of the event (or command) that caused this one.
    async fn causation_id(&self) -> Option<&str> {
        self.0.causation_id()
    }

    /// The W3C `traceparent` the event was published under.
    async fn traceparent(&self) -> Option<&str> {
        self.0.trace_context().map(|t| t.traceparent.as_str())
    }

    /// The stream the event is stored in.
    async fn stream_id(&self) -> Option<&str> {
        self.0.stream_id()
    }

    /// The event's version within its stream (1 for the first).
    async fn stream_version(&self) -> Option<u64> {
        self.0.stream_version()
    }

    /// The event's position in the store's global order; use it as a cursor.
    async fn global_position(&self) -> Option<u64> {
        self.0.global_position()
    }

    /// The payload's media type (`application/json`).
    async fn content_type(&self) -> &str {
        self.0.content_type()
    }

    /// Free-form headers.
    async fn headers(&self) -> Json<&std::collections::BTreeMap<String, String>> {
        Json(self.0.headers())
    }

    /// The payload, when it is JSON; `null` for a binary payload (see `cloudEvent`'s
    /// `data_base64`).
    async fn data(&self) -> Option<Json<Value>> {
        if !self.0.is_json() {
            return None;
        }
        self.0.data::<Value>().ok().map(Json)
    }

    /// The event as a CloudEvents 1.0 JSON object (structured mode), as brokers carry it.
    async fn cloud_event(&self) -> ApiResult<Json<Value>> {
        let bytes = orchestrator::core::cloudevents::encode(&self.0).map_err(ApiError::backend)?;
        let value = serde_json::from_slice(&bytes).map_err(ApiError::backend)?;
        Ok(Json(value))
    }
}

/// Where a page ends, and whether more follows.
#[derive(SimpleObject)]
pub(crate) struct PageInfo {
    /// Pass it as `after` to read on. It is the position of the last event looked at (not
    /// necessarily returned): `null` only when nothing was looked at and no `after` was
    /// given.
    pub(crate) end_cursor: Option<String>,
    /// Whether events past `endCursor` may match (they may also be appended later: poll
    /// from `endCursor`).
    pub(crate) has_next_page: bool,
}

/// A page of events, in global order.
#[derive(SimpleObject)]
pub(crate) struct EventPage {
    /// The events of this page.
    pub(crate) events: Vec<Event>,
    /// Where it ends.
    pub(crate) page_info: PageInfo,
}

/// A stream: its version and what it holds.
#[derive(SimpleObject)]
pub(crate) struct StreamSummary {
    /// The stream id.
    pub(crate) id: String,
    /// How many events it holds.
    pub(crate) events: u64,
    /// Its version (the version of its last event).
    pub(crate) version: u64,
    /// The event types it holds, sorted.
    pub(crate) event_types: Vec<String>,
    /// When its first event happened.
    pub(crate) first_event_at: DateTime<Utc>,
    /// When its last event happened.
    pub(crate) last_event_at: DateTime<Utc>,
}

/// A page of streams, by id.
#[derive(SimpleObject)]
pub(crate) struct StreamPage {
    /// The streams of this page.
    pub(crate) streams: Vec<StreamSummary>,
    /// Where it ends: the last stream id returned.
    pub(crate) page_info: PageInfo,
}

/// One stream's events.
#[derive(SimpleObject)]
pub(crate) struct StreamEvents {
    /// The stream id.
    pub(crate) id: String,
    /// Its current version; `null` when it has no events.
    pub(crate) version: Option<u64>,
    /// Its events from the version asked for.
    pub(crate) events: Vec<Event>,
}

/// How a saga stands.
#[derive(Enum, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SagaState {
    /// Running its steps.
    Running,
    /// Undoing completed steps after a failure.
    Compensating,
    /// Every step completed.
    Completed,
    /// A step failed and every completed step was compensated.
    Compensated,
    /// A step failed and a compensation failed too: needs a person.
    CompensationFailed,
    /// Logged as started, not finished (stopped by a crash, or still running elsewhere).
    Unfinished,
    /// A status this server version does not know.
    Other,
}

impl SagaState {
    pub(crate) fn of(status: &str) -> Self {
        match status {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "compensated" => Self::Compensated,
            "compensation_failed" => Self::CompensationFailed,
            _ => Self::Other,
        }
    }
}

/// A saga as the store's log has it.
#[derive(SimpleObject)]
pub(crate) struct SagaSummary {
    /// The instance id.
    pub(crate) id: String,
    /// The saga's name.
    pub(crate) saga: String,
    /// How it ended, or `UNFINISHED`.
    pub(crate) status: SagaState,
    /// The raw status name (`completed`, …), for statuses this server does not know.
    pub(crate) status_name: String,
    /// When it started.
    pub(crate) started_at: DateTime<Utc>,
}

/// A step that failed for good.
#[derive(SimpleObject)]
pub(crate) struct StepFailureInfo {
    /// The step.
    pub(crate) step: String,
    /// How many attempts it made.
    pub(crate) attempts: u32,
    /// The last error.
    pub(crate) error: String,
    /// Whether the last attempt timed out.
    pub(crate) timed_out: bool,
}

/// One record of a saga's log, with its timing.
#[derive(SimpleObject)]
pub(crate) struct SagaLogEntry {
    /// The record's event type (`saga.step_completed`, …).
    #[graphql(name = "type")]
    pub(crate) record_type: String,
    /// The step, branch or wait it is about, if any.
    pub(crate) step: Option<String>,
    /// When it was written.
    pub(crate) time: DateTime<Utc>,
    /// Milliseconds since the saga's first record.
    pub(crate) offset_ms: f64,
    /// Milliseconds since the previous record.
    pub(crate) since_previous_ms: f64,
}

/// One saga: status, steps, failure, compensations, context and its log with timings.
#[derive(SimpleObject)]
pub(crate) struct SagaDetail {
    /// The instance id.
    pub(crate) id: String,
    /// The saga's name.
    pub(crate) saga: String,
    /// Its status.
    pub(crate) status: SagaState,
    /// The raw status name.
    pub(crate) status_name: String,
    /// When it started.
    pub(crate) started_at: DateTime<Utc>,
    /// When it last changed.
    pub(crate) updated_at: DateTime<Utc>,
    /// The steps completed, in order.
    pub(crate) completed_steps: Vec<String>,
    /// The steps running now.
    pub(crate) running_steps: Vec<String>,
    /// The step that failed for good, if one did.
    pub(crate) failure: Option<StepFailureInfo>,
    /// The steps compensated, in the order they were.
    pub(crate) compensated_steps: Vec<String>,
    /// Compensations that failed.
    pub(crate) compensation_failures: Vec<StepFailureInfo>,
    /// The saga's context (its input merged with every step's output).
    pub(crate) context: Json<Value>,
    /// Its log, oldest first.
    pub(crate) log: Vec<SagaLogEntry>,
}

impl SagaDetail {
    pub(crate) fn new(snapshot: SagaSnapshot, log: &[EventEnvelope]) -> Self {
        let first = log.first();
        let mut previous = first;
        let log = log
            .iter()
            .map(|record| {
                let entry = SagaLogEntry {
                    record_type: record.event_type().to_owned(),
                    step: record_step(record),
                    time: record.time(),
                    offset_ms: first.map_or(0.0, |first| millis(first, record)),
                    since_previous_ms: previous.map_or(0.0, |previous| millis(previous, record)),
                };
                previous = Some(record);
                entry
            })
            .collect();
        let status_name = snapshot.status.as_str().to_owned();
        Self {
            id: snapshot.id.to_string(),
            saga: snapshot.saga,
            status: SagaState::of(&status_name),
            status_name,
            started_at: snapshot.started_at,
            updated_at: snapshot.updated_at,
            completed_steps: snapshot.completed_steps,
            running_steps: snapshot.running_steps,
            failure: snapshot.failure.map(|f| StepFailureInfo {
                step: f.step,
                attempts: f.attempts,
                error: f.error,
                timed_out: f.timed_out,
            }),
            compensated_steps: snapshot.compensated_steps,
            compensation_failures: snapshot
                .compensation_failures
                .into_iter()
                .map(|f| StepFailureInfo {
                    step: f.step,
                    attempts: f.attempts,
                    error: f.error,
                    timed_out: false,
                })
                .collect(),
            context: Json(snapshot.context),
            log,
        }
    }
}

/// One transition of a saga, as its log records it.
#[derive(SimpleObject)]
pub(crate) struct SagaUpdate {
    /// The saga instance.
    pub(crate) saga_id: String,
    /// The record's event type (`saga.started`, `saga.step.completed`, `saga.finished`, …).
    #[graphql(name = "type")]
    pub(crate) record_type: String,
    /// The saga's name, on `saga.started`.
    pub(crate) saga: Option<String>,
    /// The step, branch or wait the record is about, if any.
    pub(crate) step: Option<String>,
    /// How the saga ended, on `saga.finished`.
    pub(crate) status: Option<SagaState>,
    /// When it was logged.
    pub(crate) time: DateTime<Utc>,
    /// The record's global position (to resume from).
    pub(crate) global_position: Option<u64>,
}

impl SagaUpdate {
    pub(crate) fn new(record: &EventEnvelope) -> Self {
        let data: Value = record.data().unwrap_or(Value::Null);
        let text = |key: &str| data.get(key).and_then(Value::as_str).map(str::to_owned);
        Self {
            saga_id: record
                .stream_id()
                .and_then(|s| s.strip_prefix(orchestrator::saga::STREAM_PREFIX))
                .unwrap_or_default()
                .to_owned(),
            record_type: record.event_type().to_owned(),
            saga: text("saga"),
            step: record_step(record),
            status: text("status").map(|s| SagaState::of(&s)),
            time: record.time(),
            global_position: record.global_position(),
        }
    }
}

/// The step (or branch, or wait) a saga log record is about, if any.
fn record_step(record: &EventEnvelope) -> Option<String> {
    let data: Value = record.data().ok()?;
    data.get("step")
        .or_else(|| data.get("branch"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Milliseconds from `from` to `to`.
pub(crate) fn millis(from: &EventEnvelope, to: &EventEnvelope) -> f64 {
    (to.time() - from.time())
        .num_microseconds()
        .map_or(0.0, |us| us as f64 / 1000.0)
}

/// A delivery that failed for good, parked in the dead-letter queue.
pub(crate) struct DeadLetterInfo(pub(crate) DeadLetter);

/// A delivery that failed for good: the event, where it was going, why it failed.
#[Object(name = "DeadLetter")]
impl DeadLetterInfo {
    /// The dead letter's id (what `reprocessDeadLetter` and `discardDeadLetter` take).
    async fn id(&self) -> &str {
        &self.0.id
    }

    /// The topic it was delivered on.
    async fn topic(&self) -> &str {
        &self.0.topic
    }

    /// The subscription (consumer group) whose handler failed.
    async fn subscription(&self) -> &str {
        &self.0.subscription
    }

    /// Why it failed (the last error).
    async fn reason(&self) -> &str {
        &self.0.reason
    }

    /// How many attempts were made.
    async fn attempts(&self) -> u32 {
        self.0.attempts
    }

    /// When the first attempt failed.
    async fn first_failure_at(&self) -> DateTime<Utc> {
        self.0.first_failure_at
    }

    /// When the last attempt failed.
    async fn last_failure_at(&self) -> DateTime<Utc> {
        self.0.last_failure_at
    }

    /// The event.
    async fn event(&self) -> Event {
        Event(self.0.event.clone())
    }
}

/// An event of a trace, placed in its causation tree.
#[derive(SimpleObject)]
pub(crate) struct TraceNode {
    /// The event.
    pub(crate) event: Event,
    /// The id of the event of this trace that caused it; `null` for a root.
    pub(crate) parent_id: Option<String>,
    /// How deep in the tree it is (0 for a root).
    pub(crate) depth: u32,
    /// Milliseconds since the trace's first event.
    pub(crate) offset_ms: f64,
}

/// The causation tree of one correlation id: the events in depth-first order (each
/// followed by what it caused), and the sagas that ran under that id.
#[derive(SimpleObject)]
pub(crate) struct Trace {
    /// The id asked for.
    pub(crate) correlation_id: String,
    /// The events, depth first.
    pub(crate) nodes: Vec<TraceNode>,
    /// The ids of the sagas whose logs carry this correlation id.
    pub(crate) saga_ids: Vec<String>,
}

/// The versions of an event type's schema.
#[derive(SimpleObject)]
pub(crate) struct SchemaInfo {
    /// The event type.
    pub(crate) event_type: String,
    /// Its registered versions, oldest first.
    pub(crate) versions: Vec<u32>,
    /// Its latest version: events are upcast to it on every read.
    pub(crate) latest_version: u32,
}

/// A reader of the global log and its checkpoint.
#[derive(SimpleObject)]
pub(crate) struct ProjectionInfo {
    /// Its name (the relay's is the relay's name).
    pub(crate) name: String,
    /// The global position it has processed up to.
    pub(crate) checkpoint: u64,
    /// Events stored after its checkpoint (the store's head minus the checkpoint).
    pub(crate) lag: u64,
    /// When the checkpoint was written.
    pub(crate) checkpointed_at: DateTime<Utc>,
}

/// What the outbox relay is doing.
#[derive(SimpleObject)]
pub(crate) struct RelayInfo {
    /// `idle`, `standby`, `relaying`, `retrying` or `stopped`.
    pub(crate) state: String,
    /// Every event up to this position has been published by this process's relay.
    pub(crate) relayed_position: u64,
    /// The last checkpoint the relay wrote or loaded.
    pub(crate) checkpoint: u64,
    /// The store's head position.
    pub(crate) head_position: u64,
    /// Events stored but not yet published by this process's relay (head minus relayed).
    pub(crate) lag: u64,
    /// Events the relay dead-lettered because the transport refused them.
    pub(crate) dead_lettered: u64,
    /// Whether it runs under a lease (only one process relays).
    pub(crate) leased: bool,
}

/// The store and transport this server reads.
#[derive(SimpleObject)]
pub(crate) struct SystemInfo {
    /// The event store's implementation (`in-memory`, `file`, `redis`, …).
    pub(crate) store: String,
    /// Whether the store keeps events across restarts.
    pub(crate) durable: bool,
    /// The transport's implementation (`in-process`, `redis`, …).
    pub(crate) transport: String,
    /// The global position of the last stored event.
    pub(crate) head_position: u64,
    /// How many dead letters there are.
    pub(crate) dead_letters: u64,
    /// Whether this server refuses mutations.
    pub(crate) read_only: bool,
    /// The largest page a query may ask for.
    pub(crate) max_page_size: u64,
}

/// An event `publishEvent` stored.
#[derive(SimpleObject)]
pub(crate) struct PublishedEvent {
    /// Its id.
    pub(crate) id: String,
    /// Its event type.
    #[graphql(name = "type")]
    pub(crate) event_type: String,
    /// The stream it was appended to.
    pub(crate) stream: String,
}
