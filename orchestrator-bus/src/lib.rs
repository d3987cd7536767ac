//! # orchestrator-bus
//!
//! The event bus of orchestrator, built on the core [`Transport`](orchestrator_core::Transport)
//! trait so that it behaves the same on every transport.
//!
//! Today the crate holds the in-process pieces in [`memory`]: [`InProcessTransport`], a
//! transport between the tasks of one process with one bounded queue per consumer group
//! (slow consumers slow publishers down instead of growing memory), and
//! [`InMemoryDeadLetterQueue`]. Routing with filters and transforms, retry with backoff,
//! dead-letter tooling and metrics arrive with the event-bus issue, on top of any transport.
//!
//! ```
//! use orchestrator_bus::InProcessTransport;
//! use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_core::Result<()> {
//! let transport = InProcessTransport::new();
//! let mut billing = transport.subscribe(SubscribeOptions::new("billing", "order.*")?).await?;
//!
//! let placed = EventEnvelope::new("order.placed", &json!({"order_id": "o-1"}))?;
//! transport.publish("order.placed", placed).await?;
//!
//! if let Some(delivery) = billing.next().await? {
//!     let order: serde_json::Value = delivery.event().data()?;
//!     assert_eq!(order["order_id"], "o-1");
//!     assert_eq!(delivery.attempt(), 1);
//!     delivery.ack().await?; // handled: not delivered to `billing` again
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The in-process transport runs inside a tokio runtime. It passes the core conformance
//! suite (`orchestrator_core::testkit::transport`), like every broker transport.

pub mod memory;

#[doc(inline)]
pub use memory::{InMemoryDeadLetterQueue, InProcessTransport, InProcessTransportBuilder};
