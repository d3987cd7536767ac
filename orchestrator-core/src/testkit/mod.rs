//! Conformance suites: the behaviour every [`EventStore`](crate::EventStore),
//! [`Transport`](crate::Transport), [`Inbox`](crate::Inbox) and
//! [`ReadModelStore`](crate::ReadModelStore) must show. An implementation runs a whole suite with one
//! call from its own tests, e.g. `testkit::store::run_all(|| async { MyStore::new() }).await`.
//!
//! The suites panic with a message naming the case and what was wrong, like any test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod inbox;
pub mod read_model;
pub mod services;
pub mod store;
pub mod transport;
