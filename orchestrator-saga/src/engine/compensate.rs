//! The backward half of a run: compensating the completed steps.

use std::time::Instant;

use orchestrator_core::derived_id::derive_ids;
use tracing::Instrument;

use super::Runner;
use crate::error::Result;
use crate::log::Record;
use crate::status::CompensationFailure;
use crate::step::{Compensation, SagaStep, StepInfo};

impl Runner {
    /// Compensates the completed steps, last completed first, skipping those already
    /// compensated (or given up on) before a crash.
    pub(super) async fn compensate(&self) -> Result<()> {
        let pending: Vec<String> = self.instance.with_live(|l| {
            l.completed
                .iter()
                .rev()
                .filter(|s| {
                    !l.compensated.contains(s)
                        && !l.compensation_failures.iter().any(|f| &f.step == *s)
                })
                .cloned()
                .collect()
        });
        for name in pending {
            let Some(step) = self.definition.steps.get(name.as_str()) else {
                continue; // a wait: nothing to undo
            };
            if let Some(compensation) = &step.compensation {
                self.compensate_step(step, compensation.as_ref()).await?;
            }
        }
        Ok(())
    }

    async fn compensate_step(
        &self,
        step: &SagaStep,
        compensation: &dyn Compensation,
    ) -> Result<()> {
        let name = &step.name;
        let policy = step.compensation_retry_policy();
        let mut attempt = self
            .instance
            .with_live(|l| l.compensation_attempts.get(&**name).copied())
            .unwrap_or(0)
            + 1;
        loop {
            let key = StepInfo::key_for(&self.saga_id, name, attempt, true);
            let context = self.invocation_context(name, attempt, true, &key);
            let span =
                tracing::info_span!("saga.step", step = %name, attempt, phase = "compensation");
            let started = Instant::now();
            let result = self
                .attempt(
                    step.timeout,
                    derive_ids(key, compensation.compensate(context)),
                )
                .instrument(span)
                .await;
            self.unmark_running(name);
            let error = match result {
                Ok(()) => {
                    self.observe(name, "compensation", "ok", started.elapsed());
                    let step = name.to_string();
                    return self
                        .record(Record::CompensationCompleted { step, attempt })
                        .await;
                }
                Err(error) => error,
            };
            self.observe(name, "compensation", error.label(), started.elapsed());
            let (message, retryable, _) = error.describe();
            if !policy.should_retry(attempt, retryable) {
                tracing::error!(step = %name, attempts = attempt, error = %message, "saga compensation failed; the saga stays partly applied");
                let failure = CompensationFailure {
                    step: name.to_string(),
                    attempts: attempt,
                    error: message,
                };
                return self.record(Record::CompensationFailed(failure)).await;
            }
            let delay = policy.delay_after(attempt).unwrap_or_default();
            tracing::debug!(step = %name, attempt, error = %message, ?delay, "compensation attempt failed; retrying");
            self.record(Record::CompensationRetrying {
                step: name.to_string(),
                attempt,
                error: message,
            })
            .await?;
            self.shared.clock.sleep(delay).await;
            attempt += 1;
        }
    }
}
