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
//! - `redis` — module `redis`: Redis Streams.
//! - `rabbitmq` — module `rabbitmq`: RabbitMQ.
//! - `rabbitmq-tls` — `amqps://` URLs for the RabbitMQ backend (rustls with the ring
//!   provider and the webpki roots; no C crypto build).
//! - `redis-tls` — `rediss://` URLs for the Redis backend (rustls with the ring provider; the
//!   system's roots, or the CAs given to `RedisConfig::with_tls_root_certificates`).
//! - `postgres` — module `postgres`: PostgreSQL (tokio-postgres pooled by deadpool-postgres):
//!   the event store, its lease and its inbox, the transport with its dead-letter queue, and
//!   the read model store (exactly-once projections).
//! - `postgres-tls` — TLS for the PostgreSQL backend (`sslmode=require`, `verify-ca`,
//!   `verify-full`; rustls with the ring provider).
//! - `kafka` — module `kafka`: Kafka (rdkafka with a bundled librdkafka built with the
//!   system's OpenSSL, so TLS and SASL PLAIN/SCRAM/OAUTHBEARER are always available).
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "kafka", feature = "rabbitmq"))]
mod stream_index;

/// The backends compiled into this build ("redis", "rabbitmq", "kafka", "postgres").
pub fn enabled_backends() -> &'static [&'static str] {
    &[
        #[cfg(feature = "redis")]
        "redis",
        #[cfg(feature = "rabbitmq")]
        "rabbitmq",
        #[cfg(feature = "kafka")]
        "kafka",
        #[cfg(feature = "postgres")]
        "postgres",
    ]
}
