//! # orchestrator-saga
//!
//! Sagas and workflows for orchestrator: multi-step business transactions that either
//! complete or are undone step by step, and that survive a crash of the process running
//! them.
//!
//! A [`SagaDefinition`] is a flow of [`SagaStep`]s — each an async function over a JSON
//! context, with an optional compensation, timeout and [`RetryPolicy`](orchestrator_core::RetryPolicy) —
//! plus parallel groups, conditional [`Branch`]es and [`WaitForEvent`] steps. A
//! [`SagaOrchestrator`] runs instances of it: each step's output is merged into the context
//! that later steps see; when a step fails for good, the completed steps are compensated in
//! reverse order. Every transition is appended to the saga's log stream (`saga-<id>`) in
//! any [`EventStore`](orchestrator_core::EventStore), so [`SagaOrchestrator::recover`]
//! carries unfinished sagas on after a restart without re-running completed steps.
//!
//! The order saga of the original design:
//!
//! ```
//! use std::sync::Arc;
//! use orchestrator_core::HandlerError;
//! use orchestrator_saga::{SagaDefinition, SagaOrchestrator, SagaStatus, SagaStep};
//! use orchestrator_store::InMemoryEventStore;
//! use serde_json::{Value, json};
//!
//! async fn validate_order(_context: Value) -> Result<Value, HandlerError> {
//!     Ok(json!({ "valid": true }))
//! }
//! async fn process_payment(_context: Value) -> Result<Value, HandlerError> {
//!     Ok(json!({ "transaction_id": "TXN123" }))
//! }
//! async fn refund_payment(context: Value) -> Result<(), HandlerError> {
//!     println!("refunding {}", context["transaction_id"]);
//!     Ok(())
//! }
//! async fn ship_order(context: Value) -> Result<Value, HandlerError> {
//!     if context["amount"].as_f64() > Some(1_000.0) {
//!         return Err(HandlerError::permanent("too heavy to ship"));
//!     }
//!     Ok(json!({ "tracking_number": "TRACK123" }))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), orchestrator_saga::Error> {
//! let orchestrator = SagaOrchestrator::new(Arc::new(InMemoryEventStore::new()));
//! orchestrator.define(SagaDefinition::new("order_processing", vec![
//!     SagaStep::new("validate", validate_order),
//!     SagaStep::new("payment", process_payment).with_compensation(refund_payment),
//!     SagaStep::new("shipping", ship_order),
//! ])?)?;
//!
//! let saga = orchestrator
//!     .run("order_processing", json!({ "order_id": "ORDER123", "amount": 99.99 }))
//!     .await?;
//! assert_eq!(saga.status, SagaStatus::Completed);
//! assert_eq!(saga.context["tracking_number"], "TRACK123");
//!
//! let saga = orchestrator
//!     .run("order_processing", json!({ "order_id": "ORDER124", "amount": 5_000 }))
//!     .await?;
//! assert_eq!(saga.status, SagaStatus::Compensated);
//! assert_eq!(saga.compensated_steps, ["payment"]);
//! assert_eq!(saga.failure.unwrap().step, "shipping");
//! # Ok(())
//! # }
//! ```
//!
//! ## Guarantees
//!
//! - **Durability.** A saga is durable once [`SagaOrchestrator::start`] returns. Each
//!   transition (step completed, attempt failed, branch chosen, wait started,
//!   compensation done, …) is one event in the saga's stream; the state is the fold of
//!   that log. The event types are listed in [`LOG_EVENT_TYPES`].
//! - **At-least-once steps, exactly-once with the key.** A step whose completion was
//!   recorded never runs again. A step that was running when the process died runs again
//!   after recovery with the same attempt number, so its [`StepInfo::idempotency_key`]
//!   (`<saga id>:<step>:<attempt>`) is the same: side effects keyed by it happen once.
//!   Every step finds its [`StepInfo`] in the context under [`RESERVED_KEY`] (`"_saga"`).
//! - **One runner per saga.** Appends expect the exact stream version the runner last
//!   wrote; a second runner on the same saga is detected at its next append and stops with
//!   [`Error::Conflict`].
//! - **Compensation.** When a step fails (after its retries, or on timeout), the steps
//!   that completed are compensated, last completed first; in a parallel group, members
//!   still running finish first and are compensated if they completed, and no new member
//!   starts. A compensation is retried under its policy; one that still fails is recorded,
//!   the others still run, and the saga ends [`SagaStatus::CompensationFailed`] with
//!   [`SagaOutcome::compensation_failures`]. A step whose completion was not recorded
//!   before a crash is not compensated.
//! - **Time.** Timeouts, backoff and wait deadlines use the orchestrator's
//!   [`Clock`](orchestrator_core::Clock), so tests drive them with a manual clock.
//!
//! ## Observability
//!
//! A tracing span per saga run and per step attempt, and the metrics named in
//! [`telemetry`]: sagas started, completed, compensated and failed, and step durations.
//!
//! ## Features
//!
//! This crate has no cargo features.
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod definition;
mod engine;
mod error;
mod events;
mod flow;
mod id;
mod instance;
mod log;
mod orchestrator;
mod status;
mod step;
pub mod telemetry;

pub use definition::{SagaBuilder, SagaDefinition};
pub use error::{Error, Result};
pub use events::{EventListener, EventRouting};
pub use flow::{Branch, Flow, WaitForEvent};
pub use id::{STREAM_PREFIX, SagaId};
pub use instance::SagaHandle;
pub use log::LOG_EVENT_TYPES;
pub use orchestrator::{
    OrphanWatch, Recovery, SagaOrchestrator, SagaOrchestratorBuilder, StoredSaga,
};
pub use status::{
    CompensationFailure, EventWait, SagaOutcome, SagaSnapshot, SagaStatus, StepFailure,
};
pub use step::{Compensation, CompensationResult, RESERVED_KEY, SagaStep, StepInfo};
