//! The runner: drives one saga instance forward through its flow, then, if a step failed,
//! back through the compensations of the steps that completed.
//!
//! Every decision is made from the instance's state, which is the fold of its log; this is
//! what makes a fresh run and a recovered run the same code. A step already recorded as
//! completed is skipped, a branch already recorded takes its recorded arm, a wait already
//! started keeps its recorded deadline, and attempt numbers continue from the recorded
//! failures.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use orchestrator_core::HandlerError;
use orchestrator_core::derived_id::derive_ids;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tracing::Instrument;

use crate::definition::SagaDefinition;
use crate::error::{Error, Result};
use crate::events::{Handoff, Registration, Settled};
use crate::flow::{Branch, Flow, Node, WaitForEvent};
use crate::instance::Instance;
use crate::log::{LogWriter, Record};
use crate::orchestrator::Shared;
use crate::status::{EventWait, SagaOutcome, SagaStatus, StepFailure};
use crate::step::{RESERVED_KEY, SagaStep, StepInfo};
use crate::telemetry;

mod compensate;

/// Why a flow stopped before its end.
enum Halt {
    /// A step failed for good (recorded): compensate.
    Failed,
    /// Another step failed, so this branch stopped starting new work.
    Aborted,
    /// The log could not be written: stop without compensating.
    Fatal(Error),
}

impl Halt {
    fn rank(&self) -> u8 {
        match self {
            Self::Aborted => 0,
            Self::Failed => 1,
            Self::Fatal(_) => 2,
        }
    }
}

impl From<Error> for Halt {
    fn from(error: Error) -> Self {
        Self::Fatal(error)
    }
}

/// How one attempt failed.
enum AttemptError {
    Failed(HandlerError),
    TimedOut(Duration),
    Panicked(String),
}

