//! [`PostgresConfig`]: where PostgreSQL is, which schema the backend owns, and how it behaves.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use orchestrator_core::redact::redact_url;
use orchestrator_core::{Error, MaxEventSize, Result};
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;

use super::conn::BACKEND;

/// The schema the backend keeps its tables in when none is configured.
pub const DEFAULT_SCHEMA: &str = "orchestrator";

/// How often a subscription reads the table even without a notification, unless configured
/// ([`PostgresConfig::with_poll_interval`]).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How many connections the pool holds at most, unless configured
/// ([`PostgresConfig::with_pool_size`]).
pub const DEFAULT_POOL_SIZE: usize = 16;

/// How to reach PostgreSQL and how the backend behaves.
///
/// Built from a libpq-style URL, `postgres://[user[:password]@]host[:port]/database[?options]`
/// (`postgresql://` too), or a `key=value` connection string. A URL may also name the schema
/// with the query parameter `schema=NAME` (this backend's, not libpq's: it is taken out
/// before the rest is parsed), which is how `postgres://` URLs in the facade and the CLI
/// choose one. Building a config only parses it; nothing connects until
/// [`PostgresEventStore::connect`](super::PostgresEventStore::connect).
///
/// ```
/// use std::time::Duration;
/// use orchestrator_backends::postgres::PostgresConfig;
///
/// let config = PostgresConfig::new("postgres://app:s3cret@127.0.0.1:5432/shop")?
///     .with_schema("billing_events")?
///     .with_poll_interval(Duration::from_millis(200));
/// assert_eq!(config.schema(), "billing_events");
/// // The password never shows in logs or debug output.
/// assert_eq!(config.redacted_url(), "postgres://app:***@127.0.0.1:5432/shop");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), orchestrator_core::Error>(())
/// ```
#[derive(Clone)]
pub struct PostgresConfig {
    pub(crate) pg: tokio_postgres::Config,
    redacted_url: String,
    pub(crate) schema: String,
    pub(crate) pool_size: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) max_event_size: MaxEventSize,
    /// How much of the server's certificate is checked (`sslmode`).
    verify: Verify,
    /// The root certificates given (`sslrootcert=`, `with_tls_root_certificates`).
    #[cfg(feature = "postgres-tls")]
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// How connections are made, built from the above.
    pub(crate) connector: Connector,
}

/// How much of the server's certificate TLS checks: libpq's `sslmode` values that use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// `prefer` and `require`: encryption only; any certificate is accepted (unless roots
    /// are given: then the chain is checked, as libpq does with a root file).
    Nothing,
    /// `verify-ca`: the chain must lead to a given root; the name is not checked.
    Chain,
    /// `verify-full`: the chain and the host name.
    Full,
}

/// How the backend's connections are made.
#[derive(Clone)]
pub(crate) enum Connector {
    /// In plain text (`sslmode=disable`, or a build without `postgres-tls`).
    Plain,
    /// With TLS when the server offers it (`prefer`) or always (`require`, `verify-*`).
    #[cfg(feature = "postgres-tls")]
    Tls(super::tls::MakeRustlsConnect),
}

