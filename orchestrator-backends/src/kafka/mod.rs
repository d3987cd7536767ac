//! Kafka: [`KafkaTransport`], [`KafkaEventStore`] (with its [`KafkaLease`]) and
//! [`KafkaDeadLetterQueue`] (feature `kafka`).
//!
//! Built on rdkafka 0.39 with librdkafka compiled from its bundled source (no system
//! librdkafka needed; the build wants gcc, g++, make and python3). Works with any cluster that
//! speaks the Kafka protocol; nothing here depends on a particular broker.
//!
//! ```no_run
//! use orchestrator_backends::kafka::{KafkaConfig, KafkaTransport};
//! use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
//!
//! # async fn example() -> orchestrator_core::Result<()> {
//! let config = KafkaConfig::new("127.0.0.1:9092").with_prefix("shop.")?;
//! let transport = KafkaTransport::connect(config).await?;
//! let mut orders = transport
//!     .subscribe(SubscribeOptions::new("billing", "order.*")?)
//!     .await?;
//! let event = EventEnvelope::new("order.placed", &serde_json::json!({"id": "o-1"}))?
//!     .with_stream_id("order-o-1");
//! transport.publish("order.placed", event).await?; // Kafka topic `shop.order.placed`
//! if let Some(delivery) = orders.next().await? {
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Connecting: brokers, TLS and SASL
//!
//! [`KafkaConfig::new`] takes librdkafka's `bootstrap.servers` (`host:port,host:port`).
//! Everything else librdkafka knows passes through [`KafkaConfig::with_property`] (every
//! client), [`with_producer_property`](KafkaConfig::with_producer_property) and
//! [`with_consumer_property`](KafkaConfig::with_consumer_property), applied after the
//! backend's own settings:
//!
//! - TLS: `security.protocol=ssl`, `ssl.ca.location`, `ssl.certificate.location`,
//!   `ssl.key.location`, `ssl.key.password`, …;
//! - SASL: `security.protocol=sasl_ssl` (or `sasl_plaintext`), `sasl.mechanism`
//!   (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER`), `sasl.username`,
//!   `sasl.password`, ….
//!
//! A `kafka://` URL carries the same settings in its query ([`KafkaConfig::from_url`]; the
//! keys of [`URL_QUERY_KEYS`], unknown keys refused), which is how the builder's
//! `store_url` / `transport_url` and the CLI's `--store` / `--transport` reach a secured
//! cluster:
//! `kafka://b1:9093?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-256&sasl.username=app&sasl.password=…&ssl.ca.location=/etc/kafka/ca.pem`.
//!
//! librdkafka is built with the system's OpenSSL (Debian: `libssl-dev`, `pkg-config`), so
//! TLS and SASL `PLAIN`, `SCRAM-SHA-256/512` and `OAUTHBEARER` work out of the box; `GSSAPI`
//! (Kerberos) would need Cyrus SASL and is not built. Values of properties whose names
//! contain `password`, `secret`, `pem`, `jaas` or `oauthbearer.config` never appear in
//! `Debug` output or in errors ([`redact_url`] for URLs), and event payloads are never logged
//! (logs name events by id and type).
//!
//! # Topics, keys and names
//!
//! Every name starts with the configured prefix, written `<prefix>` here (default none;
//! [`KafkaConfig::with_prefix`]). Kafka topic names allow only ASCII letters, digits, `.`,
//! `_` and `-` (at most 249): in event topics and group names, every other byte — and `_`
//! itself — is written `_XX` in upper-case hex (`user_created` → `user_5Fcreated`,
//! `a:b` → `a_3Ab`). Dots stay dots.
//!
//! | Kafka topic | partitions | what |
//! |---|---|---|
//! | `<prefix><event topic>` | configured (3) | events published to that topic: `order.placed` → `<prefix>order.placed` |
//! | `<prefix>__orchestrator.retry.<group>` | configured (3) | one group's nacked, dropped and [`redeliver`](orchestrator_core::Transport::redeliver)ed messages |
//! | `<prefix>__orchestrator.retries.ephemeral` | configured (3) | the retries of every [ephemeral](orchestrator_core::SubscribeOptions::ephemeral) group, each message naming its group (header `orchestrator-group`) |
//! | `<prefix>__orchestrator.deadletters` | 1, compacted | dead letters, keyed by letter id |
//! | `<prefix>__orchestrator.events` | 1 | the event store's log ([`KafkaConfig::with_store_topic`]) |
//! | `<prefix>__orchestrator.lease.<name>` | 1, always empty | a [`KafkaLease`]: the consumer group of the same name assigns its partition to the holder |
//!
//! Consumer groups are named `<prefix><group>`; each group's retry topic is read in a group
//! named as the topic. Topics are created through the admin API
//! when first published to or subscribed to ([`KafkaConfig::with_partitions`],
//! [`with_replication_factor`](KafkaConfig::with_replication_factor)); clusters where topics
//! are provisioned separately turn that off with
//! [`with_create_topics(false)`](KafkaConfig::with_create_topics).
//!
//! **Message key** = the event's stream id, else its event id, so one stream keeps its order
//! (one partition). The partition is librdkafka's default partitioner's choice
//! (`consistent_random`: CRC32 of the key); set the producer property
//! `partitioner=murmur2_random` to place keys as Java clients do. One exception:
//! [`publish_batch`](orchestrator_core::Transport::publish_batch) sends the events of a batch
//! that have no stream id to one partition, chosen per batch, so that the batch is delivered
//! in order.
//!
//! # Wire format
//!
//! The wire contract every backend shares: the message value is the event as a CloudEvents 1.0
//! JSON object (structured mode, see [`orchestrator_core::cloudevents`]), with the headers
//! `content-type: application/cloudevents+json` and, when the event carries trace context,
//! `traceparent` (and `tracestate`). Any client can publish to an event topic. A message that
//! is not a valid CloudEvent (or has no value) is dead-lettered with the reason — its raw
//! value kept as an [`UNDECODABLE_EVENT_TYPE`] event (`application/octet-stream`) with the
//! headers `kafkatopic`, `kafkapartition` and `kafkaoffset` — and the consumer carries on.
//!
//! # Subscriptions and patterns
//!
//! Each [`subscribe`](orchestrator_core::Transport::subscribe) makes two librdkafka consumers
//! (assignment strategy `cooperative-sticky`): one of group `<prefix><group>` for the event
//! topics, and one of group `<prefix>__orchestrator.retry.<group>` for the group's retry
//! topic. Together they are subscribed to:
//!
//! - an exact pattern's topic (created if missing);
//! - for a pattern with wildcards, an anchored regular expression over topic names, which
//!   librdkafka matches against the cluster's topic list (POSIX extended syntax). Each
//!   segment maps as follows, with `SEG` = `([A-Za-z0-9-]|_[0-9A-F][0-9A-F])+` (one escaped
//!   segment, which never contains `__`, so the `__orchestrator` topics never match):
//!
//!   | pattern | regex |
//!   |---|---|
//!   | `user.created` | the topic `<prefix>user.created` itself, no regex |
//!   | `user.*` | `^<prefix>user\.SEG$` |
//!   | `order.#` | `^<prefix>order(\.SEG)*$` |
//!   | `#` | `^<prefix>(SEG(\.SEG)*)?$` |
//!   | `*.created` | `^<prefix>SEG\.created$` |
//!
//!   Literal segments are escaped as topic names are; dots in the prefix are escaped.
//!   Without a prefix, `#` matches every topic of the cluster that escaping could have
//!   produced, other applications' included: give each application a prefix.
//! - its group's retry topic.
//!
//! `subscribe` returns once the group has handed the new consumer its partitions, so events
//! published afterwards reach the group. A group with no committed offset on a partition
//! reads it **from the earliest offset** (`auto.offset.reset=earliest`): a new group also
//! receives what a topic already held, and — the point — a topic that appears after the
//! subscription is read from its first event, so nothing published to a new matching topic
//! is missed while the consumer has not yet noticed it. A consumer notices new topics when
//! this process creates one (it refreshes at once) or at the latest after
//! [`KafkaConfig::with_metadata_refresh_interval`] (5 s). Several subscriptions of one group
//! share the partitions; with more consumers than partitions, some stay idle.
//!
//! An [ephemeral](orchestrator_core::SubscribeOptions::ephemeral) group commits no offsets
//! and has no retry topic of its own, so it leaves nothing on the broker however its process
//! ends (an empty group without offsets is dropped by the coordinator). It places each
//! partition it is assigned itself: at the partition's end offset when `subscribe` was
//! called (read before joining, so nothing published after `subscribe` returns is missed,
//! and none of the topic's history is delivered), later after the last message it settled,
//! and a topic that appears later from its start. Its retries go through the retry topic all
//! ephemeral groups share; each reads it from where it stood at `subscribe` and skips the
//! messages of other groups. A dead letter of an ephemeral group cannot be
//! [`redeliver`](orchestrator_core::Transport::redeliver)ed to it (there is no group
//! retry topic: `Error::NotFound`).
//!
//! A consumer reads ahead: up to `prefetch` deliveries wait for the application; beyond that
//! it stops taking messages from librdkafka (whose own prefetch queue bounds memory) until the
//! application catches up. Group rebalances are served while it takes messages, so a
//! subscription whose deliveries nobody reads for longer than librdkafka's
//! `max.poll.interval.ms` (5 minutes) is dropped from its group, as any Kafka consumer that
//! stops polling; its partitions go to the group's other consumers.
//!
//! # Offsets: at-least-once
//!
//! Offsets are committed only for settled deliveries (acked, nacked into the retry topic, or
//! dead-lettered). Per partition, the consumer tracks the deliveries in flight and commits
//! only the end of the run of settled ones from the oldest — an ack that overtakes an
//! earlier, unsettled delivery never commits past it. Settled offsets go to librdkafka's
//! offset store (`enable.auto.offset.store=false`) and are committed every
//! [`KafkaConfig::with_commit_interval`] (1 s), when partitions are revoked in a rebalance,
//! and when the subscription is dropped. A consumer that dies redelivers, to the group's next
//! consumer, whatever it had not committed: duplicates, never losses. When a partition moves
//! to another consumer, deliveries of it still held here settle into nothing (their messages
//! come back from the committed offset) and those not yet handed out are dropped; a
//! rebalance never commits an offset past an unsettled delivery, nor twice.
//!
//! # Nacks, retries and dead letters
//!
//! A nack produces the message to its group's retry topic, with the headers
//! `orchestrator-topic` (the event topic), `orchestrator-attempt` (the next attempt),
//! `orchestrator-first-attempt-at` (RFC 3339), `orchestrator-last-error` (the nack's reason)
//! and `orchestrator-due-at` (ms since the epoch), and then settles the original delivery —
//! so a long delay never blocks the partition. The group's consumers read the retry topic
//! like any other and hold each message until it is due (at most
//! [`KafkaConfig::with_max_delayed`] at once; past that the retry topic is paused). A retried
//! message is delivered after the events published meanwhile: per-key order holds for first
//! deliveries, not across retries. A [`Delivery`](orchestrator_core::Delivery) dropped
//! without being settled is nacked with no delay from its `Drop`, and so comes back; a nack
//! or dead-letter that fails (broker away) is retried from `Drop` until it succeeds.
//! [`redeliver`](orchestrator_core::Transport::redeliver) produces to the retry topic of one
//! group, attempt 1, due at once; a group without a retry topic has never subscribed and is
//! [`NotFound`](orchestrator_core::Error::NotFound).
//!
//! Dead letters go to [`KafkaDeadLetterQueue`]; see there for their format and how removal
//! works on an append-only log (tombstones on a compacted topic). To reprocess a letter,
//! `redeliver` its event to its subscription and `remove` it.
//!
//! # The event store
//!
//! [`KafkaEventStore`] keeps every stream in one log topic with **one partition**, so that
//! the log has one order:
//!
//! - **global position = offset + 1** (Kafka offsets start at 0, positions at 1); positions
//!   are stable, strictly increasing and comparable across streams (gaps are possible where
//!   a cluster skips offsets, e.g. transaction markers). One partition also means one broker
//!   takes every write: the store's write throughput is that of one partition.
//! - **stream version** = the event's rank among the records of its stream (the key), in log
//!   order. The store reads the log's keys into an in-memory index (stream → positions) on
//!   first use and keeps it up to date; versions therefore have no gaps and agree for every
//!   reader, however many processes append. A process's own appends are indexed from their
//!   delivery reports, without reading them back: one task takes the reports in the order
//!   the records were produced (on one partition, with an idempotent producer, their order
//!   in the log) and reads the log only for other writers' records in between — so many
//!   appends are in flight at once (64 concurrent single-event appends: 0.98× raw rdkafka
//!   producing the same records, BENCHMARKS.md). The JSON written carries the
//!   `streamid` extension but no `streamversion` or `globalposition`: those come from the log.
//! - **index memory**: the index keeps no offset per event. Each stream's positions are
//!   gap-encoded, a run of consecutive ones as one token: a stream written in one go costs a
//!   few bytes whatever its length, and events that interleave with other streams' at most 3
//!   bytes each while fewer than 8,192 other records come between two of a stream's (tested
//!   on a million events: 2.6 bytes each with 1,000 streams round-robin, where a `Vec` of
//!   offsets took 8.3). Every stream also costs its id plus at most 131 bytes of map entry and
//!   table slack. A lookup decodes at most 64 tokens from the nearest checkpoint. Global
//!   positions need no index (position = offset + 1).
//! - **capabilities** ([`KAFKA_STORE_CAPABILITIES`]): `durable` and `read_stream` (by the
//!   index: only the stream's own records are decoded). Not `expected_version`: Kafka cannot
//!   make a write conditional on what the log holds, so `ExpectedVersion::Exact`, `NoStream`
//!   and `StreamExists` return [`Unsupported`](orchestrator_core::Error::Unsupported) (only
//!   `Any` appends); and not `atomic_batch`: the records of one append are produced one by
//!   one (idempotently, in order), and another writer's records may land between them.
//!   Not `idempotent_append` either: the index could tell that a stream already holds an
//!   event id, but looking it up and producing the records are two steps that other
//!   processes' appends (and this process's other appends of the same events) can come
//!   between, and the index sees other processes' records only once it has read them; a
//!   check there would catch some retries and let others be written twice, which is worse
//!   than a capability the application knows it lacks. An append sent again is written
//!   again: deduplicate by event id when reading (a projection keyed by event id, say).
//! - **retention**: the log must keep every record — versions are ranks in it, so records
//!   the broker deletes (retention, 7 days on Apache Kafka's defaults) or compacts away would
//!   make events vanish and renumber the rest. The store creates its topic with
//!   `retention.ms=-1`, `retention.bytes=-1` and `cleanup.policy=delete`, and checks the
//!   topic's settings (DescribeConfigs) each time it connects: a topic with finite retention
//!   or compaction is refused with `Error::InvalidInput` naming the settings, unless
//!   [`KafkaConfig::with_finite_store_retention`] accepts it.
//! - `read_all` reads the log from the position on, filters, and stops at the limit;
//!   `subscribe` reads it from the position on and goes on reading live — one reader, so no
//!   gap and no duplicate at the hand-over.
//!
//! # Leases: one relay per store
//!
//! [`KafkaEventStore::lease`](orchestrator_core::EventStore::lease) returns a
//! [`KafkaLease`], so that of the processes sharing a Kafka store one at a time runs the
//! outbox relay (and any other work that must run once per store). It is kept by Kafka's own
//! group coordination, with no extra service: every candidate joins the consumer group
//! `<prefix>__orchestrator.lease.<name>`, subscribed to the one-partition topic of the same
//! name (created like the other topics; it stays empty), and the member that the group
//! assigns partition 0 holds the lease (assignor `cooperative-sticky`: candidates joining
//! never move it). A holder renews by committing an offset in its current generation, which
//! the coordinator accepts only from a live member of that generation, so a holder that was
//! expelled learns it at its next renewal.
//!
//! | event | the lease |
//! |---|---|
//! | the holder releases it, shuts down or drops it | leaves the group: a standby gets the partition in the rebalance that follows |
//! | the holder's process dies (SIGKILL, a crash) or is cut off | the coordinator expels it after the session timeout ([`KafkaConfig::with_lease_session_timeout`], 6 s), then a standby gets it; where the coordinator does not (tansu 0.6.0: see below), a standby that sees no renewal for three session timeouts moves the lease to the next epoch's group and takes it there |
//! | the holder's process hangs but its librdkafka threads run | it leaves the group after three session timeouts without a poll |
//!
//! Holders renew, and standbys look, every third of the session timeout (the lease's
//! [`ttl`](orchestrator_core::Lease::ttl)). As with any lease, a holder acts on what it last
//! heard: between the moment it is expelled and its next renewal, it may still relay
//! while its successor has started (deliveries are at least once anyway).
//!
//! # Producer
//!
//! One idempotent producer (`enable.idempotence=true`: acks from all in-sync replicas,
//! retries without duplicates or reordering) per transport or store. `publish` returns once
//! the broker acknowledged the event; `publish_batch` queues every event, then awaits every
//! acknowledgement.
//!
//! # Errors
//!
//! librdkafka failures are [`Backend`](orchestrator_core::Error::Backend) errors with
//! `backend: "kafka"`; `is_temporary()` is false only for what a retry cannot fix
//! (configuration, authorisation, invalid topics, oversized messages).
//!
//! # Tested against tansu
//!
//! The tests run against [tansu](https://crates.io/crates/tansu) 0.6.0, an Apache-2.0
//! Kafka-protocol broker with its sqlite storage: `cargo xtask test-all` starts one per run
//! in a fresh folder; the broker-restart test and fault scenarios start their own, whose
//! acknowledged records survive a SIGKILL of the broker (its write-ahead log is committed
//! before a produce is answered; the restart test reads the topic back to prove it).
//! rdkafka produces idempotently, consumes in groups with the cooperative-sticky assignor,
//! commits offsets, subscribes by regex and creates and deletes topics through the admin API
//! with it; the backend relies on nothing tansu-specific. What tansu does differently from Apache Kafka, and how this backend and
//! its tests allow for it:
//!
//! - **Topics are never auto-created**: the backend creates every topic it uses through the
//!   admin API (as production clusters with auto-creation off require anyway), and waits
//!   until metadata shows a new topic before using it.
//! - **Fetching a topic that was deleted** gets an `UNKNOWN_TOPIC_OR_PARTITION` answer that
//!   also carries a "current leader" tag and an all-zero topic id, which Apache Kafka does not
//!   send. librdkafka 2.12 then builds a metadata update for a topic without a name and
//!   crashes the process (a null `strcmp` in its leader-discovery path). So topics must only
//!   be deleted once nobody fetches them: [`KafkaTransport::delete_all_topics`] and
//!   [`KafkaEventStore::delete_topic`] first wait until this process's subscriptions under
//!   the prefix have closed, and close their own log readers (the store's, the dead-letter
//!   queue's) — unassigning a partition stops its fetcher only asynchronously, so a store
//!   that had just read its log crashed when it deleted it.
//! - **Creating a topic that exists** fails with `TOPIC_ALREADY_EXISTS` as it should, but
//!   leaves a transaction open on one of tansu's pooled sqlite connections; later reads on
//!   that connection see a stale snapshot, a fetch of a newer topic finds no watermark, and
//!   tansu's storage task panics (`more or less than one row`) — after which the broker
//!   answers every request that needs storage with an error until it is restarted. So the
//!   backend asks the cluster's metadata before creating a topic and only creates what is
//!   missing (two processes creating one topic at the same moment can still hit it; `cargo
//!   xtask services up` restarts a tansu in that state, since its probe sends a `Metadata`
//!   request, which needs storage). The tests run their Kafka cases one at a time per test
//!   binary and delete their topics only after their consumers have closed.
//! - **Joining is slow**: a consumer's first assignment takes a few seconds (the group
//!   coordinator waits for members to rejoin), which is why `subscribe` waits for it and why
//!   the suites take tens of seconds.
//! - **A group whose leader dies without leaving never re-forms.** When a heartbeat finds a
//!   member's session expired, tansu removes the member but keeps it as the group's leader;
//!   every later `SyncGroup` of the members left is answered `REBALANCE_IN_PROGRESS` while
//!   it waits for that leader's assignment, and since joining and syncing do not count as
//!   contact, the members re-joining in that loop are expelled in turn. For a
//!   [`KafkaLease`] this means: on tansu, a holder that releases the lease, shuts down or is
//!   dropped (it leaves the group) is replaced within about a second, and a holder that is
//!   expelled learns it at its next renewal, but a holder killed without leaving — the
//!   group's leader, as the first member usually is — is never replaced *by the group*. The
//!   lease's epochs get around it: a standby that sees no renewal for three session
//!   timeouts moves the lease to a fresh group (`…lease.<name>.epoch<n>`), so on tansu a
//!   killed holder is replaced after about 18 s (measured: 18.1 s) instead of never; on
//!   Apache Kafka the coordinator expels it after one session timeout and the epoch stays.
//!   tansu also accepts offset commits without
//!   checking the member or its generation, so there a renewal's commit confirms nothing
//!   (the member's own view, which librdkafka revokes when its session times out, decides).
//! - **Transactions are half there.** A transactional producer (`transactional.id`) gets
//!   its producer id from `InitProducerId`, and a second producer initialising the same id
//!   fences the first: the zombie's next produce fails with "There is a newer producer with
//!   the same transactionalId which fences the current one". But tansu does not offer
//!   `EndTxn` (librdkafka: "EndTxnRequest (KIP-98) not supported by broker, requires broker
//!   version >= 0.11.0"), so no transaction can be committed or aborted, and records written
//!   in a transaction are visible at once, even to `isolation.level=read_committed`. Exact
//!   expected versions through a single fenced transactional writer therefore cannot be
//!   built or tested here; the store stays without the `expected_version` capability.
//!
//! And what librdkafka does that the backend works around, whatever the broker:
//!
//! - a consumer whose regex matches no topic does not join its group at all, so `subscribe`
//!   only waits for the assignment when some topic matches (a topic that appears later is
//!   read from its first offset);
//! - closing a group consumer blocks for as long as the cluster is unreachable (there is no
//!   close timeout), so consumers are closed on a thread of their own: neither the async
//!   threads nor a runtime shutting down wait for it;
//! - the cooperative-sticky assignor balances partition *counts* over all subscribed topics,
//!   so a group's retry topic is read by a second consumer in a group of its own
//!   (`<prefix>__orchestrator.retry.<group>`), never taking one consumer's share of the event
//!   topics.

mod client;
mod config;
mod consumer;
mod delivery;
mod dlq;
mod lease;
mod live;
mod names;
mod offsets;
mod reader;
mod store;
mod transport;
mod url;
mod wire;

pub use config::{DEFAULT_LEASE_SESSION_TIMEOUT, DEFAULT_PREFIX, KafkaConfig};
pub use dlq::KafkaDeadLetterQueue;
pub use lease::KafkaLease;
pub use store::{KAFKA_STORE_CAPABILITIES, KafkaEventStore};
pub use transport::KafkaTransport;
pub use url::{URL_QUERY_KEYS, redact_url};
pub use wire::UNDECODABLE_EVENT_TYPE;
