//! The saga log: one stream per saga instance, one event per transition, and the state
//! folded from it.
//!
//! | event type | written when |
//! |---|---|
//! | `saga.started` | the saga is accepted (carries the name and the input) |
//! | `saga.step.completed` | a step's or wait's attempt succeeded (carries its output) |
//! | `saga.step.retrying` | an attempt failed and another will follow |
//! | `saga.step.failed` | a step failed for good: the saga turns to compensation |
//! | `saga.branch.chosen` | a branch picked its arm |
//! | `saga.wait.started` | a wait began (carries the correlation id and deadline) |
//! | `saga.compensation.completed` | a compensation succeeded |
//! | `saga.compensation.retrying` | a compensation attempt failed and another will follow |
//! | `saga.compensation.failed` | a compensation failed for good |
//! | `saga.finished` | the saga ended (carries the final status) |
//!
//! The state of a saga is the fold of its log ([`Live::apply`]); the runner applies each
//! record right after the store accepted it, and recovery folds the stored records, so
//! both see the same state.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::id::SagaId;
use crate::status::{
    CompensationFailure, EventWait, SagaOutcome, SagaSnapshot, SagaStatus, StepFailure,
};

/// Every event type of the saga log.
pub const LOG_EVENT_TYPES: &[&str] = &[
    STARTED,
    "saga.step.completed",
    "saga.step.retrying",
    "saga.step.failed",
    "saga.branch.chosen",
    "saga.wait.started",
    "saga.compensation.completed",
    "saga.compensation.retrying",
    "saga.compensation.failed",
    FINISHED,
];

/// The event type of a saga's first record.
pub(crate) const STARTED: &str = "saga.started";
/// The event type of a saga's last record.
pub(crate) const FINISHED: &str = "saga.finished";

/// How many records one read of a saga log asks for.
const READ_BATCH: usize = 1024;

/// One transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Record {
    Started {
        saga: String,
        input: Map<String, Value>,
    },
    StepCompleted {
        step: String,
        attempt: u32,
        output: Map<String, Value>,
    },
    StepRetrying {
        step: String,
        attempt: u32,
        error: String,
        timed_out: bool,
    },
    StepFailed(StepFailure),
    BranchChosen {
        branch: String,
        arm: Option<usize>,
        label: Option<String>,
    },
    WaitStarted(EventWait),
    CompensationCompleted {
        step: String,
        attempt: u32,
    },
    CompensationRetrying {
        step: String,
        attempt: u32,
        error: String,
    },
    CompensationFailed(CompensationFailure),
    Finished {
        status: SagaStatus,
    },
}

impl Record {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Started { .. } => STARTED,
            Self::StepCompleted { .. } => "saga.step.completed",
            Self::StepRetrying { .. } => "saga.step.retrying",
            Self::StepFailed(_) => "saga.step.failed",
            Self::BranchChosen { .. } => "saga.branch.chosen",
            Self::WaitStarted(_) => "saga.wait.started",
            Self::CompensationCompleted { .. } => "saga.compensation.completed",
            Self::CompensationRetrying { .. } => "saga.compensation.retrying",
            Self::CompensationFailed(_) => "saga.compensation.failed",
            Self::Finished { .. } => FINISHED,
        }
    }

    fn to_envelope(&self, correlation: &str, time: DateTime<Utc>) -> Result<EventEnvelope> {
        Ok(EventEnvelope::new(self.event_type(), self)?
            .with_correlation_id(correlation)
            .with_time(time))
    }
}

/// A saga's state, folded from its log.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) saga: String,
    pub(crate) status: SagaStatus,
    pub(crate) context: Map<String, Value>,
    pub(crate) completed: Vec<String>,
    /// Steps, waits and compensations in progress (not logged: the runner marks them).
    pub(crate) running: Vec<String>,
    pub(crate) failure: Option<StepFailure>,
    pub(crate) compensated: Vec<String>,
    pub(crate) compensation_failures: Vec<CompensationFailure>,
    /// Failed attempts recorded per step.
    pub(crate) step_attempts: HashMap<String, u32>,
    /// Failed compensation attempts recorded per step.
    pub(crate) compensation_attempts: HashMap<String, u32>,
    /// The arm each branch chose (`None`: no arm matched).
    pub(crate) branches: HashMap<String, Option<usize>>,
    /// The waits that started.
    pub(crate) waits: HashMap<String, EventWait>,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
}

