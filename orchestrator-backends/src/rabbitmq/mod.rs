//! RabbitMQ: a [`Transport`](orchestrator_core::Transport) with publisher confirms, delayed
//! retries and dead-lettering ([`RabbitMqTransport`], [`RabbitMqDeadLetterQueue`]), and an
//! [`EventStore`](orchestrator_core::EventStore) on a stream queue ([`RabbitMqEventStore`]).
//! Feature `rabbitmq`; the client is [lapin](https://docs.rs/lapin) 4 on tokio.
//!
//! ```no_run
//! use orchestrator_backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
//! use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
//! use serde_json::json;
//!
//! # async fn run() -> orchestrator_core::Result<()> {
//! let transport =
//!     RabbitMqTransport::connect(RabbitMqConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f"))
//!         .await?;
//! // The group's durable queue is bound before `subscribe` returns.
//! let mut orders = transport
//!     .subscribe(SubscribeOptions::new("billing", "order.*")?.prefetch(100))
//!     .await?;
//! let placed = EventEnvelope::new("order.placed", &json!({"order_id": "o-1"}))?;
//! transport.publish("order.placed", placed).await?; // returns once the broker confirmed it
//! if let Some(delivery) = orders.next().await? {
//!     assert_eq!(delivery.event().event_type(), "order.placed");
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Transport topology
//!
//! Names derive from two settings of [`RabbitMqConfig`]: the exchange (default
//! `orchestrator.events`) and the queue prefix (default `orchestrator`).
//!
//! | what | name | kind |
//! |---|---|---|
//! | events | `orchestrator.events` | durable **topic** exchange; routing key = topic |
//! | a consumer group's work queue | `<prefix>.group.<group>` | durable classic queue, bound once per subscribed pattern |
//! | a group's retry queues | `<prefix>.retry.<group>.<tier>ms` | durable; `x-dead-letter-exchange` `""`, `x-dead-letter-routing-key` = the work queue |
//! | dead letters | exchange `<prefix>.dead-letter` (fanout) → queue `<prefix>.dead-letters` | durable |
//!
//! Publishing sends to the topic exchange with the topic as routing key. A topic no group
//! subscribes to drops the event (the broker still confirms it), as on any pub/sub.
//! Consumers of one group share its queue (RabbitMQ hands each message to one of them);
//! every group has its own queue, so each group gets every matching event. A group's
//! queue exists from its first `subscribe` on, and keeps the group's events while no
//! consumer is attached. Bindings accumulate: a group that once subscribed to a pattern
//! keeps receiving it until its queue is deleted. An
//! [ephemeral](orchestrator_core::SubscribeOptions::ephemeral) group's queues are deleted
//! when its delivery stream is dropped, and carry `x-expires`
//! ([`RabbitMqConfig::with_ephemeral_expiry`], 60 s; a retry queue's is that plus its tier,
//! and it is declared again at every nack, so it never expires with a message in it): the
//! broker deletes them once unused that long if the process died.
//!
//! **Patterns** are AMQP topic patterns as they are, because ours are a subset: segments
//! separated by `.`, `*` matching exactly one segment, `#` (allowed only as the last
//! segment) matching zero or more. `order.*` matches `order.placed`, not
//! `order.line.added`; `order.#` matches `order`, `order.placed` and `order.line.added`.
//!
//! **Settling.** Deliveries are acked manually; [`SubscribeOptions::prefetch`](orchestrator_core::SubscribeOptions::prefetch) is the
//! consumer's `basic.qos`. A nack with a delay republishes the message (with confirm) to
//! the group's retry queue with a per-message `expiration` equal to the delay; when it
//! expires RabbitMQ dead-letters it back into the work queue. Then the original is acked.
//! The retry queues are durable and the messages persistent, so a pending retry survives a
//! broker restart. There is one retry queue per power of two of milliseconds (16 ms,
//! 32 ms, …), because RabbitMQ expires messages only at the head of a queue: within a tier
//! a message waits at most twice its delay. A nack without delay goes straight back to the
//! work queue. The attempt number, the last error and the first attempt's time travel in
//! headers (below). `dead_letter` publishes the letter to the dead-letter exchange (with
//! confirm), then acks. A [`Delivery`](orchestrator_core::Delivery) dropped unsettled is
//! handed back to the broker with `basic.nack(requeue)` and delivered again at once.
//! [`redeliver`](orchestrator_core::Transport::redeliver) publishes through the default
//! exchange straight to the group's work queue, so only that group sees it.
//!
//! # Wire format
//!
//! The body is the event as CloudEvents 1.0 JSON
//! ([`orchestrator_core::cloudevents`]); properties: `content_type`
//! `application/cloudevents+json`, `delivery_mode` 2 (persistent), `message_id` = event
//! id, `timestamp` = event time, `type` = event type. Headers:
//!
//! | header | when | value |
//! |---|---|---|
//! | `traceparent`, `tracestate` | the event has a trace context | W3C trace context (also in the body) |
//! | `x-orchestrator-topic` | retries, redeliveries, dead letters | the topic it was published to |
//! | `x-orchestrator-attempt` | retries | the attempt this delivery is (absent: 1) |
//! | `x-orchestrator-last-error` | retries | the last nack's reason |
//! | `x-orchestrator-first-attempt-at` | retries | RFC 3339 |
//! | `x-orchestrator-letter-id`, `-reason`, `-attempts`, `-first-failure-at`, `-last-failure-at`, `-group` | dead letters | the [`DeadLetter`](orchestrator_core::DeadLetter)'s fields |
//!
//! A message that is not a CloudEvent (published by another client, say) is dead-lettered
//! with the decoding error as its reason and its body as it came; the consumer goes on.
//! The letter's event has type [`UNDECODABLE_EVENT_TYPE`] and carries that body.
//! A message the broker delivers again after its consumer went away counts one more
//! attempt (AMQP says only *that* it was redelivered, not how often).
//!
//! # Event store
//!
//! [`RabbitMqEventStore`] keeps every event in one durable stream queue (default
//! `orchestrator.event-log`, `x-queue-type: stream`). Appends publish to it through the
//! default exchange with confirms; the body is the CloudEvent with its `streamid`, and the
//! headers `x-orchestrator-stream-id` and `x-orchestrator-write-id` help readers.
//!
//! - **Global position** = stream offset + 1 (offsets start at 0, positions at 1). Sync
//!   records (see [`RabbitMqEventStore::sync`]) take a position too, so positions can
//!   have gaps.
//! - **Stream version** = the event's rank among its stream's events in log order. It is
//!   not written by the appender but computed by every reader, which reads the log from its
//!   first record: each store instance follows the log with one consumer (from offset 0 at
//!   connect, then live) and keeps, per stream, the positions of its events (compactly, see
//!   [index memory](#index-memory)). So concurrent appenders, even in different processes, always produce gapless,
//!   distinct versions, at the price of reading the whole log once at connect. Never put a
//!   retention limit (`x-max-age`, `x-max-length-bytes`) on the stream: truncating the log
//!   renumbers the versions.
//! - **read_all / subscribe** consume the stream from `x-stream-offset` = position − 1 with
//!   the configured prefetch; filters by type, time and stream prefix are applied here, not
//!   by the broker. A subscription is one consumer from catch-up to live, so the hand-over
//!   has no gap and no duplicate, and after a lost connection it resumes where it stopped.
//! - **read_stream** looks up the stream's positions in the index and reads the log from
//!   its first wanted position to its last: O(events in that span of the log), not O(events
//!   of the stream).
//! - **Consistency.** An append returns once the broker confirmed it *and* this instance's
//!   reader saw it, so an instance reads its own writes. Other processes' appends show up as
//!   the reader gets to them (milliseconds); [`RabbitMqEventStore::sync`] waits for all.
//!
//! Capabilities ([`RABBITMQ_STORE_CAPABILITIES`]): `durable` and `read_stream` yes;
//! `expected_version` **no** — RabbitMQ cannot check a stream's version and append in one
//! atomic step, so `Exact`, `NoStream` and `StreamExists` return
//! [`Error::Unsupported`](orchestrator_core::Error::Unsupported) (use `Any`);
//! `atomic_batch` **no** — the messages of one append are confirmed one by one, so a
//! connection lost mid-append can leave a prefix written (and appending again may
//! duplicate it); `idempotent_append` **no** — the index knows which event ids each stream
//! holds, but only as far as the reader has got (another process's appends, and this one's
//! whose confirmation outran the reader, show up later), and checking it and publishing are
//! two steps that other appends can come between; the publisher may also publish a message
//! again after a lost confirmation, so the log itself can hold an event twice. A check on
//! the index would catch some retries and write others twice, so the store does not claim
//! it: an append sent again is written again, and readers that must not see an event twice
//! deduplicate by event id.
//!
//! # Index memory
//!
//! The index keeps no position per event. Each stream's positions are gap-encoded, a run of
//! consecutive ones as one token: a stream written in one go costs a few bytes whatever its
//! length, and events that interleave with other streams' at most 3 bytes each while fewer
//! than 8,192 other records come between two of a stream's (tested on a million events: 2.6
//! bytes each with 1,000 streams round-robin, where a `Vec` of positions took 8.3). Every
//! stream also costs its id plus at most 131 bytes of map entry and table slack. A lookup
//! decodes at most 64 tokens from the nearest checkpoint. Global positions need no index
//! (position = offset + 1).
//!
//! # Connections, reconnection, errors
//!
//! The transport holds two connections (publishing, consuming; RabbitMQ throttles
//! publishers per connection, and consumers should not wait for that), the store two
//! (appending, reading). When a connection drops or the broker restarts, the next
//! operation reconnects with exponential backoff ([`RabbitMqConfig::with_reconnect_backoff`]):
//!
//! - A publish (or nack, dead-letter, append) waiting for a broker that is down keeps
//!   trying for [`RabbitMqConfig::with_publish_timeout`] (30 s by default), then fails with a
//!   temporary [`Error::Backend`](orchestrator_core::Error::Backend). Messages of a batch
//!   that were not confirmed when the connection dropped are published again, so a publish
//!   never vanishes, but an event may arrive twice.
//! - A subscription re-declares its queue and bindings and consumes again, without end,
//!   until the transport is closed; deliveries that were in flight come back from the
//!   broker flagged as redelivered (settling them on the old channel reports a temporary
//!   error). Store readers and subscriptions resume at the offset after the last one read.
//!
//! Every broker failure is an `Error::Backend { backend: "rabbitmq", temporary, source }`;
//! `temporary` is true for lost connections and timeouts, false for refused access or a
//! queue declared with other arguments.
//!
//! # TLS
//!
//! Use an `amqps://` URL with the feature `rabbitmq-tls`, which enables lapin's rustls
//! support with the *ring* provider and the webpki root certificates (lapin's default TLS
//! builds aws-lc, a C library, which this crate avoids). Without the feature an `amqps://`
//! URL fails to connect.

mod config;
mod connection;
mod consumer;
mod dlq;
mod lease;
mod log;
mod store;
mod transport;
mod wire;

pub use config::{
    DEFAULT_EXCHANGE, DEFAULT_QUEUE_PREFIX, DEFAULT_STREAM, RabbitMqConfig, RabbitMqStoreConfig,
};
pub use dlq::{RabbitMqDeadLetterQueue, UNDECODABLE_EVENT_TYPE};
pub use lease::RabbitMqLease;
pub use store::{RABBITMQ_STORE_CAPABILITIES, RabbitMqEventStore};
pub use transport::RabbitMqTransport;
