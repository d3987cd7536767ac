//! # orchestrator-cqrs
//!
//! Command/query responsibility segregation for orchestrator: the write side sends
//! commands to handlers that change state — usually [event-sourced aggregates](aggregate) —
//! and the read side answers queries from read models that projections of the event store
//! keep up to date.
//!
//! - [`CommandBus`] ([`command`]): a handler per command name, dynamic (JSON) or typed
//!   ([`Command`]); validation before the handler reporting every field error at once
//!   ([`validation`]); middleware for logging, authorization and idempotency by command id;
//!   the outcome carries the global position the command wrote up to.
//! - [`AggregateRepository`] ([`aggregate`]): load (snapshot + later events), handle,
//!   append with the expected version, reload and retry on conflicts, snapshot every N events.
//! - [`QueryBus`] ([`query`]): a handler per query name, dynamic or typed ([`Query`]); a
//!   `moka` cache with TTL and capacity that the read models' projections invalidate; and
//!   read-your-writes — a query can wait until the read models have seen a command's position.
//! - [`read_model`]: read models built by projections of `orchestrator-store`, kept behind the
//!   [`ReadModelStore`] trait, in memory by default.
//! - [`telemetry`]: the metrics recorded, and the spans.
//!
//! Everything runs on any [`EventStore`](orchestrator_core::EventStore), so the same code
//! works on the in-memory store, the embedded durable store and every broker backend.
//!
//! The CQRS example of the original design, in its dynamic form:
//!
//! ```
//! use orchestrator_core::HandlerError;
//! use orchestrator_cqrs::{CommandBus, QueryBus};
//! use serde_json::{Value, json};
//!
//! // Command handler
//! async fn create_user_command(_data: Value) -> Result<Value, HandlerError> {
//!     // Create user logic
//!     Ok(json!({ "user_id": "USER123", "created": true }))
//! }
//!
//! // Query handler
//! async fn get_user_query(params: Value) -> Result<Value, HandlerError> {
//!     // Fetch user logic
//!     Ok(json!({ "user_id": params["user_id"], "name": "John" }))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_cqrs::Result<()> {
//! let (commands, queries) = (CommandBus::new(), QueryBus::new());
//!
//! // Register handlers
//! commands.register("create_user", create_user_command)?;
//! queries.register("get_user", get_user_query)?;
//!
//! // Execute
//! let result = commands.send("create_user", json!({ "name": "John" })).await?;
//! let user = queries
//!     .execute("get_user", json!({ "user_id": result.value["user_id"] }))
//!     .await?;
//! assert_eq!(user, json!({ "user_id": "USER123", "name": "John" }));
//! # Ok(())
//! # }
//! ```
//!
//! A fuller picture — an aggregate behind a typed command, a read model, a cached query
//! that is invalidated when the read model changes, and read-your-writes — is in the
//! [`query`] module's example and in this crate's `tests/`.
//!
//! ## Features
//!
//! This crate has no cargo features.
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod aggregate;
mod canonical;
pub mod command;
pub mod context;
mod error;
mod handler;
pub mod query;
pub mod read_model;
pub mod telemetry;
pub mod validation;

pub use aggregate::{Aggregate, AggregateEvent, AggregateRepository, Executed, LoadedAggregate};
pub use command::{
    AuthorizationMiddleware, Authorizer, Command, CommandBus, CommandBusBuilder, CommandMiddleware,
    CommandOutcome, CommandRequest, IdempotencyMiddleware, LoggingMiddleware, Next,
};
pub use context::{
    CommandInfo, PositionTrackingStore, current_command, next_event_id, record_position,
};
pub use error::{Error, HandlerKind, Result};
pub use query::{Query, QueryBus, QueryBusBuilder, QueryCacheConfig, QueryOptions, QueryRequest};
pub use read_model::{
    InMemoryReadModelStore, ReadModel, ReadModelDefinition, ReadModelHandle, ReadModelStore,
    ReadModelStoreExt,
};
pub use validation::{FieldError, FieldErrors, JsonSchemaValidator, Validator};
