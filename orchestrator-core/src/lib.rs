//! # orchestrator-core
//!
//! The vocabulary every orchestrator crate shares: the [`EventEnvelope`] and typed
//! [`Event`]s, the CloudEvents wire codec, and the traits the concern crates build on —
//! [`EventStore`], [`Transport`], [`DeadLetterQueue`], [`EventHandler`], [`Inbox`],
//! [`ReadModelStore`] — plus
//! [`RetryPolicy`], [`Clock`] and the one [`Error`] type.
//!
//! Implementations live elsewhere: the in-memory store in `orchestrator-store`, the
//! in-process transport in `orchestrator-bus`, brokers in `orchestrator-backends`. Each runs
//! the conformance suites of the `testkit` feature, so "works on Redis" means the same as
//! "works in memory".
//!
//! ```
//! use orchestrator_core::{EventEnvelope, cloudevents};
//! use serde_json::json;
//!
//! let event = EventEnvelope::new("user.created", &json!({"user_id": "123"}))?
//!     .with_correlation_id("signup-7");
//! let wire = cloudevents::encode(&event)?; // what every broker carries
//! let back = cloudevents::decode(&wire)?;
//! assert_eq!(back.data::<serde_json::Value>()?["user_id"], "123");
//! assert_eq!(back, event);
//! # Ok::<(), orchestrator_core::Error>(())
//! ```
//!
//! ## Features
//!
//! - `testkit` — the conformance suites [`testkit::store`], [`testkit::transport`],
//!   [`testkit::inbox`] and [`testkit::read_model`], which any implementation runs with one
//!   call.
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
pub mod cloudevents;
pub mod codec;
pub mod derived_id;
pub mod dlq;
pub mod envelope;
pub mod error;
pub mod handler;
pub mod inbox;
pub mod lease;
pub mod pattern;
pub mod read_model;
pub mod redact;
pub mod retry;
pub mod schema;
pub mod size;
pub mod store;
pub mod transport;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use clock::{Clock, ManualClock, SystemClock};
pub use dlq::{DeadLetter, DeadLetterQuery, DeadLetterQueue};
pub use envelope::{
    Event, EventEnvelope, EventId, StoredPosition, TraceContext, intern_event_type,
};
pub use error::{BoxError, Error, HandlerError, Result};
pub use handler::{EventHandler, HandlerCall, HandlerSlot, JsonHandler};
pub use inbox::{InMemoryInbox, Inbox, InboxRetention};
pub use lease::{Lease, LocalLease};
pub use pattern::TopicPattern;
pub use read_model::{
    InMemoryReadModelStore, ReadModelStore, ReadModelStoreExt, ReadModelTransaction,
};
pub use retry::{Jitter, RetryPolicy};
pub use schema::{EventSchemas, NoSchemas};
pub use size::MaxEventSize;
pub use store::{
    AppendResult, EventFilter, EventStore, EventStream, ExpectedVersion, ReadAll, StoreCapabilities,
};
pub use transport::{
    Acknowledge, Delivery, DeliveryInfo, DeliveryStream, Returned, Settler, SubscribeOptions,
    Transport,
};
