//! # orchestrator-store
//!
//! The event-sourcing side of orchestrator, for applications without a broker, and the
//! schema registry:
//!
//! - event stores implementing [`orchestrator_core::EventStore`]: the
//!   [`InMemoryEventStore`] (tests, events that need not outlive the process) and the
//!   embedded durable [`FileEventStore`] (append-only checksummed segment files, group
//!   commit, crash recovery) — both pass the conformance suite of
//!   `orchestrator_core::testkit::store`, the same one every broker-backed store runs;
//! - the [`FileDeadLetterQueue`]: dead letters kept on disk beside the embedded store, one
//!   JSON file per letter, so that they survive a restart;
//! - [`replay`]: stored events again, to a handler or any async sink, with progress;
//! - [`temporal`]: a stream's or a read model's state as of a position or a time;
//! - [`projection`]: named read models fed from the global order with a durable checkpoint
//!   in the store, retries and parking;
//! - [`snapshot`]: aggregate snapshots (in memory or in files) and a snapshot policy;
//! - [`inbox`]: the durable [`FileInbox`] of handled event ids, for subscriptions that
//!   de-duplicate across restarts (what [`FileEventStore`] hands out as its inbox);
//! - [`schema`]: the [`SchemaRegistry`] (JSON Schema per event type and version, upcasters)
//!   implementing the core schema hooks, and a store wrapper validating on append.
//!
//! Everything above the stores works on any `EventStore`, brokers' included.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, ReadAll};
//! use orchestrator_store::{FileEventStore, InMemoryEventStore};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let durable = FileEventStore::open(dir.path())?;
//! for store in [&durable as &dyn EventStore, &InMemoryEventStore::new()] {
//!     let placed = EventEnvelope::new("order.placed", &json!({ "order_id": "o-1" }))?;
//!     let written = store.append("order-o-1", ExpectedVersion::NoStream, vec![placed]).await?;
//!     assert_eq!(written.next_expected_version, 1);
//!
//!     let events = store.read_stream("order-o-1", 1, 100).await?;
//!     assert_eq!(events[0].event_type(), "order.placed");
//!     assert_eq!(events[0].stream_version(), Some(1));
//!     assert_eq!(store.read_all(ReadAll::from(1, 100)).await?, events);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//!
//! None: everything is always built.
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod error;
pub mod file;
pub mod inbox;
pub mod memory;
pub mod projection;
pub mod replay;
pub mod schema;
pub mod snapshot;
pub mod temporal;

pub use error::{Error, Result};
#[doc(inline)]
pub use file::{FileDeadLetterQueue, FileEventStore};
#[doc(inline)]
pub use inbox::FileInbox;
#[doc(inline)]
pub use memory::{InMemoryEventStore, MemoryLimits, MemoryUsage, WhenFull};
#[doc(inline)]
pub use schema::SchemaRegistry;
