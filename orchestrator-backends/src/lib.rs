//! # orchestrator-backends
//!
//! The core traits — [`EventStore`](orchestrator_core::EventStore),
//! [`Transport`](orchestrator_core::Transport) and
//! [`DeadLetterQueue`](orchestrator_core::DeadLetterQueue) — on real brokers, each behind
//! its own cargo feature. No backend is a default feature: enable the one you run.
//!
//! Every backend carries events as CloudEvents 1.0 JSON (see
//! [`orchestrator_core::cloudevents`]) and passes the same conformance suites as the
//! in-memory implementations.
//!
//! ```
//! // Which backends this build carries.
//! let enabled = orchestrator_backends::enabled_backends();
//! assert_eq!(enabled.contains(&"redis"), cfg!(feature = "redis"));
//! ```
//!
//! ## Features
//!
//! - `redis` — [`redis`]: Redis Streams.
//! - `rabbitmq` — [`rabbitmq`]: RabbitMQ.

#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;

/// The backends compiled into this build ("redis", "rabbitmq").
pub fn enabled_backends() -> &'static [&'static str] {
    &[
        #[cfg(feature = "redis")]
        "redis",
        #[cfg(feature = "rabbitmq")]
        "rabbitmq",
    ]
}