impl Live {
    pub(crate) fn new(saga: String, time: DateTime<Utc>) -> Self {
        Self {
            saga,
            status: SagaStatus::Running,
            context: Map::new(),
            completed: Vec::new(),
            running: Vec::new(),
            failure: None,
            compensated: Vec::new(),
            compensation_failures: Vec::new(),
            step_attempts: HashMap::new(),
            compensation_attempts: HashMap::new(),
            branches: HashMap::new(),
            waits: HashMap::new(),
            started_at: time,
            updated_at: time,
        }
    }

    /// Folds the stored log of saga `id`.
    pub(crate) fn replay(id: SagaId, events: &[EventEnvelope]) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptLog { id, reason };
        let mut records = events.iter().map(|event| {
            event
                .data::<Record>()
                .map(|r| (r, event.time()))
                .map_err(|e| corrupt(format!("record of type `{}`: {e}", event.event_type())))
        });
        let Some((Record::Started { saga, input }, time)) = records.next().transpose()? else {
            return Err(corrupt("the log does not begin with `saga.started`".into()));
        };
        let mut live = Self::new(saga.clone(), time);
        live.apply(Record::Started { saga, input }, time);
        for record in records {
            let (record, time) = record?;
            live.apply(record, time);
        }
        Ok(live)
    }

    pub(crate) fn apply(&mut self, record: Record, time: DateTime<Utc>) {
        self.updated_at = time;
        match record {
            Record::Started { saga, input } => {
                self.saga = saga;
                self.context = input;
                self.started_at = time;
            }
            Record::StepCompleted { step, output, .. } => {
                self.context.extend(output);
                self.completed.push(step);
            }
            Record::StepRetrying { step, attempt, .. } => {
                self.step_attempts.insert(step, attempt);
            }
            Record::StepFailed(failure) => {
                self.step_attempts
                    .insert(failure.step.clone(), failure.attempts);
                self.failure.get_or_insert(failure);
                if self.status == SagaStatus::Running {
                    self.status = SagaStatus::Compensating;
                }
            }
            Record::BranchChosen { branch, arm, .. } => {
                self.branches.insert(branch, arm);
            }
            Record::WaitStarted(wait) => {
                self.waits.insert(wait.step.clone(), wait);
            }
            Record::CompensationCompleted { step, .. } => self.compensated.push(step),
            Record::CompensationRetrying { step, attempt, .. } => {
                self.compensation_attempts.insert(step, attempt);
            }
            Record::CompensationFailed(failure) => self.compensation_failures.push(failure),
            Record::Finished { status } => self.status = status,
        }
    }

    pub(crate) fn is_completed(&self, step: &str) -> bool {
        self.completed.iter().any(|s| s == step)
    }

    pub(crate) fn snapshot(&self, id: SagaId) -> SagaSnapshot {
        SagaSnapshot {
            id,
            saga: self.saga.clone(),
            status: self.status,
            context: Value::Object(self.context.clone()),
            completed_steps: self.completed.clone(),
            running_steps: self.running.clone(),
            waiting_for: self
                .running
                .iter()
                .filter_map(|s| self.waits.get(s).cloned())
                .collect(),
            failure: self.failure.clone(),
            compensated_steps: self.compensated.clone(),
            compensation_failures: self.compensation_failures.clone(),
            started_at: self.started_at,
            updated_at: self.updated_at,
        }
    }

    pub(crate) fn outcome(&self, id: SagaId) -> SagaOutcome {
        SagaOutcome {
            id,
            saga: self.saga.clone(),
            status: self.status,
            context: Value::Object(self.context.clone()),
            completed_steps: self.completed.clone(),
            failure: self.failure.clone(),
            compensated_steps: self.compensated.clone(),
            compensation_failures: self.compensation_failures.clone(),
        }
    }
}

/// Appends a saga's records with optimistic concurrency: each append expects the version
/// the previous one left, so a second runner on the same saga is detected at its next
/// append.
#[derive(Debug)]
pub(crate) struct LogWriter {
    id: SagaId,
    stream: String,
    correlation: String,
    exact: bool,
    version: tokio::sync::Mutex<u64>,
}

