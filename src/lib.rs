//! # orchestrator
//!
//! Event-driven architecture for Rust services: an event bus, an event store with replay and
//! projections, sagas with compensation, CQRS with a cached query side — in-process by
//! default, on Redis, Kafka or RabbitMQ when you outgrow one machine, with one
//! OpenTelemetry trace from a publish through any broker into handlers, sagas and commands.
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
//!
//! // Every published event is in the store, so it can be replayed to the subscribers.
//! assert_eq!(orchestrator.replay_events("user.created").await?, 1);
//! assert_eq!(rx.recv().await.as_deref(), Some("\"john_doe\""));
//! # Ok(()) }
//! ```
//!
//! ## What the facade offers
//!
//! - events: [`subscribe`](EventOrchestrator::subscribe), [`publish_event`](EventOrchestrator::publish_event),
//!   [`replay_events`](EventOrchestrator::replay_events) with a [`ReplayFilter`];
//! - store-first delivery: `publish` appends, and the outbox [`relay`] carries every stored
//!   event to the transport at least once, after any crash
//!   ([`publish_and_wait`](EventOrchestrator::publish_and_wait),
//!   [`relay_status`](EventOrchestrator::relay_status)); a durable
//!   [`inbox`](EventOrchestrator::inbox) lets subscriptions skip redeliveries;
//! - sagas and workflows: [`define_saga`](EventOrchestrator::define_saga),
//!   [`start_saga`](EventOrchestrator::start_saga), [`sagas`](EventOrchestrator::sagas);
//! - CQRS: [`register_command_handler`](EventOrchestrator::register_command_handler),
//!   [`send_command`](EventOrchestrator::send_command),
//!   [`register_query_handler`](EventOrchestrator::register_query_handler),
//!   [`execute_query`](EventOrchestrator::execute_query);
//! - the dead-letter queue ([`dead_letters`](EventOrchestrator::dead_letters)), the
//!   schema registry ([`schemas`](EventOrchestrator::schemas)), [`metrics`], and
//!   [`propagation`] of trace context and causation;
//! - [`EventOrchestrator::builder`] to pick the transport and the store — as values or as
//!   URLs ([`connect`]).
//!
//! ## Crates
//!
//! - [`core`] (`orchestrator-core`): the envelope, the CloudEvents codec, the traits.
//! - [`bus`] (`orchestrator-bus`): the in-process transport and the event bus.
//! - [`store`] (`orchestrator-store`): the in-memory and embedded durable stores, replay,
//!   projections, snapshots, the schema registry.
//! - [`saga`] (`orchestrator-saga`): sagas and workflows.
//! - [`cqrs`] (`orchestrator-cqrs`): command and query buses, aggregates, read models.
//! - `backends` (`orchestrator-backends`): Redis, RabbitMQ, Kafka and PostgreSQL (its event
//!   store), each behind its own feature.
//!
//! ## Features
//!
//! - `redis`, `rabbitmq`, `kafka` — the broker backends (`orchestrator::backends::…`, and
//!   `redis://`, `amqp://`, `kafka://` URLs in the builder and the CLI).
//! - `postgres` — the PostgreSQL event store and transport (`orchestrator::backends::postgres`,
//!   and `postgres://` store and transport URLs in the builder and the CLI).
//! - `postgres-tls` — TLS for the PostgreSQL backend (`sslmode=require`, `verify-ca`,
//!   `verify-full`).
//! - `rabbitmq-tls` — `amqps://` for the RabbitMQ backend.
//! - `redis-tls` — `rediss://` for the Redis backend.
//! - `cli` — the `orchestrator` command-line tool (`tail`, `publish`, `dlq`, `replay`,
//!   `streams`, `sagas`, `trace`), on the backends directly or, with `--server URL`, through
//!   a running `orchestrator-server` (its client: hyper and tokio-tungstenite, plain HTTP).
//!
//! No feature is on by default: the embedded default needs no broker.
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod connect;
mod error;
mod facade;
pub mod metrics;
pub mod propagation;
pub mod relay;

pub use error::{Error, Result};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
pub use facade::{EventOrchestrator, EventOrchestratorBuilder, ReplayFilter};
pub use relay::{RelayOptions, RelayState, RelayStatus};

/// The OpenTelemetry API this crate propagates trace context with (install its SDK and a
/// [`tracing_opentelemetry`] layer to record traces).
pub use opentelemetry;
/// The bridge from `tracing` spans to OpenTelemetry, in the version this crate uses.
pub use tracing_opentelemetry;

/// The core vocabulary (`orchestrator-core`).
pub use orchestrator_core as core;

/// The event bus and in-process transport (`orchestrator-bus`).
pub use orchestrator_bus as bus;

/// The event stores, replay, projections, snapshots and the schema registry
/// (`orchestrator-store`).
pub use orchestrator_store as store;

/// Sagas and workflows (`orchestrator-saga`).
pub use orchestrator_saga as saga;

/// Commands, queries, aggregates and read models (`orchestrator-cqrs`).
pub use orchestrator_cqrs as cqrs;

/// Broker backends (`orchestrator-backends`): Redis, RabbitMQ, Kafka and PostgreSQL, each
/// behind the feature of the same name.
#[cfg(any(
    feature = "redis",
    feature = "rabbitmq",
    feature = "kafka",
    feature = "postgres"
))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(
        feature = "redis",
        feature = "rabbitmq",
        feature = "kafka",
        feature = "postgres"
    )))
)]
pub use orchestrator_backends as backends;

/// The names a user of the facade needs.
pub mod prelude {
    pub use crate::{Error, EventOrchestrator, ReplayFilter, Result};
    pub use orchestrator_bus::{
        DeadLetters, EventBus, InProcessTransport, Subscription, SubscriptionConfig,
    };
    pub use orchestrator_core::{
        DeadLetter, DeadLetterQuery, DeadLetterQueue, Event, EventEnvelope, EventFilter,
        EventHandler, EventId, EventStore, ExpectedVersion, HandlerError, Inbox, InboxRetention,
        JsonHandler, MaxEventSize, ReadAll, RetryPolicy, TopicPattern, Transport,
    };
    pub use orchestrator_cqrs::{CommandRequest, QueryCacheConfig, QueryOptions, QueryRequest};
    pub use orchestrator_saga::{SagaDefinition, SagaOutcome, SagaStatus, SagaStep};
    pub use orchestrator_store::{
        FileEventStore, InMemoryEventStore, MemoryLimits, SchemaRegistry, WhenFull,
    };
}
