//! [`RedisInbox`]: a durable [`Inbox`] in two sorted sets per consumer group, shared by
//! every process of the group.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use orchestrator_core::inbox::validate_group;
use orchestrator_core::{Clock, EventId, Inbox, InboxRetention, Result, SystemClock};
use redis::Script;
use redis::aio::ConnectionManager;

use super::config::RedisConfig;
use super::conn::with_retry;

/// Records an id and trims the group to the window, atomically.
///
/// KEYS: the ids by record order (`<prefix>inbox:<group>`), the ids by record time
/// (`<prefix>inbox-at:<group>`). ARGV: the id, the record time (ms), the count bound (0:
/// none), the oldest record time kept (ms; empty: no age bound), the keys' time to live (ms;
/// 0: none). Returns 1 when the id was added, 0 when it was in the window already.
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local function forget(members)
  for i = 1, #members, 500 do
    local chunk = {unpack(members, i, math.min(i + 499, #members))}
    redis.call('ZREM', KEYS[1], unpack(chunk))
    redis.call('ZREM', KEYS[2], unpack(chunk))
  end
end
if ARGV[4] ~= '' then
  forget(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4]))
end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local seq = 1
if last[2] then
  seq = tonumber(last[2]) + 1
end
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local max = tonumber(ARGV[3])
if max > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n > max then
    forget(redis.call('ZRANGE', KEYS[1], 0, n - max - 1))
  end
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
",
    )
});

/// A durable [`Inbox`] in Redis, for subscriptions whose de-duplication must survive
/// restarts and be shared by every process of a consumer group.
///
/// Group `g` is two sorted sets with the same members, the handled event ids:
/// `<prefix>inbox:<g>` scored by record order (for the count bound) and
/// `<prefix>inbox-at:<g>` scored by record time in ms (for the age bound). A record is one
/// script that drops the ids past the age bound, adds the id unless present, drops the
/// oldest ids past the count bound and, with an age bound, sets both keys to expire that
/// long after the last record (a group that stops leaves nothing behind). `seen` is one
/// `ZSCORE`. Both retry on connection errors like every command of the backend.
///
/// Record times come from the inbox's [`Clock`] (the system clock by default), so the
/// processes sharing a group should have roughly synchronised clocks: the age bound is off
/// by their skew. Ids are as durable as Redis makes them (its `appendfsync` setting): a
/// Redis that loses writes on a crash forgets the ids recorded last, and those events are
/// handled once more if delivered again.
///
/// From [`RedisEventStore::inbox`](orchestrator_core::EventStore::inbox) (the store's
/// prefix, the default retention) or [`RedisInbox::connect`].
///
/// ```no_run
/// use orchestrator_backends::redis::{RedisConfig, RedisInbox};
/// use orchestrator_core::{EventId, Inbox, InboxRetention};
///
/// # async fn run() -> orchestrator_core::Result<()> {
/// let config = RedisConfig::new("redis://127.0.0.1:6379")?.with_prefix("shop:");
/// let inbox = RedisInbox::connect(config).await?.with_retention(InboxRetention::last(50_000));
/// let id = EventId::new();
/// inbox.record("billing", &id).await?;
/// assert!(inbox.seen("billing", &id).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisInbox {
    manager: ConnectionManager,
    config: RedisConfig,
    retention: InboxRetention,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for RedisInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisInbox")
            .field("url", &self.config.redacted_url())
            .field("prefix", &self.config.prefix)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl RedisInbox {
    /// Connects to Redis; the inbox keeps ids under the config's prefix, to the default
    /// [`InboxRetention`].
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let manager = config.manager().await?;
        Ok(Self::new(manager, config))
    }

    /// An inbox on an existing connection.
    pub(crate) fn new(manager: ConnectionManager, config: RedisConfig) -> Self {
        Self {
            manager,
            config,
            retention: InboxRetention::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Keeps ids to `retention`. Processes sharing a group should use the same retention:
    /// each record trims the group to the recording process's.
    pub fn with_retention(mut self, retention: InboxRetention) -> Self {
        self.retention = retention;
        self
    }

    /// Takes record times (and so ages) from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The keys of `group`: its ids by record order and by record time.
    pub fn keys_of(&self, group: &str) -> (String, String) {
        let prefix = &self.config.prefix;
        (
            format!("{prefix}inbox:{group}"),
            format!("{prefix}inbox-at:{group}"),
        )
    }

    /// The oldest record time (ms) within the window now, if ages are bounded.
    fn cutoff_ms(&self) -> Option<i64> {
        self.retention
            .cutoff(self.clock.now())
            .map(|cutoff| cutoff.timestamp_millis())
    }
}

#[async_trait]
impl Inbox for RedisInbox {
    fn describe(&self) -> String {
        format!(
            "redis inbox under `{}inbox:` at {}",
            self.config.prefix,
            self.config.redacted_url()
        )
    }

    fn durable(&self) -> bool {
        true
    }

    fn retention(&self) -> InboxRetention {
        self.retention
    }

    async fn seen(&self, group: &str, id: &EventId) -> Result<bool> {
        validate_group(group)?;
        let (_, at) = self.keys_of(group);
        let recorded: Option<f64> = with_retry(&self.config, "ZSCORE", |_| {
            let mut conn = self.manager.clone();
            let at = at.clone();
            async move {
                redis::cmd("ZSCORE")
                    .arg(&at)
                    .arg(id.as_str())
                    .query_async(&mut conn)
                    .await
            }
        })
        .await?;
        Ok(match (recorded, self.cutoff_ms()) {
            (None, _) => false,
            (Some(_), None) => true,
            // Scores are whole milliseconds, exact in an f64.
            #[allow(clippy::cast_precision_loss)]
            (Some(recorded), Some(cutoff)) => recorded >= cutoff as f64,
        })
    }

    async fn record(&self, group: &str, id: &EventId) -> Result<()> {
        validate_group(group)?;
        let (ids, at) = self.keys_of(group);
        let now = self.clock.now().timestamp_millis();
        let max_ids = self.retention.max_ids().unwrap_or(0);
        let cutoff = self
            .cutoff_ms()
            .map(|ms| ms.to_string())
            .unwrap_or_default();
        let ttl = self
            .retention
            .max_age()
            .map_or(0, |age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        let _added: i64 = with_retry(&self.config, "inbox record", |_| {
            let mut conn = self.manager.clone();
            let mut invocation = RECORD.prepare_invoke();
            invocation
                .key(&ids)
                .key(&at)
                .arg(id.as_str())
                .arg(now)
                .arg(max_ids)
                .arg(&cutoff)
                .arg(ttl);
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await?;
        Ok(())
    }
}