impl LogWriter {
    /// A writer for saga `id`, whose log is at `version` (0: empty). `exact` says whether the
    /// store honours [`ExpectedVersion::Exact`].
    pub(crate) fn new(id: SagaId, version: u64, exact: bool) -> Self {
        Self {
            id,
            stream: id.stream(),
            correlation: id.to_string(),
            exact,
            version: tokio::sync::Mutex::new(version),
        }
    }

    /// Appends `record`, then applies it through `apply` before the next append can start,
    /// so the in-memory state follows the log's order.
    pub(crate) async fn append(
        &self,
        store: &dyn EventStore,
        time: DateTime<Utc>,
        record: Record,
        apply: impl FnOnce(Record, DateTime<Utc>),
    ) -> Result<()> {
        let event = record.to_envelope(&self.correlation, time)?;
        let mut version = self.version.lock().await;
        let expected = if self.exact {
            ExpectedVersion::Exact(*version)
        } else {
            ExpectedVersion::Any
        };
        match store.append(&self.stream, expected, vec![event]).await {
            Ok(written) => *version = written.next_expected_version,
            Err(orchestrator_core::Error::WrongExpectedVersion { .. }) => {
                return Err(Error::Conflict { id: self.id });
            }
            Err(e) => return Err(e.into()),
        }
        apply(record, time);
        Ok(())
    }
}

/// Every record of saga `id`'s log.
pub(crate) async fn read_log(store: &dyn EventStore, id: SagaId) -> Result<Vec<EventEnvelope>> {
    let stream = id.stream();
    let mut events = Vec::new();
    loop {
        let from = u64::try_from(events.len()).unwrap_or(u64::MAX) + 1;
        let batch = store.read_stream(&stream, from, READ_BATCH).await?;
        let done = batch.len() < READ_BATCH;
        events.extend(batch);
        if done {
            return Ok(events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn records_round_trip_through_envelopes() {
        let t = Utc::now();
        let records = vec![
            Record::Started {
                saga: "s".into(),
                input: obj(json!({"a": 1})),
            },
            Record::StepCompleted {
                step: "x".into(),
                attempt: 2,
                output: obj(json!({"b": 2})),
            },
            Record::StepFailed(StepFailure {
                step: "y".into(),
                attempts: 3,
                error: "boom".into(),
                timed_out: true,
            }),
            Record::Finished {
                status: SagaStatus::Compensated,
            },
        ];
        for record in records {
            let env = record.to_envelope("c", t).unwrap();
            assert!(LOG_EVENT_TYPES.contains(&env.event_type()));
            assert_eq!(env.correlation_id(), Some("c"));
            assert_eq!(env.data::<Record>().unwrap(), record);
        }
    }

    #[test]
    fn the_fold_tracks_status_and_context() {
        let t = Utc::now();
        let id = SagaId::new();
        let events: Vec<_> = [
            Record::Started {
                saga: "s".into(),
                input: obj(json!({"a": 1})),
            },
            Record::StepCompleted {
                step: "x".into(),
                attempt: 1,
                output: obj(json!({"a": 2, "b": 3})),
            },
            Record::StepRetrying {
                step: "y".into(),
                attempt: 1,
                error: "e".into(),
                timed_out: false,
            },
            Record::StepFailed(StepFailure {
                step: "y".into(),
                attempts: 2,
                error: "e".into(),
                timed_out: false,
            }),
            Record::CompensationCompleted {
                step: "x".into(),
                attempt: 1,
            },
        ]
        .iter()
        .map(|r| r.to_envelope("c", t).unwrap())
        .collect();
        let live = Live::replay(id, &events).unwrap();
        assert_eq!(live.status, SagaStatus::Compensating);
        assert_eq!(Value::Object(live.context.clone()), json!({"a": 2, "b": 3}));
        assert_eq!(live.step_attempts["y"], 2);
        assert_eq!(live.compensated, ["x"]);
        assert!(live.is_completed("x") && !live.is_completed("y"));
        assert!(matches!(
            Live::replay(id, &events[1..]),
            Err(Error::CorruptLog { .. })
        ));
        let junk = EventEnvelope::new("saga.started", &json!({"kind": "nope"})).unwrap();
        assert!(matches!(
            Live::replay(id, &[junk]),
            Err(Error::CorruptLog { .. })
        ));
    }
}
