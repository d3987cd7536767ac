//! What a saga is doing or how it ended.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::SagaId;

/// Where a saga instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SagaStatus {
    /// Steps are running (or the saga waits for a concurrency slot or an event).
    Running,
    /// A step failed; completed steps are being compensated.
    Compensating,
    /// Every step completed.
    Completed,
    /// A step failed and every completed step's compensation succeeded.
    Compensated,
    /// A step failed and at least one compensation still failed after its retries: the
    /// saga is not rolled back and needs a human (see
    /// [`SagaOutcome::compensation_failures`]).
    CompensationFailed,
}

impl SagaStatus {
    /// Whether the saga has ended (completed, compensated or compensation failed).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Compensated | Self::CompensationFailed
        )
    }

    /// The status as written in logs and metrics (`"running"`, `"compensation_failed"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::CompensationFailed => "compensation_failed",
        }
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The step failure that sent a saga into compensation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepFailure {
    /// The step (or wait) that failed.
    pub step: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last attempt's error message.
    pub error: String,
    /// Whether the last attempt timed out (for a wait: no event came in time).
    pub timed_out: bool,
}

/// A compensation that still failed after its retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CompensationFailure {
    /// The step whose compensation failed.
    pub step: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last attempt's error message.
    pub error: String,
}

/// A wait for an event that is in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventWait {
    /// The wait's name.
    pub step: String,
    /// The awaited event type.
    pub event_type: String,
    /// The correlation id the event must carry.
    pub correlation_id: String,
    /// When the wait times out, if it does.
    pub deadline: Option<DateTime<Utc>>,
}

/// How a saga ended: its status, its final context, and what happened on the way.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SagaOutcome {
    /// The instance's id.
    pub id: SagaId,
    /// The saga's name.
    pub saga: String,
    /// Completed, Compensated or CompensationFailed.
    pub status: SagaStatus,
    /// The final context: the input merged with every completed step's output.
    pub context: Value,
    /// The steps that completed, in the order they completed.
    pub completed_steps: Vec<String>,
    /// The failure that sent the saga into compensation, if one did.
    pub failure: Option<StepFailure>,
    /// The steps whose compensation succeeded, in the order they were compensated.
    pub compensated_steps: Vec<String>,
    /// The compensations that failed for good.
    pub compensation_failures: Vec<CompensationFailure>,
}

impl SagaOutcome {
    /// Whether every step completed.
    pub fn is_completed(&self) -> bool {
        self.status == SagaStatus::Completed
    }
}

/// A saga's state at one moment, while it runs or after it ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SagaSnapshot {
    /// The instance's id.
    pub id: SagaId,
    /// The saga's name.
    pub saga: String,
    /// Where it stands.
    pub status: SagaStatus,
    /// The context so far.
    pub context: Value,
    /// The steps completed so far, in order.
    pub completed_steps: Vec<String>,
    /// The steps (and compensations) running right now.
    pub running_steps: Vec<String>,
    /// The event waits in progress.
    pub waiting_for: Vec<EventWait>,
    /// The failure that sent the saga into compensation, if one did.
    pub failure: Option<StepFailure>,
    /// The steps compensated so far.
    pub compensated_steps: Vec<String>,
    /// The compensations that failed for good.
    pub compensation_failures: Vec<CompensationFailure>,
    /// When the saga started.
    pub started_at: DateTime<Utc>,
    /// When its last transition was recorded.
    pub updated_at: DateTime<Utc>,
}

impl SagaSnapshot {
    /// The outcome, if the saga has ended.
    pub fn outcome(&self) -> Option<SagaOutcome> {
        self.status.is_finished().then(|| SagaOutcome {
            id: self.id,
            saga: self.saga.clone(),
            status: self.status,
            context: self.context.clone(),
            completed_steps: self.completed_steps.clone(),
            failure: self.failure.clone(),
            compensated_steps: self.compensated_steps.clone(),
            compensation_failures: self.compensation_failures.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_well() {
        assert!(SagaStatus::Compensated.is_finished());
        assert!(!SagaStatus::Compensating.is_finished());
        assert_eq!(
            SagaStatus::CompensationFailed.to_string(),
            "compensation_failed"
        );
        assert_eq!(
            serde_json::to_value(SagaStatus::Running).unwrap(),
            "running"
        );
    }
}
