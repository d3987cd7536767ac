//! Sagas and workflows through the facade.

use orchestrator_core::SubscribeOptions;
use orchestrator_saga::{
    EventListener, SagaDefinition, SagaHandle, SagaOrchestrator, SagaOutcome, SagaStep,
};
use serde_json::Value;

use super::EventOrchestrator;
use crate::error::Result;

impl EventOrchestrator {
    /// Defines the saga `name` as `steps`, run in order: each step's output is merged into
    /// the context later steps see; when a step fails for good, the completed steps are
    /// compensated in reverse order.
    ///
    /// An empty saga, two steps with one name, or a name already defined are errors
    /// ([`Error::Saga`](crate::Error::Saga)).
    ///
    /// ```
    /// use orchestrator::prelude::*;
    /// use serde_json::{Value, json};
    ///
    /// async fn validate_order(_context: Value) -> Result<Value, HandlerError> {
    ///     Ok(json!({"valid": true}))
    /// }
    /// async fn process_payment(_context: Value) -> Result<Value, HandlerError> {
    ///     Ok(json!({"transaction_id": "TXN123"}))
    /// }
    /// async fn refund_payment(_context: Value) -> Result<(), HandlerError> {
    ///     Ok(())
    /// }
    /// async fn ship_order(_context: Value) -> Result<Value, HandlerError> {
    ///     Ok(json!({"tracking_number": "TRACK123"}))
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator::Result<()> {
    /// let orchestrator = EventOrchestrator::new();
    /// orchestrator.define_saga("order_processing", vec![
    ///     SagaStep::new("validate", validate_order),
    ///     SagaStep::new("payment", process_payment).with_compensation(refund_payment),
    ///     SagaStep::new("shipping", ship_order),
    /// ])?;
    /// let saga = orchestrator
    ///     .start_saga("order_processing", json!({"order_id": "ORDER123", "amount": 99.99}))
    ///     .await?;
    /// assert_eq!(saga.status, SagaStatus::Completed);
    /// assert_eq!(saga.context["tracking_number"], "TRACK123");
    /// # Ok(()) }
    /// ```
    pub fn define_saga(
        &self,
        name: impl Into<String>,
        steps: impl IntoIterator<Item = SagaStep>,
    ) -> Result<()> {
        self.define_workflow(SagaDefinition::new(name, steps)?)
    }

    /// Defines a saga or workflow built with [`SagaDefinition::builder`]: parallel groups,
    /// conditional branches, waits for events (see [`route_events_to_sagas`](Self::route_events_to_sagas)).
    pub fn define_workflow(&self, definition: SagaDefinition) -> Result<()> {
        Ok(self.sagas.define(definition)?)
    }

    /// Runs the saga `name` with `input` (a JSON object) as its context and returns how it
    /// ended: its status ([`SagaStatus::Completed`](orchestrator_saga::SagaStatus::Completed),
    /// `Compensated`, `CompensationFailed`) and final context. A saga never defined is
    /// [`Error::UndefinedSaga`](crate::Error::UndefinedSaga).
    ///
    /// Every transition is logged to the store (stream `saga-<id>`) before the saga moves
    /// on, so [`SagaOrchestrator::recover`] carries unfinished sagas on after a crash.
    pub async fn start_saga(&self, name: &str, input: Value) -> Result<SagaOutcome> {
        Ok(self.sagas.run(name, input).await?)
    }

    /// Starts the saga `name` in the background and returns its handle (status, snapshot,
    /// outcome) once the start is logged.
    pub async fn spawn_saga(&self, name: &str, input: Value) -> Result<SagaHandle> {
        Ok(self.sagas.start(name, input).await?)
    }

    /// The saga orchestrator: definitions, running and stored sagas, recovery.
    pub fn sagas(&self) -> &SagaOrchestrator {
        &self.sagas
    }

    /// Hands the events the consumer group `options` receives on this orchestrator's
    /// transport to the sagas waiting for them
    /// ([`WaitForEvent`](orchestrator_saga::WaitForEvent) steps, matched by correlation
    /// id). Give each process its own group name, so every process sees the events its own
    /// sagas wait for.
    pub async fn route_events_to_sagas(&self, options: SubscribeOptions) -> Result<EventListener> {
        Ok(self
            .sagas
            .listen(self.bus.transport().as_ref(), options)
            .await?)
    }
}