impl AttemptError {
    /// The message, whether a retry may help, and whether it timed out.
    fn describe(&self) -> (String, bool, bool) {
        match self {
            Self::Failed(e) => (e.message().to_owned(), e.is_retryable(), false),
            Self::TimedOut(after) => (format!("timed out after {after:?}"), true, true),
            Self::Panicked(message) => (format!("panicked: {message}"), false, false),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::TimedOut(_) => "timeout",
            _ => "error",
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}

/// Drives one saga instance.
pub(crate) struct Runner {
    shared: Arc<Shared>,
    definition: Arc<SagaDefinition>,
    instance: Arc<Instance>,
    log: LogWriter,
    saga_id: String,
    /// Set when a step fails for good: parallel branches stop starting work.
    abort: watch::Sender<bool>,
}

impl Runner {
    pub(crate) fn new(
        shared: Arc<Shared>,
        definition: Arc<SagaDefinition>,
        instance: Arc<Instance>,
        log: LogWriter,
    ) -> Self {
        Self {
            saga_id: instance.id.to_string(),
            shared,
            definition,
            instance,
            log,
            abort: watch::Sender::new(false),
        }
    }

    /// Runs the saga to its end.
    pub(crate) async fn run(self) -> Result<SagaOutcome> {
        let status = self.instance.status();
        if status.is_finished() {
            return Ok(self.outcome());
        }
        if status == SagaStatus::Running {
            match self.run_flow(&self.definition.flow).await {
                Ok(()) => return self.finish(SagaStatus::Completed).await,
                Err(Halt::Fatal(e)) => return Err(e),
                Err(Halt::Failed | Halt::Aborted) => {}
            }
        }
        self.compensate().await?;
        let failed = self
            .instance
            .with_live(|l| !l.compensation_failures.is_empty());
        let status = if failed {
            SagaStatus::CompensationFailed
        } else {
            SagaStatus::Compensated
        };
        self.finish(status).await
    }

    fn outcome(&self) -> SagaOutcome {
        let id = self.instance.id;
        self.instance.with_live(|l| l.outcome(id))
    }

    async fn finish(&self, status: SagaStatus) -> Result<SagaOutcome> {
        self.record(Record::Finished { status }).await?;
        let counter = match status {
            SagaStatus::Completed => telemetry::SAGAS_COMPLETED,
            SagaStatus::Compensated => telemetry::SAGAS_COMPENSATED,
            _ => telemetry::SAGAS_FAILED,
        };
        metrics::counter!(counter, "saga" => self.instance.saga.clone()).increment(1);
        tracing::info!(status = %status, "saga finished");
        Ok(self.outcome())
    }

    async fn record(&self, record: Record) -> Result<()> {
        let time = self.shared.clock.now();
        let instance = &self.instance;
        self.log
            .append(&*self.shared.store, time, record, |record, time| {
                instance.with_live(|l| l.apply(record, time));
            })
            .await
    }

    /// Records that `step` failed for good and stops the other branches.
    async fn fail(&self, failure: StepFailure) -> Result<(), Halt> {
        tracing::warn!(step = %failure.step, attempts = failure.attempts, error = %failure.error, "saga step failed; compensating");
        self.record(Record::StepFailed(failure)).await?;
        self.abort.send_replace(true);
        Err(Halt::Failed)
    }

    fn aborted(&self) -> bool {
        *self.abort.borrow()
    }

    async fn until_aborted(&self) {
        let mut receiver = self.abort.subscribe();
        // The sender lives in `self`, so the wait can only end by the flag being set.
        let _ = receiver.wait_for(|aborted| *aborted).await;
    }

    fn is_completed(&self, name: &str) -> bool {
        self.instance.with_live(|l| l.is_completed(name))
    }

    fn context(&self) -> Value {
        self.instance
            .with_live(|l| Value::Object(l.context.clone()))
    }

    /// The context for one invocation, with its [`StepInfo`] (whose idempotency key is
    /// `key`, [`StepInfo::key_for`] the same invocation); marks the step running.
    fn invocation_context(&self, step: &str, attempt: u32, compensating: bool, key: &str) -> Value {
        let info = json!({
            "saga_id": self.saga_id,
            "saga": &*self.instance.saga,
            "step": step,
            "attempt": attempt,
            "idempotency_key": key,
            "compensating": compensating,
        });
        self.instance.with_live(|l| {
            l.running.push(step.to_owned());
            let mut context = l.context.clone();
            context.insert(RESERVED_KEY.to_owned(), info);
            Value::Object(context)
        })
    }

    fn mark_running(&self, step: &str) {
        self.instance.with_live(|l| l.running.push(step.to_owned()));
    }

    fn unmark_running(&self, step: &str) {
        self.instance.with_live(|l| {
            if let Some(i) = l.running.iter().position(|s| s == step) {
                l.running.swap_remove(i);
            }
        });
    }

    /// Runs one attempt under the timeout, catching panics.
    async fn attempt<T>(
        &self,
        timeout: Option<Duration>,
        call: impl Future<Output = Result<T, HandlerError>>,
    ) -> Result<T, AttemptError> {
        let call = AssertUnwindSafe(call).catch_unwind();
        let result = match timeout {
            None => call.await,
            Some(after) => tokio::select! {
                biased;
                result = call => result,
                () = self.shared.clock.sleep(after) => return Err(AttemptError::TimedOut(after)),
            },
        };
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(AttemptError::Failed(e)),
            Err(panic) => Err(AttemptError::Panicked(panic_message(&*panic))),
        }
    }

    fn observe(&self, step: &Arc<str>, phase: &'static str, outcome: &'static str, took: Duration) {
        metrics::histogram!(
            telemetry::STEP_DURATION,
            "saga" => self.instance.saga.clone(),
            "step" => step.clone(),
            "phase" => phase,
            "outcome" => outcome,
        )
        .record(took.as_secs_f64());
    }

    fn run_flow<'a>(&'a self, flow: &'a Flow) -> BoxFuture<'a, Result<(), Halt>> {
        Box::pin(async move {
            for node in &flow.nodes {
                if self.aborted() {
                    return Err(Halt::Aborted);
                }
                match node {
                    Node::Step(step) if !self.is_completed(&step.name) => {
                        self.run_step(step).await?;
                    }
                    Node::Parallel(branches) => self.run_parallel(branches).await?,
                    Node::Branch(branch) => self.run_branch(branch).await?,
                    Node::Wait(wait) if !self.is_completed(&wait.name) => {
                        self.run_wait(wait).await?;
                    }
                    Node::Step(_) | Node::Wait(_) => {}
                }
            }
            Ok(())
        })
    }

    async fn run_parallel(&self, branches: &[Flow]) -> Result<(), Halt> {
        let results = join_all(branches.iter().map(|b| self.run_flow(b))).await;
        results
            .into_iter()
            .filter_map(Result::err)
            .max_by_key(Halt::rank)
            .map_or(Ok(()), Err)
    }

    async fn run_branch(&self, branch: &Branch) -> Result<(), Halt> {
        let recorded = self
            .instance
            .with_live(|l| l.branches.get(&*branch.name).copied());
        let arm = match recorded {
            Some(arm) => arm,
            None => {
                let context = self.context();
                let chosen = std::panic::catch_unwind(AssertUnwindSafe(|| branch.choose(&context)));
                let choice = match chosen {
                    Ok(choice) => choice,
                    Err(panic) => {
                        return self
                            .fail(StepFailure {
                                step: branch.name.to_string(),
                                attempts: 1,
                                error: format!("a predicate panicked: {}", panic_message(&*panic)),
                                timed_out: false,
                            })
                            .await;
                    }
                };
                tracing::debug!(branch = %branch.name, arm = ?choice.map(|c| c.1), "branch chosen");
                self.record(Record::BranchChosen {
                    branch: branch.name.to_string(),
                    arm: choice.map(|c| c.0),
                    label: choice.map(|c| c.1.to_owned()),
                })
                .await?;
                choice.map(|c| c.0)
            }
        };
        let Some(arm) = arm else { return Ok(()) };
        match branch.arm_flow(arm) {
            Some(flow) => self.run_flow(flow).await,
            None => Err(Halt::Fatal(Error::CorruptLog {
                id: self.instance.id,
                reason: format!("branch `{}` has no arm {arm}", branch.name),
            })),
        }
    }

    async fn run_step(&self, step: &SagaStep) -> Result<(), Halt> {
        let name = &step.name;
        let mut attempt = self
            .instance
            .with_live(|l| l.step_attempts.get(&**name).copied())
            .unwrap_or(0)
            + 1;
        loop {
            let key = StepInfo::key_for(&self.saga_id, name, attempt, false);
            let context = self.invocation_context(name, attempt, false, &key);
            let span = tracing::info_span!("saga.step", step = %name, attempt, phase = "action");
            let started = Instant::now();
            let result = self
                .attempt(step.timeout, derive_ids(key, step.action.call(context)))
                .instrument(span)
                .await;
            self.unmark_running(name);
            let error = match result {
                Ok(output) => {
                    self.observe(name, "action", "ok", started.elapsed());
                    let output = normalize_output(name, output);
                    self.record(Record::StepCompleted {
                        step: name.to_string(),
                        attempt,
                        output,
                    })
                    .await?;
                    return Ok(());
                }
                Err(error) => error,
            };
            self.observe(name, "action", error.label(), started.elapsed());
            let (message, retryable, timed_out) = error.describe();
            if !step.retry.should_retry(attempt, retryable) || self.aborted() {
                return self
                    .fail(StepFailure {
                        step: name.to_string(),
                        attempts: attempt,
                        error: message,
                        timed_out,
                    })
                    .await;
            }
            let delay = step.retry.delay_after(attempt).unwrap_or_default();
            tracing::debug!(step = %name, attempt, error = %message, ?delay, "saga step attempt failed; retrying");
            self.record(Record::StepRetrying {
                step: name.to_string(),
                attempt,
                error: message,
                timed_out,
            })
            .await?;
            tokio::select! {
                () = self.shared.clock.sleep(delay) => {}
                () = self.until_aborted() => return Err(Halt::Aborted),
            }
            attempt += 1;
        }
    }

    async fn run_wait(&self, wait: &WaitForEvent) -> Result<(), Halt> {
        let name = &*wait.name;
        let recorded = self.instance.with_live(|l| l.waits.get(name).cloned());
        let started = match recorded {
            Some(started) => started,
            None => {
                let correlation_id = match wait.correlation_id(&self.context(), &self.saga_id) {
                    Ok(id) => id,
                    Err(reason) => {
                        return self
                            .fail(StepFailure {
                                step: name.to_owned(),
                                attempts: 1,
                                error: reason,
                                timed_out: false,
                            })
                            .await;
                    }
                };
                let deadline = wait.timeout.map(|t| {
                    self.shared.clock.now()
                        + chrono::Duration::from_std(t).unwrap_or(chrono::Duration::MAX)
                });
                let started = EventWait {
                    step: name.to_owned(),
                    event_type: wait.event_type.clone(),
                    correlation_id,
                    deadline,
                };
                self.record(Record::WaitStarted(started.clone())).await?;
                started
            }
        };
        self.mark_running(name);
        let received = self.receive(&started).await;
        self.unmark_running(name);
        let handoff = match received {
            Some(Some(handoff)) => handoff,
            Some(None) => {
                return self
                    .fail(StepFailure {
                        step: name.to_owned(),
                        attempts: 1,
                        error: format!(
                            "no `{}` event with correlation id `{}` arrived in time",
                            started.event_type, started.correlation_id
                        ),
                        timed_out: true,
                    })
                    .await;
            }
            None => return Err(Halt::Aborted),
        };
        // The delivery is acknowledged once what the event did is logged; if this saga stops
        // before (a `?` below), the handoff is dropped and the transport delivers it again.
        let (data, event_id) = (handoff.event.data::<Value>(), handoff.event.id().clone());
        match data {
            Ok(data) => {
                self.record(Record::StepCompleted {
                    step: name.to_owned(),
                    attempt: 1,
                    output: normalize_output(name, data),
                })
                .await?;
                handoff.settle(Settled::Logged);
                Ok(())
            }
            Err(e) => {
                let failed = self
                    .fail(StepFailure {
                        step: name.to_owned(),
                        attempts: 1,
                        error: format!("the awaited event {event_id} has no JSON data: {e}"),
                        timed_out: false,
                    })
                    .await;
                handoff.settle(Settled::Logged);
                failed
            }
        }
    }

    /// Waits for the event: `Some(Some(event))`, `Some(None)` on timeout, `None` when the
    /// saga aborted meanwhile.
    async fn receive(&self, wait: &EventWait) -> Option<Option<Handoff>> {
        let mut waiter = match self
            .shared
            .router
            .register(&wait.event_type, &wait.correlation_id)
        {
            Registration::Ready(event) => return Some(Some(*event)),
            Registration::Waiting(waiter) => waiter,
        };
        let timeout = async {
            match wait.deadline {
                Some(deadline) => {
                    let left = (deadline - self.shared.clock.now())
                        .to_std()
                        .unwrap_or_default();
                    self.shared.clock.sleep(left).await;
                }
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            event = &mut waiter.receiver => Some(event.ok()),
            () = timeout => Some(waiter.receiver.try_recv().ok()),
            () = self.until_aborted() => None,
        }
    }
}

/// What a step's output adds to the context: an object's fields (minus the reserved key),
/// nothing for `null`, and any other value under the step's name.
fn normalize_output(step: &str, output: Value) -> Map<String, Value> {
    match output {
        Value::Object(mut fields) => {
            fields.remove(RESERVED_KEY);
            fields
        }
        Value::Null => Map::new(),
        other => Map::from_iter([(step.to_owned(), other)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_normalized() {
        assert_eq!(
            Value::Object(normalize_output("s", json!({"a": 1, RESERVED_KEY: {}}))),
            json!({"a": 1})
        );
        assert!(normalize_output("s", Value::Null).is_empty());
        assert_eq!(
            Value::Object(normalize_output("s", json!([1]))),
            json!({"s": [1]})
        );
    }

    #[test]
    fn panic_messages_are_read() {
        assert_eq!(panic_message(&"x"), "x");
        assert_eq!(panic_message(&String::from("y")), "y");
        assert_eq!(panic_message(&1_u8), "a non-string panic payload");
    }
}
