//! Where Redis is and how the backend behaves: [`RedisConfig`].

use std::time::Duration;

use orchestrator_core::{Error, MaxEventSize, Result};

use super::conn::redis_error;

/// The key prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "orchestrator:";

/// How to reach Redis and how the backend behaves.
///
/// Built from a URL: `redis://[user:password@]host[:port][/db]`, or `rediss://…` for TLS (see
/// the [module docs](super) for what TLS needs). Building a config only parses the URL; nothing
/// connects until [`RedisEventStore::connect`](super::RedisEventStore::connect) or
/// [`RedisTransport::connect`](super::RedisTransport::connect).
///
/// ```
/// use std::time::Duration;
/// use orchestrator_backends::redis::RedisConfig;
///
/// let config = RedisConfig::new("redis://:s3cret@127.0.0.1:6379/0")?
///     .with_prefix("shop:")
///     .with_claim_min_idle(Duration::from_secs(60));
/// assert_eq!(config.prefix(), "shop:");
/// // The password never shows in logs or debug output.
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), orchestrator_core::Error>(())
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    pub(crate) client: redis::Client,
    redacted_url: String,
    pub(crate) prefix: String,
    pub(crate) response_timeout: Duration,
    pub(crate) connection_timeout: Duration,
    pub(crate) retry_for: Duration,
    pub(crate) claim_min_idle: Duration,
    pub(crate) claim_interval: Option<Duration>,
    pub(crate) block_timeout: Duration,
    pub(crate) discovery_interval: Duration,
    pub(crate) delayed_poll_interval: Duration,
    pub(crate) topic_max_len: Option<usize>,
    pub(crate) ephemeral_timeout: Duration,
    pub(crate) max_event_size: MaxEventSize,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url)
            .field("prefix", &self.prefix)
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("retry_for", &self.retry_for)
            .field("claim_min_idle", &self.claim_min_idle)
            .field("claim_interval", &self.claim_interval())
            .field("block_timeout", &self.block_timeout)
            .field("discovery_interval", &self.discovery_interval)
            .field("delayed_poll_interval", &self.delayed_poll_interval)
            .field("topic_max_len", &self.topic_max_len)
            .field("max_event_size", &self.max_event_size)
            .finish()
    }
}

