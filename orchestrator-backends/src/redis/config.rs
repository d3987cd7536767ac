//! Where Redis is and how the backend behaves: [`RedisConfig`].

use std::time::Duration;

use orchestrator_core::{Error, MaxEventSize, Result};

use super::conn::redis_error;

/// The key prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "orchestrator:";

/// How often a publisher trims a topic stream, unless configured
/// ([`RedisConfig::with_topic_trim_interval`]).
pub const DEFAULT_TOPIC_TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// How long a topic entry is kept at least, unless configured
/// ([`RedisConfig::with_topic_retention`]).
pub const DEFAULT_TOPIC_RETENTION: Duration = Duration::from_secs(60);

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
    pub(crate) topic_trim_interval: Option<Duration>,
    pub(crate) topic_retention: Duration,
    pub(crate) ephemeral_timeout: Duration,
    /// The certificates given for TLS, kept so that each `with_tls_*` call adds to the others.
    #[cfg(feature = "redis-tls")]
    tls: redis::TlsCertificates,
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
            .field("tls", &self.tls_description())
            .field("topic_trim_interval", &self.topic_trim_interval)
            .field("topic_retention", &self.topic_retention)
            .field("max_event_size", &self.max_event_size)
            .finish()
    }
}

impl RedisConfig {
    /// A config for the Redis at `url`, with every other setting at its default.
    ///
    /// Fails with [`Error::InvalidInput`] when the URL cannot be parsed, and with
    /// [`Error::Unsupported`] naming the `redis-tls` feature when it is a `rediss://` URL in a
    /// build without that feature.
    pub fn new(url: &str) -> Result<Self> {
        let redacted_url = orchestrator_core::redact::redact_url(url);
        if is_tls_url(url) {
            tls_available()?;
        }
        let client = redis::Client::open(url).map_err(|e| {
            Error::invalid(
                "redis URL",
                format!(
                    "`{redacted_url}`: {e}; expected redis://[user:password@]host[:port][/db] \
                     or rediss://…"
                ),
            )
        })?;
        Ok(Self {
            client,
            redacted_url,
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
            topic_trim_interval: Some(DEFAULT_TOPIC_TRIM_INTERVAL),
            topic_retention: DEFAULT_TOPIC_RETENTION,
            ephemeral_timeout: Duration::from_secs(30),
            #[cfg(feature = "redis-tls")]
            tls: redis::TlsCertificates {
                client_tls: None,
                root_cert: None,
            },
            max_event_size: MaxEventSize::DEFAULT,
        })
    }

    /// Trusts exactly the certificate authorities in `pem` (one or more PEM certificates)
    /// instead of the system's roots, for a Redis whose certificate a private CA signed.
    ///
    /// Fails with [`Error::InvalidInput`] when the URL is not `rediss://` or the PEM holds
    /// no readable certificate.
    #[cfg(feature = "redis-tls")]
    pub fn with_tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Result<Self> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;

