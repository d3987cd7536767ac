//! Redis Streams: [`RedisEventStore`], [`RedisTransport`] and [`RedisDeadLetterQueue`]
//! (feature `redis`), with the [`RedisLease`] and the durable [`RedisInbox`] the store hands
//! out.
//!
//! Requires Redis 6.2 or later (`XAUTOCLAIM`, exclusive ranges); single-node or
//! primary/replica deployments — Redis Cluster is not supported, because the store's append
//! script touches keys that would live in different slots.
//!
//! ```
//! use std::time::Duration;
//! use orchestrator_backends::redis::RedisConfig;
//!
//! // Building a config parses the URL; nothing connects yet.
//! let config = RedisConfig::new("redis://app:secret@127.0.0.1:6379/0")?
//!     .with_prefix("shop:")
//!     .with_claim_min_idle(Duration::from_secs(60));
//! assert_eq!(config.prefix(), "shop:");
//! assert_eq!(config.redacted_url(), "redis://app:***@127.0.0.1:6379/0");
//! // Then: RedisEventStore::connect(config.clone()).await?, RedisTransport::connect(config).await?
//! # Ok::<(), orchestrator_core::Error>(())
//! ```
//!
//! # Connecting: URLs, AUTH and TLS
//!
//! [`RedisConfig::new`] takes a redis-rs URL:
//!
//! - `redis://host:port/db` — plain TCP;
//! - `redis://:password@host:port` or `redis://user:password@host:port` — `AUTH` (with an ACL
//!   user in the second form) on every connection, reconnections included;
//! - `rediss://user:password@host:port/db` — TLS, with the `redis-tls` feature (rustls with
//!   the ring provider; without the feature [`RedisConfig::new`] refuses `rediss://` with
//!   [`Error::Unsupported`](orchestrator_core::Error::Unsupported) naming it). The server's
//!   certificate is checked against the system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR`
//!   are honoured, which is how the CLI trusts a private CA), or against the CAs given to
//!   `RedisConfig::with_tls_root_certificates`; `RedisConfig::with_tls_client_certificate`
//!   adds a client certificate (mutual TLS). `#insecure` URLs (no certificate check) are
//!   not supported.
//!
//! Passwords never appear in logs or `Debug` output ([`RedisConfig::redacted_url`]); event
//! payloads are never logged either — logs name events by id and type only.
//!
//! Commands go through one `redis::aio::ConnectionManager` per store or transport, which
//! reconnects on its own; a command that fails on a connection error (Redis restarting, a
//! network blip, `LOADING` after a restart) is retried with exponential backoff for up to
//! [`RedisConfig::with_retry_for`] (30 s by default) before the error — a
//! [`Backend`](orchestrator_core::Error::Backend) error with `backend: "redis"` whose
//! `is_temporary()` says whether retrying can help — reaches the caller. Every subscription
//! reads on a connection of its own, so blocking reads never hold up other commands, and it
//! reconnects and carries on for as long as it lives.
//!
//! # Keys
//!
//! Every key starts with the configured prefix, written `<prefix>` here (default
//! `orchestrator:`, so the global stream is `orchestrator:all`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `<prefix>stream:<stream id>` | stream | one event stream; entry id `0-<stream version>`, fields `type`, `event`, `id` (event id), `position` (global position) |
//! | `<prefix>stream-ids:<stream id>` | hash | event id → stream version, for every event of the stream |
//! | `<prefix>all` | stream | every stored event in global order; entry id `0-<global position>`, fields `type`, `event` |
//! | `<prefix>position` | string | the last global position handed out |
//! | `<prefix>topic:<topic>` | stream | one transport topic; fields `type`, `event`; one consumer group per subscribing group; [trimmed](#trimming-topic-streams) of what every group acknowledged |
//! | `<prefix>topics` | set | every topic published or subscribed to |
//! | `<prefix>patterns` | set | `"<group> <pattern>"` for every pattern a group subscribed to |
//! | `<prefix>retry:<group>` | stream | messages for one group only — nacked, dropped, or [`redeliver`](orchestrator_core::Transport::redeliver)ed; fields `type`, `event`, `topic`, `attempt`, `first` (ms since the epoch), `error`; consumer group `<group>` |
//! | `<prefix>delayed:<group>` | sorted set | nacked messages waiting out their delay, scored by due time (ms, Redis server clock) |
//! | `<prefix>dlq` | stream | dead letters, oldest first; fields `id`, `type`, `subscription`, `letter` (JSON: `id`, `topic`, `subscription`, `reason`, `attempts`, `first_failure_at`, `last_failure_at`, `event`) |
//! | `<prefix>dlq:index` | hash | dead-letter id → `dlq` entry id |
//! | `<prefix>ephemeral` | set | the [ephemeral](orchestrator_core::SubscribeOptions::ephemeral) groups |
//! | `<prefix>alive:<group>` | string | an ephemeral group's consumer is alive while it exists: renewed by the consumer, expiring after [`RedisConfig::with_ephemeral_timeout`] (30 s) |
//! | `<prefix>lease:<name>` | string | a [`RedisLease`]: the holder's token, with a time to live |
//! | `<prefix>inbox:<group>` | sorted set | a [`RedisInbox`]: the event ids `<group>` handled, scored by record order |
//! | `<prefix>inbox-at:<group>` | sorted set | the same ids scored by record time (ms since the epoch, the recording process's clock) |
//!
//! An ephemeral group's consumer removes the group when it stops — its consumer group on
//! every topic stream, its pattern, its retry stream and delayed set. Redis has no expiry for
//! consumer groups, so a group whose process died is removed by the next subscription on the
//! same prefix once its alive key has expired.
//!
//! A store and a transport may share a prefix. [`RedisEventStore::delete_all`] and
//! [`RedisTransport::delete_all`] delete every key under the prefix (`SCAN` + `DEL`; refused
//! for an empty prefix).
//!
//! # Wire format
//!
//! The wire contract every backend shares: each entry's field `type` is the event type and
//! field `event` is the event as a CloudEvents 1.0 JSON object (structured mode, see
//! [`orchestrator_core::cloudevents`]). Stored events carry the extensions `streamid`,
//! `streamversion` and `globalposition` in that JSON. Any client can write a topic entry
//! with `XADD <prefix>topic:<topic> * type <type> event <json>`; an entry without `event`, or whose
//! `event` is not a valid CloudEvent, is dead-lettered with the reason (its raw bytes kept as
//! an `application/octet-stream` event carrying the header `redisentryid`), and the consumer
//! carries on.
//!
//! # The event store
//!
//! An append is one `EVALSHA` of a Lua script that looks the batch's event ids up in
//! `<prefix>stream-ids:<stream id>`, checks the expected version against the stream's length,
//! takes positions with `INCRBY` on `<prefix>position`, `XADD`s both entries of every event
//! and records its id — atomic, one round trip for any batch size. Global positions have no
//! gaps. Appends are idempotent
//! ([`idempotent_append`](orchestrator_core::StoreCapabilities::idempotent_append)): an append
//! whose ids the stream holds in the same order and place returns the original positions
//! and writes nothing, one that clashes with stored ids otherwise is a
//! [`DuplicateEvent`](orchestrator_core::Error::DuplicateEvent). So when the reply of an
//! append is lost to a connection error, the store's own retry — or the application's, after
//! a crash or a timeout — cannot write it twice, even if other writers appended to the stream
//! meanwhile. Events written before the id hash existed (by an older version of this crate)
//! are not in it, and not recognised. Reads are `XRANGE`s; a subscription catches up with `XRANGE`
//! on `<prefix>all` and then follows with `XREAD BLOCK`, always from the last entry it handed over.
//! Every event is stored twice (its stream and `<prefix>all`): reads in either order are one range
//! scan, at twice the memory. Versions are stream lengths: never trim or `XDEL` these
//! streams.
//!
//! # The transport
//!
//! **Publishing** is `XADD` to `<prefix>topic:<topic>`; a batch is one pipeline. A publish that
//! fails on a connection error is retried; the retry first skips the events the failed
//! attempt did write (found in the stream's tail by event id), so a lost reply does not
//! duplicate them. Topic streams are trimmed of what every group has acknowledged (see
//! [trimming](#trimming-topic-streams)).
//!
//! **Subscribing** makes the group a Redis consumer group, named as the group, on the stream
//! of every topic its patterns match, plus on its own retry stream `<prefix>retry:<group>`. Each
//! subscription is one consumer (`XREADGROUP`, all its streams in one blocking read); several
//! subscriptions of a group share the work. Groups are durable: a group that subscribes again
//! carries on where it stopped. A new group starts with the events published after it
//! subscribed. A consumer reads ahead: up to `prefetch` entries per stream in one
//! `XREADGROUP`, one such batch waiting while the application works through the previous
//! one. Entries read ahead but never handed out go back to the group, without counting an
//! attempt, when the subscription's stream is dropped.
//!
//! **Patterns** have the in-process meaning ([`orchestrator_core::TopicPattern`]: `*` one
//! segment, `#` any number, otherwise exact). Redis has no pattern subscriptions on streams,
//! so they map to consumer groups on concrete topic streams:
//!
//! 1. subscribing adds `"<group> <pattern>"` to `<prefix>patterns`, then creates the group (at
//!    `$`, "from now") on every topic in `<prefix>topics` that matches;
//! 2. the first publish to a topic anywhere adds it to `<prefix>topics` and, when it is new, creates
//!    the groups of all matching registered patterns *reading from the start* of the new
//!    stream before writing to it — so events published to a topic that did not exist when
//!    the group subscribed are not missed;
//! 3. each consumer of a pattern subscription re-reads `<prefix>topics` every
//!    [`RedisConfig::with_discovery_interval`] (1 s) and adds the matching new streams to its
//!    reads. Events published meanwhile wait in the stream for the group; they are not lost.
//!
//! **Acks** are `XACK`s sent in batches by a task of the subscription (whatever accumulated
//! while the previous batch was in flight goes in one pipeline), so `ack()` returns once the
//! ack is queued, without a round trip. If the process dies before the batch is sent, the
//! event is redelivered — at-least-once, as ever.
//!
//! **Nacks** run one script that acks the entry and adds the message, with its attempt count,
//! first-attempt time and the nack's reason, either to the group's retry stream (no delay) or
//! to the sorted set `<prefix>delayed:<group>` scored by due time. Delayed messages are moved to
//! the retry stream by a script, when their time comes, by a timer of the nacking process and
//! — should that process die — by every consumer of the group, which polls every
//! [`RedisConfig::with_delayed_poll_interval`] (1 s). Since both sets live in Redis, a nacked
//! message survives the death of its consumer. Only the nacking group sees the retry.
//! A [`Delivery`](orchestrator_core::Delivery) dropped without being settled is nacked with
//! no delay from its `Drop`, and so comes straight back.
//!
//! **Dead consumers**: a delivery left unsettled for [`RedisConfig::with_claim_min_idle`]
//! (30 s) — its consumer crashed, or lost its connection for good, or Redis received its read
//! but the reply was lost — is taken over by a consumer of the group with `XAUTOCLAIM`, run
//! every [`RedisConfig::claim_interval`], and delivered again as the next attempt. A live
//! consumer resets the idle time of every entry it holds (read ahead or handed out, not yet
//! settled) at each of those rounds with `XCLAIM … JUSTID`, so slow handlers and read-ahead
//! buffers are never reclaimed from under it.
//!
//! **Dead letters** go to [`RedisDeadLetterQueue`] in one script that also acks the delivery.
//! To reprocess a letter, [`redeliver`](orchestrator_core::Transport::redeliver) its event to
//! its subscription (it goes to that group's retry stream, attempt 1) and
//! [`remove`](orchestrator_core::DeadLetterQueue::remove) it.
//!
//! # Trimming topic streams
//!
//! A topic stream would otherwise keep every event ever published. Every
//! [`RedisConfig::with_topic_trim_interval`] (1 s) per topic, the publish that finds the
//! interval passed runs one script on the topic's stream that, atomically:
//!
//! 1. takes the **cut**: the oldest of, for each consumer group of the stream
//!    (`XINFO GROUPS`), its last-delivered id and its oldest pending id (`XPENDING`
//!    summary) — and, in any case, no newer than the retention age
//!    ([`RedisConfig::with_topic_retention`], 60 s, against the entry ids' milliseconds on the
//!    Redis server's clock);
//! 2. removes the entries older than the cut (`XTRIM … MINID <cut>`, exact).
//!
//! So an entry is removed only once **every** group has read it and acknowledged it (acked,
//! nacked into its retry stream, or dead-lettered — each settles it with `XACK`) and it is
//! older than the retention age. An entry a group has not read, or holds unacknowledged — read
//! ahead, handed out, or waiting to be reclaimed from a dead consumer — stays, and so does
//! everything after it; a group that has not read anything yet keeps the whole stream. Because
//! the script is atomic, no read, ack or `XAUTOCLAIM` can come between the cut and the trim.
//! The newest entry every group has read stays too (the cut is inclusive).
//!
//! - **While consumers keep up**, a topic stream holds about what was published in the last
//!   retention age plus trim interval, plus the groups' backlog.
//! - **A stream with no group** keeps entries for the retention age, then loses them: a group
//!   subscribing later starts with the events published after it, so none would read them.
//! - **A durable group that stops consuming holds the stream**: it grows by everything
//!   published since, until the group comes back, or is removed (`XGROUP DESTROY`), or
//!   [`RedisConfig::with_topic_max_len`] — a hard ceiling that *does* remove what groups have
//!   not read — caps it. Ephemeral groups are removed with their consumer, so they never hold
//!   a stream for long.
//! - A process that publishes to a topic once and stops never trims it; the next publisher,
//!   or [`RedisTransport::trim_topics`], does. [`RedisConfig::without_topic_trimming`] turns
//!   trimming off (then only `with_topic_max_len` bounds a stream).