impl Connector {
    fn is_tls(&self) -> bool {
        match self {
            Self::Plain => false,
            #[cfg(feature = "postgres-tls")]
            Self::Tls(_) => true,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.redacted_url)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("poll_interval", &self.poll_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("max_event_size", &self.max_event_size)
            .field("tls", &self.tls_description())
            .finish()
    }
}

impl PostgresConfig {
    /// Parses a connection URL (or `key=value` string), with an optional `schema=NAME` in a
    /// URL's query.
    ///
    /// `sslmode` is libpq's: `disable`, `prefer` (the default: TLS if the server offers
    /// it), `require`, `verify-ca`, `verify-full`, with the roots of `sslrootcert=PATH` (PEM)
    /// — see the [module docs](super#tls). Without the `postgres-tls` feature, connections
    /// are plain text and the modes that require TLS are refused.
    ///
    /// Fails with [`Error::InvalidInput`] when it does not parse (the message shows the URL
    /// with its password hidden) or `sslrootcert` cannot be read, and with
    /// [`Error::Unsupported`] for a mode that requires TLS in a build without `postgres-tls`.
    pub fn new(url: &str) -> Result<Self> {
        let redacted_url = redact_url(url);
        let (url, ours) = take_params(url);
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::invalid(
                "PostgreSQL URL",
                format!(
                    "`{redacted_url}` does not parse ({e}); expected \
                     postgres://user[:password]@host[:port]/database"
                ),
            )
        })?;
        // tokio-postgres knows `disable`, `prefer` and `require`; the checks of the others
        // are ours, over `require`.
        let verify = match ours.sslmode.as_deref() {
            None => Verify::Nothing,
            Some("verify-full") => Verify::Full,
            Some("verify-ca") => Verify::Chain,
            Some(other) => {
                return Err(Error::invalid(
                    "PostgreSQL sslmode",
                    format!(
                        "{other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                    ),
                ));
            }
        };
        if verify != Verify::Nothing {
            pg.ssl_mode(SslMode::Require);
        }
        let roots_pem = ours
            .sslrootcert
            .map(|path| {
                std::fs::read(&path).map_err(|e| {
                    Error::invalid("PostgreSQL sslrootcert", format!("cannot read {path}: {e}"))
                })
            })
            .transpose()?;
        #[cfg(not(feature = "postgres-tls"))]
        if pg.get_ssl_mode() == SslMode::Require || roots_pem.is_some() {
            return Err(Error::Unsupported {
                backend: BACKEND,
                operation: "TLS (sslmode=require, verify-ca or verify-full; sslrootcert)",
                hint: "this build has no PostgreSQL TLS: enable the `postgres-tls` feature (of \
                       `orchestrator` or `orchestrator-backends`), or connect with \
                       sslmode=prefer (the default) or disable",
            });
        }
        let connect_timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let schema = ours.schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_owned());
        validate_schema(&schema)?;
        let statement_timeout = ours
            .statement_timeout
            .map(|given| parse_timeout(&given))
            .transpose()?;
        let mut config = Self {
            pg,
            redacted_url,
            schema,
            pool_size: DEFAULT_POOL_SIZE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            connect_timeout,
            statement_timeout,
            max_event_size: MaxEventSize::DEFAULT,
            verify,
            #[cfg(feature = "postgres-tls")]
            roots: Vec::new(),
            connector: Connector::Plain,
        };
        #[cfg(feature = "postgres-tls")]
        if let Some(pem) = roots_pem {
            config.roots = super::tls::parse_roots("PostgreSQL sslrootcert", &pem)?;
        }
        config.connector = config.build_connector()?;
        Ok(config)
    }

    /// Checks the server's certificate against these roots (PEM, one or more certificates;
    /// added to any given before, e.g. by the URL's `sslrootcert`): `verify-ca` and
    /// `verify-full` need roots, and `prefer` or `require` with roots check the chain as
    /// `verify-ca` does (as libpq does when it finds a root file).
    #[cfg(feature = "postgres-tls")]
    pub fn with_tls_root_certificates(mut self, pem: impl AsRef<[u8]>) -> Result<Self> {
        let roots = super::tls::parse_roots("PostgreSQL TLS root certificates", pem.as_ref())?;
        self.roots.extend(roots);
        self.connector = self.build_connector()?;
        Ok(self)
    }

    /// The connector for the configured `sslmode`.
    fn build_connector(&self) -> Result<Connector> {
        if self.pg.get_ssl_mode() == SslMode::Disable {
            return Ok(Connector::Plain);
        }
        #[cfg(feature = "postgres-tls")]
        {
            if self.missing_roots().is_err() {
                // Refused when connecting: roots may still be given.
                return Ok(Connector::Plain);
            }
            super::tls::MakeRustlsConnect::new(self.verify, &self.roots).map(Connector::Tls)
        }
        #[cfg(not(feature = "postgres-tls"))]
        Ok(Connector::Plain)
    }

    /// An error when `verify-ca` or `verify-full` has no roots to verify with.
    fn missing_roots(&self) -> Result<()> {
        #[cfg(feature = "postgres-tls")]
        if self.verify != Verify::Nothing && self.roots.is_empty() {
            return Err(Error::invalid(
                "PostgreSQL TLS",
                "sslmode=verify-ca and verify-full need root certificates: sslrootcert=PATH \
                 in the URL, or PostgresConfig::with_tls_root_certificates",
            ));
        }
        Ok(())
    }

    /// What TLS the connections use, for `Debug`.
    fn tls_description(&self) -> &'static str {
        match (self.verify, self.pg.get_ssl_mode(), self.connector.is_tls()) {
            (Verify::Full, _, _) => "verify-full",
            (Verify::Chain, _, _) => "verify-ca",
            (Verify::Nothing, _, false) => "off",
            (Verify::Nothing, SslMode::Require, true) => "require",
            (Verify::Nothing, _, true) => "prefer",
        }
    }

    /// Keeps the backend's tables in `schema` (default [`DEFAULT_SCHEMA`]), created on
    /// connect if missing. Any name PostgreSQL accepts as a quoted identifier: 1 to 63 bytes,
    /// no control characters.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Result<Self> {
        let schema = schema.into();
        validate_schema(&schema)?;
        self.schema = schema;
        Ok(self)
    }

    /// Holds at most `size` pooled connections (at least 1; default [`DEFAULT_POOL_SIZE`]).
    /// Each subscription's notifications arrive on one more connection, shared by the
    /// store's subscriptions.
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How often a subscription reads new events without having been notified (default
    /// [`DEFAULT_POLL_INTERVAL`], at least 10 ms): the bound on its lag should a notification
    /// be lost, e.g. while the listening connection reconnects.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How long connecting may take (default: the URL's `connect_timeout`, else 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Has the server cancel any statement of the backend's sessions that runs longer than
    /// `timeout` (PostgreSQL's `statement_timeout`, set for each session at connect; whole
    /// milliseconds, at least 1). Default: none, or the URL's `statement_timeout=` (this
    /// backend's parameter, like `schema`: milliseconds, or a number with `ms`, `s` or
    /// `min`, e.g. `statement_timeout=5s`).
    ///
    /// The limit covers everything the backend runs, waits included: an append queued
    /// behind the schema's append lock, a migration waiting for another process's. A
    /// cancelled statement fails with an [`Error::Backend`] whose source is a
    /// [`PostgresStatementTimeout`](super::PostgresStatementTimeout) (temporary: nothing of
    /// it was written, and a retry may finish in time); the connection stays in the pool,
    /// usable. Sessions that only `LISTEN` run no statements that could take long.
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout.max(Duration::from_millis(1)));
        self
    }

    /// The statement timeout of the backend's sessions, if any.
    pub fn statement_timeout(&self) -> Option<Duration> {
        self.statement_timeout
    }

    /// Refuses to store events larger than `limit` once encoded (default
    /// [`MaxEventSize::DEFAULT`]) with [`Error::TooLarge`].
    pub fn with_max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }

    /// The schema the backend's tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The URL with its password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// A pool of connections to the configured server.
    pub(crate) fn pool(&self) -> Result<Pool> {
        self.pool_of(self.pg_config())
    }

    /// A pool like [`pool`](Self::pool) whose sessions commit without waiting for the WAL
    /// flush (`synchronous_commit = off`): for the transport's consumer statements, whose
    /// commits a crash may lose whole without losing a message (the row is as it was, and
    /// is delivered again).
    pub(crate) fn pool_committing_without_flush_wait(&self) -> Result<Pool> {
        let mut pg = self.pg_config();
        add_option(&mut pg, "synchronous_commit=off");
        self.pool_of(pg)
    }

    fn pool_of(&self, pg: tokio_postgres::Config) -> Result<Pool> {
        self.missing_roots()?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &self.connector {
            Connector::Plain => Manager::from_config(pg, NoTls, manager_config),
            #[cfg(feature = "postgres-tls")]
            Connector::Tls(tls) => Manager::from_config(pg, tls.clone(), manager_config),
        };
        Pool::builder(manager)
            .max_size(self.pool_size)
            // The connection used last goes out first: under a light load the same one
            // or two stay busy, hot in their server processes, instead of each request
            // waking the least recently used of them (it helped the bench's one-at-a-time
            // transport acks, within the noise of a loaded machine).
            .queue_mode(deadpool::managed::QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(self.connect_timeout))
            .wait_timeout(Some(self.connect_timeout.saturating_mul(3)))
            .build()
            .map_err(|e| Error::backend(BACKEND, false, e))
    }

    /// The connection settings, with the configured timeouts.
    pub(crate) fn pg_config(&self) -> tokio_postgres::Config {
        let mut pg = self.pg.clone();
        pg.connect_timeout(self.connect_timeout);
        if let Some(timeout) = self.statement_timeout {
            add_option(
                &mut pg,
                &format!("statement_timeout={}", timeout.as_millis().max(1)),
            );
        }
        pg
    }
}