        self.require_tls()?;
        let pem = pem.into();
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::invalid("redis TLS root certificates", format!("{e}")))?;
        if certificates.is_empty() {
            return Err(Error::invalid(
                "redis TLS root certificates",
                "no PEM certificate (-----BEGIN CERTIFICATE-----) found",
            ));
        }
        self.tls.root_cert = Some(pem);
        self.rebuild_tls_client()
    }

    /// Presents a client certificate (mutual TLS): `cert_pem` is the certificate chain,
    /// `key_pem` its private key, both PEM. The key never shows in `Debug` output.
    ///
    /// Fails with [`Error::InvalidInput`] when the URL is not `rediss://` or either PEM
    /// cannot be read.
    #[cfg(feature = "redis-tls")]
    pub fn with_tls_client_certificate(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self> {
        self.tls.client_tls = Some(redis::ClientTlsConfig {
            client_cert: cert_pem.into(),
            client_key: key_pem.into(),
        });
        self.rebuild_tls_client()
    }

    /// Certificates apply to `rediss://` URLs only.
    #[cfg(feature = "redis-tls")]
    fn require_tls(&self) -> Result<()> {
        match self.client.get_connection_info().addr() {
            redis::ConnectionAddr::TcpTls { .. } => Ok(()),
            _ => Err(Error::invalid(
                "redis TLS settings",
                format!(
                    "`{}` is not a rediss:// URL; certificates apply to TLS connections only",
                    self.redacted_url
                ),
            )),
        }
    }

    #[cfg(feature = "redis-tls")]
    fn rebuild_tls_client(mut self) -> Result<Self> {
        self.require_tls()?;
        let info = self.client.get_connection_info().clone();
        self.client = redis::Client::build_with_tls(info, self.tls.clone())
            .map_err(|e| Error::invalid("redis TLS certificates", format!("{e} (PEM expected)")))?;
        Ok(self)
    }

    fn tls_description(&self) -> &'static str {
        #[cfg(feature = "redis-tls")]
        if let redis::ConnectionAddr::TcpTls { .. } = self.client.get_connection_info().addr() {
            return match (&self.tls.root_cert, &self.tls.client_tls) {
                (None, None) => "system roots",
                (Some(_), None) => "given roots",
                (None, Some(_)) => "system roots, client certificate",
                (Some(_), Some(_)) => "given roots, client certificate",
            };
        }
        "off"
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

    /// A hard ceiling on each topic stream: about `max_len` entries (`XADD … MAXLEN ~`).
    /// Default: none — topic streams are kept small by
    /// [trimming](super#trimming-topic-streams), which never removes what a group still needs.
    ///
    /// **This ceiling loses events**: it wins over delivery. When a group lags by more than
    /// `max_len` entries (a slow or stopped consumer), the oldest entries are removed whether
    /// or not the group has read or acknowledged them — entries it had not read are never
    /// delivered to it, and entries it held unacknowledged are dropped from its pending list
    /// when a consumer next reclaims them, with no dead letter. Set it only as a memory limit
    /// you prefer to losing Redis, well above the backlog a healthy group ever has.
    pub fn with_topic_max_len(mut self, max_len: usize) -> Self {
        self.topic_max_len = Some(max_len);
        self
    }

    /// How often a publishing process trims each topic stream it publishes to (default 1 s;
    /// see [trimming](super#trimming-topic-streams)). The trim runs in the publish that finds
    /// it due, one script per topic.
    pub fn with_topic_trim_interval(mut self, interval: Duration) -> Self {
        self.topic_trim_interval = Some(interval);
        self
    }

    /// Turns trimming off: topic streams then keep every entry until
    /// [`with_topic_max_len`](Self::with_topic_max_len) caps them (or forever, without a
    /// cap). [`RedisTransport::trim_topic`](super::RedisTransport::trim_topic) still trims on
    /// request.
    pub fn without_topic_trimming(mut self) -> Self {
        self.topic_trim_interval = None;
        self
    }

    /// How long a topic entry is kept at least, even once every group has acknowledged it
    /// (default 60 s; measured on the Redis server's clock against the entry's id). It lets a
    /// publish retried after a lost reply find the events its failed attempt wrote (retries
    /// last [`with_retry_for`](Self::with_retry_for), 30 s), and a pattern group that finds a
    /// topic late read its recent events. A topic stream with no group keeps its entries this
    /// long, then loses them (no group would ever read them: a group subscribing later starts
    /// with the events published after it).
    pub fn with_topic_retention(mut self, retention: Duration) -> Self {
        self.topic_retention = retention;
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

/// Whether `url` asks for TLS (`rediss://`, or `valkeys://` which redis-rs reads alike).
fn is_tls_url(url: &str) -> bool {
    let scheme = url.trim_start().split_once("://").map_or("", |(s, _)| s);
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

/// Whether this build can make TLS connections; installs the ring crypto provider as the
/// process default when none is installed yet, so that rustls does not depend on which of
/// its providers other crates of the application happen to enable.
#[cfg(feature = "redis-tls")]
#[allow(clippy::unnecessary_wraps)] // the signature is that of the build without TLS
fn tls_available() -> Result<()> {
    // `Err` only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(())
}

#[cfg(not(feature = "redis-tls"))]
fn tls_available() -> Result<()> {
    Err(Error::Unsupported {
        backend: "redis",
        operation: "rediss:// (TLS)",
        hint: "this build has no Redis TLS: enable the `redis-tls` feature (of `orchestrator`, \
               or of `orchestrator-backends`)",
    })
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

    #[cfg(not(feature = "redis-tls"))]
    #[test]
    fn tls_urls_name_the_tls_feature() {
        let error = RedisConfig::new("rediss://:pw@127.0.0.1:6380").unwrap_err();
        assert!(
            matches!(
                error,
                Error::Unsupported {
                    backend: "redis",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("`redis-tls`"), "{error}");
        assert!(!error.to_string().contains("pw"), "{error}");
    }

    #[cfg(feature = "redis-tls")]
    #[test]
    fn tls_urls_take_certificates() {
        let config = RedisConfig::new("rediss://:pw@127.0.0.1:6380").unwrap();
        assert!(format!("{config:?}").contains("system roots"));
        // Certificates are for TLS URLs only, and must be PEM.
        let error = RedisConfig::new("redis://127.0.0.1")
            .unwrap()
            .with_tls_root_certificates(b"x".to_vec())
            .unwrap_err();
        assert!(error.to_string().contains("not a rediss://"), "{error}");
        let error = config
            .with_tls_root_certificates(b"not a certificate".to_vec())
            .unwrap_err();
        assert!(matches!(error, Error::InvalidInput { .. }), "{error}");
    }

    #[test]
    fn topic_trimming_is_on_by_default_and_can_be_turned_off() {
        let config = RedisConfig::new("redis://127.0.0.1").unwrap();
        assert_eq!(
            config.topic_trim_interval,
            Some(DEFAULT_TOPIC_TRIM_INTERVAL)
        );
        assert_eq!(config.topic_retention, DEFAULT_TOPIC_RETENTION);
        assert_eq!(config.topic_max_len, None, "no lossy ceiling unless asked");
        let config = config
            .with_topic_retention(Duration::from_secs(5))
            .without_topic_trimming();
        assert_eq!(config.topic_trim_interval, None);
        assert_eq!(config.topic_retention, Duration::from_secs(5));
    }
}
