//! Steps: an action, an optional compensation, a timeout and a retry policy.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::{HandlerError, JsonHandler, RetryPolicy};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The context key under which each step invocation finds its [`StepInfo`].
///
/// The engine adds it to the context a step or compensation receives and removes it from
/// what a step returns; it is never stored in the saga's context, and a saga's input may
/// not use it.
pub const RESERVED_KEY: &str = "_saga";

/// Who is being called: the saga, the step, the attempt, and the idempotency key.
///
/// Every step and compensation finds it in its context under [`RESERVED_KEY`]:
///
/// ```
/// use orchestrator_saga::StepInfo;
/// use serde_json::Value;
///
/// async fn charge(context: Value) -> Result<Value, orchestrator_core::HandlerError> {
///     let info = StepInfo::from_context(&context)
///         .ok_or_else(|| orchestrator_core::HandlerError::permanent("not called by a saga"))?;
///     // Hand the key to the payment provider, which ignores a second call with the same key.
///     Ok(serde_json::json!({ "payment_key": info.idempotency_key }))
/// }
/// # let _ = charge;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepInfo {
    /// The saga instance's id.
    pub saga_id: String,
    /// The saga's name (its definition).
    pub saga: String,
    /// The step's name.
    pub step: String,
    /// The attempt, from 1. It grows only when a failed attempt was recorded, so an attempt
    /// interrupted by a crash is re-run after recovery with the same number.
    pub attempt: u32,
    /// `<saga id>:<step>:<attempt>` for actions, `<saga id>:<step>:compensate:<attempt>` for
    /// compensations: the same for a re-run of the same attempt after a crash, so a side
    /// effect keyed by it happens once. It also names the events the invocation publishes
    /// through the facade: `<idempotency key>/1`, `/2`, … (see
    /// [`orchestrator_core::derived_id`]), so a re-run after a crash writes them once on a
    /// store with idempotent appends.
    pub idempotency_key: String,
    /// Whether this is the step's compensation rather than its action.
    pub compensating: bool,
}

impl StepInfo {
    /// The info the engine put in `context`, if any.
    pub fn from_context(context: &Value) -> Option<Self> {
        serde_json::from_value(context.get(RESERVED_KEY)?.clone()).ok()
    }

    /// The idempotency key of an invocation.
    pub fn key_for(saga_id: &str, step: &str, attempt: u32, compensating: bool) -> String {
        if compensating {
            format!("{saga_id}:{step}:compensate:{attempt}")
        } else {
            format!("{saga_id}:{step}:{attempt}")
        }
    }
}

/// Undoes a completed step. Any `Fn(Value) -> impl Future<Output = Result<(), E>>` (or
/// `Result<Value, E>`, the value being ignored) is one, where `E` converts into
/// [`HandlerError`] — every `std::error::Error` does.
#[async_trait]
pub trait Compensation: Send + Sync + 'static {
    /// Undoes the step, given the saga's context at the time of compensation.
    async fn compensate(&self, context: Value) -> Result<(), HandlerError>;
}

/// What a compensation closure may return: `Result<(), E>` or `Result<Value, E>`.
pub trait CompensationResult: Send {
    /// The result with the error converted and any value dropped.
    fn into_result(self) -> Result<(), HandlerError>;
}

impl<E: Into<HandlerError> + Send> CompensationResult for Result<(), E> {
    fn into_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

impl<E: Into<HandlerError> + Send> CompensationResult for Result<Value, E> {
    fn into_result(self) -> Result<(), HandlerError> {
        self.map(drop).map_err(Into::into)
    }
}

#[async_trait]
impl<F, Fut> Compensation for F
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: CompensationResult,
{
    async fn compensate(&self, context: Value) -> Result<(), HandlerError> {
        (self)(context).await.into_result()
    }
}

/// One step of a saga: an action, and optionally a compensation, a timeout and a retry
/// policy.
///
/// The action receives the saga's context (a JSON object: the input merged with the
/// outputs of the steps before it, plus [`StepInfo`] under [`RESERVED_KEY`]) and returns
/// an object that is merged into the context. A `null` output merges nothing; any other
/// non-object output is stored under the step's name.
///
/// ```
/// use std::time::Duration;
/// use orchestrator_core::{HandlerError, RetryPolicy};
/// use orchestrator_saga::SagaStep;
/// use serde_json::{Value, json};
///
/// async fn process_payment(_context: Value) -> Result<Value, HandlerError> {
///     Ok(json!({ "transaction_id": "TXN123" }))
/// }
/// async fn refund_payment(_context: Value) -> Result<(), HandlerError> {
///     Ok(())
/// }
///
/// let payment = SagaStep::new("payment", process_payment)
///     .with_compensation(refund_payment)
///     .with_timeout(Duration::from_secs(10))
///     .with_retry(RetryPolicy::exponential(3, Duration::from_millis(200)));
/// assert_eq!(payment.name(), "payment");
/// ```
#[derive(Clone)]
pub struct SagaStep {
    pub(crate) name: Arc<str>,
    pub(crate) action: Arc<dyn JsonHandler>,
    pub(crate) compensation: Option<Arc<dyn Compensation>>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: Option<RetryPolicy>,
}

impl SagaStep {
    /// A step named `name` running `action`: any `Fn(Value) -> impl Future<Output =
    /// Result<Value, E>>` with `E` convertible into [`HandlerError`] (an async fn taking and
    /// returning JSON), or any other [`JsonHandler`].
    ///
    /// By default a step has no compensation, no timeout, and one attempt.
    pub fn new(name: impl Into<String>, action: impl JsonHandler) -> Self {
        Self::from_handler(name, Arc::new(action))
    }