impl RedisConfig {
    /// A config for the Redis at `url`, with every other setting at its default.
    ///
    /// Fails with [`Error::InvalidInput`] when the URL cannot be parsed, or names `rediss://`
    /// in a build without TLS support.
    pub fn new(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            Error::invalid(
                "redis URL",
                format!(
                    "`{}`: {e}; expected redis://[user:password@]host[:port][/db] or rediss://… \
                     (TLS needs redis-rs's TLS feature, see orchestrator_backends::redis)",
                    orchestrator_core::redact::redact_url(url)
                ),
            )
        })?;
        Ok(Self {
            client,
            redacted_url: orchestrator_core::redact::redact_url(url),
            prefix: DEFAULT_PREFIX.to_owned(),
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            claim_min_idle: Duration::from_secs(30),
            claim_interval: None,
            block_timeout: Duration::from_secs(1),
            discovery_interval: Duration::from_secs(1),
            delayed_poll_interval: Duration::from_secs(1),
            topic_max_len: None,
            ephemeral_timeout: Duration::from_secs(30),
            max_event_size: MaxEventSize::DEFAULT,
        })
    }

    /// Puts every key under `prefix` (default `orchestrator:`), so that several applications
    /// or tests share one Redis without seeing each other's data.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long to wait for the reply to one command before treating the connection as broken
    /// (default 5 s). Blocking reads wait [`with_block_timeout`](Self::with_block_timeout)
    /// longer.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long to wait for a connection to be made (default 5 s).
    pub fn with_connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long a command that failed on a connection error (Redis restarting, network
    /// trouble) is retried, with backoff, before the error is returned (default 30 s).
    /// Subscriptions retry for as long as they live.
    pub fn with_retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// How long a pending entry may go untouched before a consumer of the group reclaims it
    /// with `XAUTOCLAIM` and delivers it again (default 30 s). This is how messages of a
    /// consumer that died are redelivered. Live consumers touch the entries they hold every
    /// [`claim_interval`](Self::claim_interval), so keep that well below this.
    pub fn with_claim_min_idle(mut self, min_idle: Duration) -> Self {
        self.claim_min_idle = min_idle;
        self
    }

    /// How often each consumer touches the entries it holds and looks for messages to
    /// reclaim (default: a third of the claim min-idle time; never more than half of it, and
    /// at least 100 ms).
    pub fn with_claim_interval(mut self, interval: Duration) -> Self {
        self.claim_interval = Some(interval);
        self
    }

    /// How long one blocking read (`XREAD`/`XREADGROUP … BLOCK`) waits for new entries before
    /// the consumer does its housekeeping (default 1 s).
    pub fn with_block_timeout(mut self, timeout: Duration) -> Self {
        self.block_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How often a pattern subscription looks for new topics that match (default 1 s).
    pub fn with_discovery_interval(mut self, interval: Duration) -> Self {
        self.discovery_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How often each consumer moves nacked messages whose delay is over back into its
    /// group's retry stream, when no nack from this process scheduled it sooner (default 1 s).
    pub fn with_delayed_poll_interval(mut self, interval: Duration) -> Self {
        self.delayed_poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Caps each topic stream at about `max_len` entries (`XADD … MAXLEN ~`); the oldest are
    /// trimmed, even if a slow group has not read them. Default: no cap.
    pub fn with_topic_max_len(mut self, max_len: usize) -> Self {
        self.topic_max_len = Some(max_len);
        self
    }

    /// How long an ephemeral group outlives its consumer when the consumer's process dies
    /// without removing it (default 30 s): the consumer renews a key with this expiry, and
    /// the next subscription on the same prefix removes the groups whose key has expired
    /// (Redis has no expiry for consumer groups). A consumer that stops normally removes its
    /// group at once.
    pub fn with_ephemeral_timeout(mut self, timeout: Duration) -> Self {
        self.ephemeral_timeout = timeout.max(Duration::from_millis(300));
        self
    }

    /// The largest event the store and the transport write (default
    /// [`MaxEventSize::DEFAULT`]): a larger one is refused with
    /// [`Error::TooLarge`](orchestrator_core::Error::TooLarge) before anything is written (a
    /// batch with one writes nothing), and a larger entry read from a stream is refused
    /// undecoded (the transport dead-letters it).
    pub fn with_max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// The claim interval in effect.
    pub fn claim_interval(&self) -> Duration {
        self.claim_interval
            .unwrap_or(self.claim_min_idle / 3)
            .min(self.claim_min_idle / 2)
            .max(Duration::from_millis(100))
    }

    /// A connection manager for shared, non-blocking commands.
    pub(crate) async fn manager(&self) -> Result<redis::aio::ConnectionManager> {
        self.manager_with_timeout(self.response_timeout).await
    }

    /// A connection of its own for blocking reads, whose replies may take the block timeout.
    pub(crate) async fn blocking_manager(&self) -> Result<redis::aio::ConnectionManager> {
        self.manager_with_timeout(self.response_timeout + self.block_timeout)
            .await
    }

    async fn manager_with_timeout(
        &self,
        response_timeout: Duration,
    ) -> Result<redis::aio::ConnectionManager> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(self.connection_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        self.client
            .get_connection_manager_with_config(config)
            .await
            .map_err(redis_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redacted_url_hides_the_password() {
        let config = RedisConfig::new("redis://app:s3cret@127.0.0.1:6379/2").unwrap();
        assert_eq!(config.redacted_url(), "redis://app:***@127.0.0.1:6379/2");
        assert!(!format!("{config:?}").contains("s3cret"));
        // A `/` in the password (not percent-encoded) does not parse; the error hides it.
        let error = RedisConfig::new("redis://app:pa/ss@127.0.0.1:6379/2")
            .unwrap_err()
            .to_string();
        assert!(error.contains("app:***@127.0.0.1"), "{error}");
        assert!(!error.contains("pa/ss"), "{error}");
    }

    #[test]
    fn bad_urls_are_invalid_input() {
        assert!(matches!(
            RedisConfig::new("http://nope"),
            Err(Error::InvalidInput { .. })
        ));
    }

    #[test]
    fn claim_interval_follows_min_idle() {
        let config = RedisConfig::new("redis://127.0.0.1")
            .unwrap()
            .with_claim_min_idle(Duration::from_secs(3));
        assert_eq!(config.claim_interval(), Duration::from_secs(1));
        let config = config.with_claim_interval(Duration::from_secs(60));
        assert_eq!(config.claim_interval(), Duration::from_millis(1500));
    }

    #[test]
    fn tls_urls_need_a_tls_build() {
        // This crate does not enable redis-rs's TLS; an application may (see the module docs).
        if let Err(error) = RedisConfig::new("rediss://127.0.0.1:6380") {
            assert!(error.to_string().contains("TLS"), "{error}");
        }
    }
}
