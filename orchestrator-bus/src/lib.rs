//! # orchestrator-bus
//!
//! The event bus of orchestrator, built once on the core
//! [`Transport`](orchestrator_core::Transport) trait so it behaves the same on the
//! in-process transport and on Redis, Kafka and RabbitMQ.
//!
//! - [`EventBus`]: publish events; subscribe handlers to topic patterns (`user.created`,
//!   `user.*`, `order.#`) with a [`SubscriptionConfig`] — filter, transform, concurrency
//!   limit, per-key order, [middleware], per-subscription
//!   [`RetryPolicy`](orchestrator_core::RetryPolicy), idempotent consumer on an
//!   [`Inbox`](orchestrator_core::Inbox) (in memory, or durable: across restarts); consumer groups
//!   (named subscriptions compete, different names each get everything); graceful
//!   [`shutdown`](EventBus::shutdown); [metrics] and `tracing` spans.
//! - [`DeadLetters`]: list, inspect, reprocess, discard, and a failure report.
//! - [`memory`]: [`InProcessTransport`] (one bounded queue per consumer group: slow consumers
//!   slow publishers instead of growing memory) and [`InMemoryDeadLetterQueue`].
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use orchestrator_bus::{EventBus, InProcessTransport, SubscriptionConfig};
//! use orchestrator_core::{EventEnvelope, HandlerError, RetryPolicy};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_core::Result<()> {
//! let bus = EventBus::new(Arc::new(InProcessTransport::new()))
//!     .with_retry_policy(RetryPolicy::exponential(3, Duration::from_millis(10)));
//! let (tx, mut rx) = tokio::sync::mpsc::channel(8);
//! let config = SubscriptionConfig::new("order.*")
//!     .named("billing")
//!     .filter(|e| e.event_type() != "order.cancelled");
//! bus.subscribe_with(config, Arc::new(move |event: EventEnvelope| {
//!     let tx = tx.clone();
//!     async move {
//!         let order: serde_json::Value = event.data()?;
//!         tx.send(order["order_id"].to_string()).await.ok();
//!         Ok::<_, HandlerError>(())
//!     }
//! })).await?;
//!
//! bus.publish(EventEnvelope::new("order.placed", &json!({"order_id": "o-1"}))?).await?;
//! assert_eq!(rx.recv().await.as_deref(), Some("\"o-1\""));
//! assert!(bus.shutdown(Duration::from_secs(1)).await.is_clean());
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//!
//! - `testkit` — [`testkit`] (when enabled): the bus's conformance cases over
//!   any transport, run by every backend's tests.
//!
//! Use the bus inside a tokio runtime. The in-process transport passes the core
//! conformance suite (`orchestrator_core::testkit::transport`), like every broker
//! transport.
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod bus;
pub mod dead_letters;
mod dispatch;
mod fasthash;
pub mod memory;
pub mod metrics;
pub mod middleware;
pub mod subscription;
#[cfg(feature = "testkit")]
pub mod testkit;

#[doc(inline)]
pub use bus::{EventBus, ShutdownReport, Subscription};
#[doc(inline)]
pub use dead_letters::{DeadLetters, FailureGroup, FailureReport};
pub use dispatch::Unfinished;
#[doc(inline)]
pub use memory::{
    DEFAULT_DLQ_CAPACITY, InMemoryDeadLetterQueue, InProcessTransport, InProcessTransportBuilder,
};
#[doc(inline)]
pub use subscription::{Filter, RetryMode, SubscriptionConfig, Transform};
/// Whether no subscriber could want an INFO span (`bus.handle`, `bus.publish`): then the
/// hot paths skip making one per event.
pub(crate) fn spans_off() -> bool {
    tracing::level_filters::LevelFilter::current() < tracing::Level::INFO
}