    /// A step running a shared handler.
    pub fn from_handler(name: impl Into<String>, action: Arc<dyn JsonHandler>) -> Self {
        Self {
            name: Arc::from(name.into()),
            action,
            compensation: None,
            timeout: None,
            retry: RetryPolicy::never(),
            compensation_retry: None,
        }
    }

    /// Undoes the step when a later step fails: any `Fn(Value) -> impl Future<Output =
    /// Result<(), E>>`. It receives the context at the time of compensation.
    pub fn with_compensation(mut self, compensation: impl Compensation) -> Self {
        self.compensation = Some(Arc::new(compensation));
        self
    }

    /// Fails an attempt that takes longer than `timeout` (on the orchestrator's clock). A
    /// timed-out attempt counts as a retryable failure; the compensation's attempts get the
    /// same limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Retries failed attempts of the action — and, unless
    /// [`with_compensation_retry`](Self::with_compensation_retry) says otherwise, of the
    /// compensation — under `policy`. Permanent errors ([`HandlerError::permanent`]) are
    /// never retried.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Retries failed compensation attempts under `policy`.
    pub fn with_compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = Some(policy);
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the step has a compensation.
    pub fn has_compensation(&self) -> bool {
        self.compensation.is_some()
    }

    /// The per-attempt timeout, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The action's retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The compensation's retry policy.
    pub fn compensation_retry_policy(&self) -> &RetryPolicy {
        self.compensation_retry.as_ref().unwrap_or(&self.retry)
    }
}

impl fmt::Debug for SagaStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaStep")
            .field("name", &self.name)
            .field("compensation", &self.compensation.is_some())
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("compensation_retry", &self.compensation_retry)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    #[tokio::test]
    async fn compensations_may_return_unit_or_a_value() {
        let unit = |_: Value| async { Ok::<_, Boom>(()) };
        let value = |_: Value| async { Ok::<_, HandlerError>(json!({"ignored": true})) };
        let failing = |_: Value| async { Err::<(), _>(Boom) };
        assert!(unit.compensate(json!({})).await.is_ok());
        assert!(value.compensate(json!({})).await.is_ok());
        let err = failing.compensate(json!({})).await.unwrap_err();
        assert_eq!(err.message(), "boom");
        assert!(err.is_retryable());
    }

    #[test]
    fn step_info_reads_from_the_context() {
        let info = StepInfo {
            saga_id: "s".into(),
            saga: "order".into(),
            step: "pay".into(),
            attempt: 2,
            idempotency_key: StepInfo::key_for("s", "pay", 2, false),
            compensating: false,
        };
        let context = json!({ RESERVED_KEY: info, "amount": 1 });
        assert_eq!(StepInfo::from_context(&context), Some(info));
        assert_eq!(StepInfo::from_context(&json!({})), None);
        assert_eq!(StepInfo::key_for("s", "pay", 1, true), "s:pay:compensate:1");
    }

    #[test]
    fn defaults_and_debug() {
        let step = SagaStep::new("a", |v: Value| async move { Ok::<_, HandlerError>(v) });
        assert_eq!(step.retry_policy().max_attempts, 1);
        assert!(!step.has_compensation());
        assert_eq!(step.timeout(), None);
        let step = step.with_retry(RetryPolicy::exponential(3, Duration::ZERO));
        assert_eq!(step.compensation_retry_policy().max_attempts, 3);
        assert!(format!("{step:?}").contains("\"a\""));
    }
}
