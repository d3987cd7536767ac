//! PostgreSQL (feature `postgres`): [`PostgresEventStore`], with the [`PostgresLease`] and the
//! durable [`PostgresInbox`] the store hands out, and [`PostgresTransport`] with its
//! [`PostgresDeadLetterQueue`].
//!
//! Requires PostgreSQL 11 or later (`starts_with`, `GENERATED … AS IDENTITY`); tested on 15.
//!
//! ```
//! use orchestrator_backends::postgres::PostgresConfig;
//!
//! // Building a config parses the URL; nothing connects yet.
//! let config = PostgresConfig::new("postgres://app:secret@127.0.0.1:5432/shop")?
//!     .with_schema("shop_events")?;
//! assert_eq!(config.redacted_url(), "postgres://app:***@127.0.0.1:5432/shop");
//! // Then: PostgresEventStore::connect(config).await?
//! # Ok::<(), orchestrator_core::Error>(())
//! ```
//!
//! # Connecting
//!
//! [`PostgresConfig::new`] takes a libpq-style URL (`postgres://user:password@host:port/db`,
//! `postgresql://…`, options such as `?connect_timeout=5&application_name=shop`) or a
//! `key=value` string (`host=/var/run/postgresql dbname=shop`, a Unix socket).
//!
//! The client is [tokio-postgres](https://docs.rs/tokio-postgres) pooled by
//! [deadpool-postgres](https://docs.rs/deadpool-postgres): async on tokio like the rest of
//! the project, small (no ORM, no macros), with request pipelining (an append sends
//! `BEGIN`, its statement and `COMMIT` in one round trip) and a per-connection statement
//! cache; and, unlike sqlx's checked queries, it needs no database and no offline query
//! data at build time. Statements are prepared once per connection and kept.
//!
//! Passwords never appear in logs, errors or `Debug` output
//! ([`PostgresConfig::redacted_url`]); event payloads are never logged.
//!
//! **Statement timeout**: [`PostgresConfig::with_statement_timeout`] (or
//! `?statement_timeout=5s` in the URL, this backend's parameter) has the server cancel any
//! statement of the backend's sessions that runs longer, waits for locks included. The
//! statement writes nothing; its error is a temporary
//! [`Backend`](orchestrator_core::Error::Backend) error whose source is a
//! [`PostgresStatementTimeout`], and the connection goes back to the pool, usable.
//!
//! A failed statement is not retried by the backend; its error is a
//! [`Backend`](orchestrator_core::Error::Backend) error with `backend: "postgres"` whose
//! `is_temporary()` says whether retrying can help (a broken connection, a server starting
//! or shutting down). Retrying an append is safe: appends are idempotent by event id. Broken
//! pooled connections are replaced on their next use. Subscriptions retry on their own.
//!
//! # TLS
//!
//! With the `postgres-tls` feature, connections speak TLS through rustls (ring provider),
//! as the URL's `sslmode` says, with libpq's meanings:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | not checked |
//! | `require` | always | not checked: encrypted against eavesdropping, but not proof of whom you talk to |
//! | `verify-ca` | always | must chain to a root of `sslrootcert=PATH` (PEM) or `PostgresConfig::with_tls_root_certificates`; the name is not checked |
//! | `verify-full` | always | the chain, and it must be for the host connected to |
//!
//! As with libpq and a root file, `prefer` and `require` check the chain when roots are
//! given. Every connection uses it — the pool's and the one that `LISTEN`s. There is no
//! channel binding (SCRAM authenticates without it) and no client certificate. Without the
//! feature, connections are plain text and the modes that require TLS (and `sslrootcert`)
//! are refused with [`Error::Unsupported`](orchestrator_core::Error::Unsupported) naming it.
//!
//! # Tables
//!
//! Everything lives in one schema ([`PostgresConfig::with_schema`], default
//! `orchestrator`), created on connect when missing (so the user needs `CREATE` on the
//! database the first time, or else a schema created for it by an administrator, on which
//! it has `CREATE` and `USAGE`):
//!
//! | table | what |
//! |---|---|
//! | `migrations` | `version`, `description`, `applied_at`: the migrations applied |
//! | `events` | one row per event: `position` (global position, primary key), `stream_id`, `stream_version`, `event_id`, `event_type`, `event_time`, `recorded_at`, `event` (the CloudEvents 1.0 JSON, `json`, as stored: with the extensions `streamid`, `streamversion`, `globalposition`); unique `(stream_id, stream_version)` and `(stream_id, event_id)`; indexes on `(event_type, position)` and `event_time` |
//! | `inbox` | a [`PostgresInbox`]: `group_name`, `event_id` (key), `seq`, `recorded_at` |
//! | `leases` | a [`PostgresLease`] per row: `name` (key), `holder` (the holder's token), `expires_at` |
//! | `transport_subscriptions` | a [`PostgresTransport`] group's patterns: `group_name`, `pattern`, `regex` (the pattern as a regular expression), `ephemeral` |
//! | `transport_queue` | one row per (group, published event): `id` (identity, the delivery order), `group_name`, `topic`, `event` (the CloudEvents 1.0 JSON, `text`), `attempt`, `first_attempt_at`, `last_error`, `not_before` (due time), `locked_until` (claimed until) |
//! | `read_model_documents` | a [`PostgresReadModelStore`]'s documents: `read_model`, `key` (together the key), `document` (`jsonb`), `updated_at` |
//! | `read_model_positions` | each read model's position: `read_model` (key), `position` (the last event applied), `updated_at` |
//! | `dead_letters` | the [`PostgresDeadLetterQueue`]: `seq` (identity, oldest first), `id` (the letter's id, unique), `event_type`, `subscription`, `letter` (the letter's JSON), `dead_at` |
//!
//! **Migrations** are versioned: each runs once, in one transaction with its row in
//! `migrations`, under a transaction-scoped advisory lock of the schema, so processes that
//! start at once queue on the lock and all but the first find nothing to do. A schema
//! newer than the library is refused rather than written in a shape the library does not
//! know. Any client can read the tables; write events only through the library, which keeps
//! the order below.
//!
//! # The event store
//!
//! **Appends are group-committed.** Each store has one writer task: an append is encoded,
//! queued, and carried by the next transaction, which takes every append queued while the
//! previous one was in flight (up to 512 appends or 10,000 events; several streams, each with
//! its own expected version and ids). A transaction is one round trip: `BEGIN`,
//! `SELECT … FROM <schema>.append_batch(…)` and `COMMIT`, pipelined. The function (installed
//! by migration 3) takes the schema's append lock (`pg_advisory_xact_lock`) and then, for each
//! append in turn, exactly what a lone append does: it answers "some of these ids are in the
//! stream" or "the expected version fails" for that append without writing it, or else
//! writes it with one `INSERT … SELECT FROM unnest(…)` — each row's JSON completed with its
//! version and position. It returns a row per append, and `pg_notify`s the store's channel
//! once. Appends of one transaction see the ones before them (a second append to a stream
//! expects the version the first left), so each caller gets exactly the result — and the
//! typed error, [`WrongExpectedVersion`](orchestrator_core::Error::WrongExpectedVersion) or
//! [`DuplicateEvent`](orchestrator_core::Error::DuplicateEvent) — it would have had alone, in
//! the order the writer ran them. If the server refuses the transaction as a whole (a
//! trigger of yours, a row written without the lock), nothing of it was written and each of
//! its appends is run again alone, so one failing append fails alone. An append, once queued,
//! is carried out even if its caller stops waiting. When ids were found, the library then
//! tells a retry (the original result is returned) from a clash
//! ([`DuplicateEvent`](orchestrator_core::Error::DuplicateEvent)) by the rules every store
//! follows ([idempotent appends](orchestrator_core::store#idempotent-appends)); stored rows
//! never change, so that needs no lock. The unique constraints back the checks up against
//! writers that bypass the lock. The append lock is
//! `pg_advisory_xact_lock(1330791233, hashtext('<schema>'))` (the first key is `'ORCA'` in
//! ASCII); migrations take `(1330791245, hashtext('<schema>'))` (`'ORCM'`). A tool that must
//! write rows itself takes the append lock first, in the same transaction. (Migration 2's
//! `append_events`, one append per call, stays installed for schemas shared with older
//! builds.)
//!
//! **The global order is gap-safe.** Positions are `max(position) + 1 …`, read *after* the
//! append lock is taken, and the lock is released only when the transaction has committed
//! (or rolled back) and its rows became visible. So appends take positions in the order they
//! commit: when a reader sees position *p*, every position below *p* is already visible, and
//! a subscription that reads "after the last position I handed over" can never step over an
//! event that a slower concurrent transaction commits later — the sequence-gap bug of
//! stores that take positions from a `SEQUENCE` or an identity column (which hand numbers
//! out at insert, not at commit). A rolled-back append leaves no hole either: the next
//! append takes the same positions.
//!
//! **The cost**: appends to one schema are serialised from the lock to the end of the commit,
//! whatever their streams, so transactions cannot share a WAL flush (PostgreSQL's group
//! commit): a schema commits about one transaction per flush. Group commit is the answer
//! within a process — concurrent appends share a transaction and its flush — but appends from
//! several processes still take turns. Measured with `benches/postgres.rs` (release build,
//! 200-byte payloads, `synchronous_commit = on`, a loaded 2-core machine whose WAL flush time
//! varied from 0.3 to 3 ms during the runs) against raw tokio-postgres `BEGIN; INSERT;
//! COMMIT` into a table with the same columns, indexes and unique version check, in the same
//! run: 16 concurrent writers, 10,975 appends/s against 7,526 raw (1.48×, raw's table then
//! without the two secondary indexes) and 18,382 against
//! 9,116 (2.02×) while flushes were fast, but 2,000–3,100 against 5,400–8,400 raw (0.28–0.58×)
//! while they were slow (there, one transaction of 16 rows costs ~1.5× a one-row one, and
//! 16 raw connections flush in parallel); before group commit it was 390/s against 3,220
//! (0.12×). One writer, 0.55–1.17× (it pays the lock, the checks and the writer hop and
//! cannot batch); 100-event batches, 18,000–72,700 events/s, 0.38–0.95× raw (the library
//! also encodes each event to CloudEvents JSON, which raw does before its clock starts).
//! `read_all` of 20,000 events in pages of 1,000: 107,000–211,000 events/s, 0.53–0.79× raw
//! SELECTs of the same pages that do not decode the JSON (the library asks for the next
//! page while it decodes one); a subscription's catch-up over them, 104,000–209,000/s
//! (0.43–0.87×). Measured before group commit: a subscription at about 1k
//! events/s sees an event 1.4 ms (median) and 13 ms (p99) after its append was called.
//! Reads and subscriptions never take the lock. Batches amortise it (one lock and one flush
//! per batch); writers in several processes that need more appends per second shard by
//! schema (one store each). The alternative — positions from a sequence, and readers that
//! wait out in-flight transactions below a high-water mark — writes in parallel but delays
//! every subscriber by the slowest open transaction, and needs care with the transaction-id
//! horizon; the lock is simpler to get right, and its cost is measurable (BENCHMARKS.md).
//!
//! **Reads** are index range scans: by `(stream_id, stream_version)` for a stream, by
//! `position` for the global order. Filters are applied in SQL (types, stream prefix, time
//! bounds loosened to the microsecond that `timestamptz` keeps) and then exactly on the
//! decoded events, paging until the limit is met.
//!
//! **Subscriptions** catch up with range reads of `events` and then follow, always reading
//! after the last position handed over, so there is no gap and no duplicate at the
//! hand-over. They are woken by `NOTIFY` on the channel [`PostgresEventStore::channel`]
//! (`orchestrator_events_<hash of the schema>`), heard on one connection per store that
//! `LISTEN`s and reconnects on its own, and every [`PostgresConfig::with_poll_interval`]
//! (500 ms) in any case: a notification lost while that connection reconnects delays a
//! subscriber by at most that interval and never loses an event.
//!
//! # Leases and the inbox
//!
//! [`PostgresEventStore::lease`](orchestrator_core::EventStore::lease) hands out a
//! [`PostgresLease`] (a row in `leases`, 5 s time to live) and
//! [`inbox`](orchestrator_core::EventStore::inbox) a [`PostgresInbox`] (rows in `inbox`),
//! both in the store's schema and on its pool.
//!
//! # Read models: exactly once
//!
//! A [`PostgresReadModelStore`] ([`PostgresEventStore::read_model_store`], or
//! [`PostgresReadModelStore::connect`]) keeps a read model's documents (`jsonb`) and its
//! position in the tables `read_model_documents` and `read_model_positions` (migration 5).
//! It has transactions: the read model's projection (`orchestrator-cqrs`) applies each event
//! in one, on one connection, and commits the event's writes with its position. A crash
//! before the commit loses both, and the restart resumes at that event; so every event is
//! applied once, and none is skipped. A second runner of the same read model waits on the
//! position's row lock, then finds the event applied and steps aside.
//!
//! # The transport
//!
//! [`PostgresTransport::connect`] migrates the same schema as the store (a store and a
//! transport may share one schema or use two). Messages travel as CloudEvents 1.0 JSON
//! (structured mode), like on every backend.
//!
//! - **Subscribing** records the group's patterns in `transport_subscriptions`, each with its
//!   regular expression ([`TopicPattern::to_regex`](orchestrator_core::TopicPattern::to_regex):
//!   `*` one segment, `#` any depth, the same meaning as on every transport). Once
//!   `subscribe` has returned, the group receives every event published afterwards, by any
//!   process.
//! - **Publishing** is one statement (its own transaction): it inserts one row per group
//!   whose patterns match the topic (`topic ~ regex`), in the order of the events, and
//!   `NOTIFY`s the transport's channel ([`PostgresTransport::channel`]) at commit. A topic
//!   nobody subscribes to stores nothing. A batch is one statement.
//! - **Consuming**: each consumer has a task that claims due rows of its group, oldest first
//!   (`SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`, then `locked_until = now() +`
//!   the visibility timeout), as many as the consumer has room for (its prefetch), once it
//!   has room for half of it (not a claim per delivery handled), so the consumers of a group
//!   compete for rows and never get the same one. Idle, it waits for a
//!   notification of the channel (one `LISTEN` connection per transport), for the next row
//!   of the group to fall due (a nack's delay, an expiring lock), or for the poll interval
//!   ([`PostgresConfig::with_poll_interval`]), whichever is first: a lost notification delays a
//!   delivery, never loses it.
//! - **Settling**: an ack deletes the row, and returns once it is deleted; the acks of a
//!   subscription that come while one is being written wait and go together, in one
//!   `DELETE … WHERE id = ANY(…)`, so handlers that ack concurrently share statements; a nack makes it due again after its delay
//!   (`not_before`) as its next attempt, with the reason as its last error; a dead letter
//!   deletes the row and inserts the letter in `dead_letters`, in one statement; a delivery
//!   dropped unsettled is made due again at once. A consumer that dies without settling
//!   (its process killed) holds its rows until their visibility timeout
//!   ([`PostgresTransport::with_visibility_timeout`], default 30 s), after which any consumer
//!   of the group gets them as their next attempt. So delivery is at least once: a handler
//!   slower than the visibility timeout sees its event again — and the timeout runs from the
//!   claim, which is made up to the consumer's prefetch deliveries ahead of its handler, so
//!   keep prefetch × handling time under it.
//! - **Commits**: a publish commits as the server is configured (`synchronous_commit`, on
//!   by default): once `publish` returns, the rows survive a server crash. A consumer's
//!   statements (claims, acks, nacks, releases, dead letters) run on a second pool whose
//!   sessions commit with `synchronous_commit = off`, each its own transaction, without
//!   waiting for the WAL flush: a server crash can lose
//!   the last few of them, whole, which puts their rows back as they were — delivered again,
//!   never lost. Measured with `benches/postgres.rs` against raw tokio-postgres doing the
//!   same statements in the same run (a 2-core machine with a build running beside it, so
//!   the ranges are wide): publish one at a time, 0.72–0.75× (~2,900/s) when the WAL
//!   flushes fast and about 1× when it flushes slowly (the fan-out to matching groups and
//!   the notification cost ~90 µs per publish that raw's INSERT does not pay; BENCHMARKS.md
//!   has the runs); consume acking each
//!   delivery before the next, 0.46–0.78× (4,300–6,200/s, raw claiming 100 at a time and
//!   deleting each row autocommitted in a `synchronous_commit = off` session: 6,500–12,200/s);
//!   with 100 acks in flight, 0.41–0.49× (24,000–32,000/s, raw deleting the 100 claimed
//!   rows in one statement: 59,000–66,000/s).
//! - **Order**: one consumer receives a group's events in publish order (per key and overall)
//!   until a nack or an expired lock puts one back; competing consumers share the order.
//! - A row that holds no valid event (written by hand: not JSON, not a CloudEvent, over
//!   [`PostgresConfig::with_max_event_size`]) is dead-lettered with the reason, its bytes
//!   kept as the letter's payload, and the consumer goes on.
//! - **Ephemeral groups** lose their subscriptions and rows when their stream is dropped;
//!   a process that dies first leaves them behind (remove them with SQL:
//!   `DELETE FROM <schema>.transport_subscriptions WHERE ephemeral`).
//! - **What survives a restart**: everything published and not yet acked, every dead letter
//!   and every durable subscription — they are rows, as durable as PostgreSQL's commits.

mod commit;
mod config;
mod conn;
mod follow;
mod inbox;
mod lease;
mod read_model;
mod schema;
mod store;
#[cfg(feature = "postgres-tls")]
mod tls;
mod transport;

pub use config::{DEFAULT_POLL_INTERVAL, DEFAULT_POOL_SIZE, DEFAULT_SCHEMA, PostgresConfig};
pub use conn::PostgresStatementTimeout;
pub use inbox::PostgresInbox;
pub use lease::PostgresLease;
pub use read_model::PostgresReadModelStore;
pub use store::PostgresEventStore;
pub use transport::{DEFAULT_VISIBILITY_TIMEOUT, PostgresDeadLetterQueue, PostgresTransport};
