//! # orchestrator
//!
//! Event-driven architecture for Rust services: an event bus, an event store, and (as their
//! crates land) sagas, CQRS and broker backends — in-process by default, on Redis, Kafka or
//! RabbitMQ when you outgrow one machine.
//!
//! This umbrella crate re-exports the workspace crates and offers [`EventOrchestrator`], a
//! facade that wires them together. Start with the [`prelude`]:
//!
//! ```
//! use orchestrator::prelude::*;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), orchestrator::Error> {
//! let orchestrator = EventOrchestrator::new();
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1);
//! orchestrator
//!     .subscribe("user.created", move |event: EventEnvelope| {
//!         let tx = tx.clone();
//!         async move {
//!             let user: serde_json::Value = event.data()?;
//!             tx.send(user["username"].to_string()).await.ok();
//!             Ok::<_, HandlerError>(())
//!         }
//!     })
//!     .await?;
//! orchestrator.publish_event("user.created", json!({"user_id": "123", "username": "john_doe"})).await?;
//! assert_eq!(rx.recv().await.as_deref(), Some("\"john_doe\""));
//! # Ok(()) }
//! ```
//!
//! ## Crates
//!
//! - [`core`] (`orchestrator-core`): the envelope, the CloudEvents codec, the traits.
//! - [`bus`] (`orchestrator-bus`): the in-process transport and the event bus.
//! - [`store`] (`orchestrator-store`): the in-memory event store.
//! - `backends` (`orchestrator-backends`): Redis, RabbitMQ and Kafka, each behind its own
//!   feature.
//!
//! ## Features
//!
//! - `redis`, `rabbitmq`, `kafka` — the broker backends (`orchestrator::backends::…`).
//! - `rabbitmq-tls` — `amqps://` for the RabbitMQ backend.
//!
//! No backend is on by default: the embedded default needs no broker.

mod facade;

pub use facade::EventOrchestrator;

#[doc(inline)]
pub use orchestrator_core::{Error, Result};

/// The core vocabulary (`orchestrator-core`).
pub use orchestrator_core as core;

/// The event bus and in-process transport (`orchestrator-bus`).
pub use orchestrator_bus as bus;

/// The event stores (`orchestrator-store`).
pub use orchestrator_store as store;

/// Broker backends (`orchestrator-backends`): Redis, RabbitMQ and Kafka, each behind the
/// feature of the same name.
#[cfg(any(feature = "redis", feature = "rabbitmq", feature = "kafka"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "redis", feature = "rabbitmq", feature = "kafka")))
)]
pub use orchestrator_backends as backends;

/// The names a user of the facade needs.
pub mod prelude {
    pub use crate::EventOrchestrator;
    pub use orchestrator_bus::{
        DeadLetters, EventBus, InProcessTransport, Subscription, SubscriptionConfig,
    };
    pub use orchestrator_core::{
        DeadLetter, DeadLetterQuery, DeadLetterQueue, Error, Event, EventEnvelope, EventFilter,
        EventHandler, EventId, EventStore, ExpectedVersion, HandlerError, JsonHandler, ReadAll,
        Result, RetryPolicy, TopicPattern, Transport,
    };
    pub use orchestrator_store::InMemoryEventStore;
}