mod config;
mod conn;
mod consumer;
mod dlq;
mod inbox;
mod lease;
mod scripts;
mod settle;
mod store;
mod transport;
mod trim;

pub use config::{
    DEFAULT_PREFIX, DEFAULT_TOPIC_RETENTION, DEFAULT_TOPIC_TRIM_INTERVAL, RedisConfig,
};
pub use dlq::RedisDeadLetterQueue;
pub use inbox::RedisInbox;
pub use lease::RedisLease;
pub use store::RedisEventStore;
pub use transport::RedisTransport;
pub use trim::TopicTrim;

/// Runs the stream-reply parsers on `reply` the way the transport, the store and the
/// dead-letter queue read streams (`XREADGROUP`, `XAUTOCLAIM` and `XRANGE` shapes), and
/// decodes each entry's `event` field; returns how many entries held a valid event.
///
/// For the fuzz targets in `fuzz/` only (it has to reach private parsers); not part of
/// the API.
#[doc(hidden)]
pub fn fuzz_stream_reply(reply: &::redis::Value) -> usize {
    let mut decoded = 0;
    let mut decode = |entries: &[conn::Entry]| {
        for entry in entries {
            let _ = (entry.sequence(), entry.text("type"), entry.text("attempt"));
            let event = entry
                .field("event")
                .map(orchestrator_core::cloudevents::decode);
            decoded += usize::from(matches!(event, Some(Ok(_))));
        }
    };
    if let Ok(streams) = conn::parse_read(reply.clone()) {
        for (_, entries) in &streams {
            decode(entries);
        }
    }
    if let Ok((_, entries, _)) = conn::parse_autoclaim(reply.clone()) {
        decode(&entries);
    }
    if let Ok(entries) = conn::parse_entries(reply.clone()) {
        decode(&entries);
    }
    decoded
}