/// Adds `-c setting` to the options the server applies to each session, after any given.
fn add_option(pg: &mut tokio_postgres::Config, setting: &str) {
    let options = match pg.get_options() {
        Some(given) if !given.trim().is_empty() => format!("{given} -c {setting}"),
        _ => format!("-c {setting}"),
    };
    pg.options(&options);
}

/// This backend's own parameters of a URL's query, taken out before libpq's are parsed.
#[derive(Default)]
struct OwnParams {
    schema: Option<String>,
    statement_timeout: Option<String>,
    /// `verify-ca` or `verify-full` (the other modes are left for tokio-postgres).
    sslmode: Option<String>,
    /// A file of PEM root certificates.
    sslrootcert: Option<String>,
}

/// A `statement_timeout=` value: milliseconds, or a number with `ms`, `s` or `min`.
fn parse_timeout(given: &str) -> Result<Duration> {
    let given = given.trim();
    let split = given
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(given.len());
    let (number, unit) = given.split_at(split);
    let millis_per = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && millis_per > 0 => Ok(Duration::from_millis(n.saturating_mul(millis_per))),
        _ => Err(Error::invalid(
            "PostgreSQL statement_timeout",
            format!("{given:?} is not a positive number of milliseconds (or with ms, s or min)"),
        )),
    }
}

