//! # orchestrator-store
//!
//! The event-sourcing side of orchestrator, for applications without a broker: event stores
//! that implement [`orchestrator_core::EventStore`]. For now that is the
//! [`InMemoryEventStore`], for tests and for events that need not outlive the process; the
//! embedded durable store, replay, projections, snapshots and the schema registry come later.
//!
//! Every store here passes the conformance suite of `orchestrator_core::testkit::store`, the
//! same one every broker-backed store runs.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, ReadAll};
//! use orchestrator_store::InMemoryEventStore;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_core::Result<()> {
//! let store = InMemoryEventStore::new();
//! let placed = EventEnvelope::new("order.placed", &json!({ "order_id": "o-1" }))?;
//! let written = store.append("order-o-1", ExpectedVersion::NoStream, vec![placed]).await?;
//! assert_eq!(written.next_expected_version, 1);
//!
//! let events = store.read_stream("order-o-1", 1, 100).await?;
//! assert_eq!(events[0].event_type(), "order.placed");
//! assert_eq!(events[0].stream_version(), Some(1));
//! assert_eq!(store.read_all(ReadAll::from(1, 100)).await?, events);
//! # Ok(())
//! # }
//! ```

pub mod memory;

#[doc(inline)]
pub use memory::InMemoryEventStore;