/// Takes this backend's parameters (`schema=NAME`, `statement_timeout=…`, and the TLS
/// settings tokio-postgres does not parse: `sslmode=verify-…`, `sslrootcert=PATH`) out of a URL's
/// query (the last of each wins; `%XX` escapes decoded), returning the URL without them.
fn take_params(url: &str) -> (String, OwnParams) {
    let mut ours = OwnParams::default();
    let Some((base, query)) = url.split_once('?').filter(|_| url.contains("://")) else {
        return (url.to_owned(), ours);
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some(("schema", value)) => {
                ours.schema = Some(percent_decode(value));
                false
            }
            Some(("statement_timeout", value)) => {
                ours.statement_timeout = Some(percent_decode(value));
                false
            }
            Some(("sslmode", value)) if value.starts_with("verify-") => {
                ours.sslmode = Some(percent_decode(value));
                false
            }
            Some(("sslrootcert", value)) => {
                ours.sslrootcert = Some(percent_decode(value));
                false
            }
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        (base.to_owned(), ours)
    } else {
        (format!("{base}?{}", kept.join("&")), ours)
    }
}

/// `%XX` escapes decoded (an invalid escape is kept as it is); the result is checked as a
/// schema name afterwards.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks a schema name: 1 to 63 bytes (PostgreSQL's identifier length), no control
/// characters (it is always quoted, so any other character is fine).
pub(crate) fn validate_schema(schema: &str) -> Result<()> {
    if schema.is_empty() || schema.len() > 63 {
        return Err(Error::invalid(
            "PostgreSQL schema",
            format!("{schema:?} must be 1 to 63 bytes long"),
        ));
    }
    if schema.chars().any(char::is_control) {
        return Err(Error::invalid(
            "PostgreSQL schema",
            format!("{schema:?} contains control characters"),
        ));
    }
    Ok(())
}

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_passwords() {
        let config = PostgresConfig::new("postgresql://u:pw@h:5433/db?connect_timeout=3").unwrap();
        assert_eq!(
            config.redacted_url(),
            "postgresql://u:***@h:5433/db?connect_timeout=3"
        );
        assert_eq!(config.connect_timeout, Duration::from_secs(3));
        assert!(!format!("{config:?}").contains("pw"));
        assert!(PostgresConfig::new("host=/var/run/postgresql dbname=test").is_ok());
    }

    #[test]
    fn bad_urls_are_typed_errors_without_the_password() {
        let Err(Error::InvalidInput { reason, .. }) =
            PostgresConfig::new("postgres://u:s3cret@h:notaport/db")
        else {
            panic!("a bad port parses")
        };
        assert!(!reason.contains("s3cret"), "{reason}");
        assert!(matches!(
            PostgresConfig::new("postgres://h/db?sslmode=verify-maybe"),
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            PostgresConfig::new("postgres://h/db?sslmode=require&sslrootcert=/no/such/file.pem"),
            Err(Error::InvalidInput { .. }) | Err(Error::Unsupported { .. })
        ));
    }

    #[cfg(not(feature = "postgres-tls"))]
    #[test]
    fn tls_modes_name_the_tls_feature() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let Err(Error::Unsupported { hint, .. }) =
                PostgresConfig::new(&format!("postgres://h/db?sslmode={mode}"))
            else {
                panic!("sslmode={mode} accepted without TLS")
            };
            assert!(hint.contains("postgres-tls"), "{hint}");
        }
        let plain = PostgresConfig::new("postgres://h/db").unwrap();
        assert!(format!("{plain:?}").contains(r#"tls: "off""#), "{plain:?}");
    }

    #[cfg(feature = "postgres-tls")]
    #[test]
    fn tls_modes_parse() {
        let shown = |url: &str| format!("{:?}", PostgresConfig::new(url).unwrap());
        assert!(shown("postgres://h/db").contains(r#"tls: "prefer""#));
        assert!(shown("postgres://h/db?sslmode=disable").contains(r#"tls: "off""#));
        assert!(shown("postgres://h/db?sslmode=require").contains(r#"tls: "require""#));
        // Verifying needs roots: refused when the pool is made, once none were given.
        for mode in ["verify-ca", "verify-full"] {
            let config = PostgresConfig::new(&format!("postgres://h/db?sslmode={mode}")).unwrap();
            assert!(format!("{config:?}").contains(mode));
            assert!(matches!(config.pool(), Err(Error::InvalidInput { .. })));
        }
        assert!(matches!(
            PostgresConfig::new("postgres://h/db")
                .unwrap()
                .with_tls_root_certificates("not a certificate"),
            Err(Error::InvalidInput { .. })
        ));
    }

    #[test]
    fn a_url_names_its_schema() {
        let config =
            PostgresConfig::new("postgres://u:pw@h/db?connect_timeout=4&schema=shop%20events")
                .unwrap();
        assert_eq!(config.schema(), "shop events");
        assert_eq!(config.connect_timeout, Duration::from_secs(4));
        assert_eq!(
            PostgresConfig::new("postgres://h/db?schema=billing")
                .unwrap()
                .schema(),
            "billing"
        );
        assert_eq!(
            PostgresConfig::new("postgres://h/db").unwrap().schema(),
            DEFAULT_SCHEMA
        );
        assert!(matches!(
            PostgresConfig::new("postgres://h/db?schema="),
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            PostgresConfig::new("postgres://h/db?schema=a%0Ab"),
            Err(Error::InvalidInput { .. })
        ));
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn a_url_sets_the_statement_timeout() {
        let config =
            PostgresConfig::new("postgres://h/db?statement_timeout=1500&schema=s").unwrap();
        assert_eq!(
            config.statement_timeout(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(config.schema(), "s");
        assert_eq!(
            config.pg_config().get_options(),
            Some("-c statement_timeout=1500")
        );
        let config = PostgresConfig::new(
            "postgres://h/db?statement_timeout=2s&options=-c%20search_path%3Dx",
        )
        .unwrap();
        assert_eq!(config.statement_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(
            config.pg_config().get_options(),
            Some("-c search_path=x -c statement_timeout=2000")
        );
        assert_eq!(
            PostgresConfig::new("postgres://h/db?statement_timeout=1min")
                .unwrap()
                .statement_timeout(),
            Some(Duration::from_secs(60))
        );
        for bad in ["0", "soon", "5h", "-3"] {
            assert!(
                matches!(
                    PostgresConfig::new(&format!("postgres://h/db?statement_timeout={bad}")),
                    Err(Error::InvalidInput { .. })
                ),
                "{bad} was taken"
            );
        }
        let config = PostgresConfig::new("postgres://h/db")
            .unwrap()
            .with_statement_timeout(Duration::from_micros(10));
        assert_eq!(config.statement_timeout(), Some(Duration::from_millis(1)));
        assert_eq!(
            config.pg_config().get_options(),
            Some("-c statement_timeout=1")
        );
        assert_eq!(
            PostgresConfig::new("postgres://h/db")
                .unwrap()
                .pg_config()
                .get_options(),
            None
        );
    }

    #[test]
    fn schemas_are_checked_and_quoted() {
        let config = PostgresConfig::new("postgres://h/db").unwrap();
        assert!(config.clone().with_schema("").is_err());
        assert!(config.clone().with_schema("a\nb").is_err());
        assert!(config.clone().with_schema("x".repeat(64)).is_err());
        assert_eq!(
            config.with_schema("Odd \"name\"").unwrap().schema(),
            "Odd \"name\""
        );
        assert_eq!(quote_ident("Odd \"name\""), "\"Odd \"\"name\"\"\"");
    }
}
