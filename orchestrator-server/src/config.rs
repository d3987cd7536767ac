//! [`ServerConfig`]: where to listen and what to allow.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::{Error, Result};

/// The largest page a query may ask for, unless configured otherwise.
pub const DEFAULT_MAX_PAGE_SIZE: usize = 500;
/// How far (in events) a live subscriber may fall behind the store's head before it is
/// told so and its subscription ends, unless configured otherwise.
pub const DEFAULT_SUBSCRIPTION_WINDOW: u64 = 10_000;
/// The most stored events one request may read for queries that scan the store (`event` by
/// id, `streams`, `trace`), unless configured otherwise.
pub const DEFAULT_MAX_SCAN: usize = 1_000_000;
/// The deepest query accepted, unless configured otherwise (GraphQL introspection, as
/// GraphiQL sends it, is 13 levels deep).
pub const DEFAULT_MAX_DEPTH: usize = 15;
/// The most fields a query may select in all, unless configured otherwise.
pub const DEFAULT_MAX_COMPLEXITY: usize = 1_000;

/// How the server listens and what it allows.
///
/// ```
/// use orchestrator_server::ServerConfig;
///
/// let config = ServerConfig::new("0.0.0.0:8080".parse().unwrap())
///     .bearer_token("s3cret-from-the-environment")
///     .read_only(true)
///     .max_page_size(200);
/// assert!(config.validate().is_ok());
///
/// // Off loopback, a token is required.
/// let open = ServerConfig::new("0.0.0.0:8080".parse().unwrap());
/// assert!(matches!(open.validate(), Err(orchestrator_server::Error::TokenRequired { .. })));
/// ```
#[derive(Clone)]
pub struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) token: Option<Arc<str>>,
    pub(crate) read_only: bool,
    pub(crate) max_page_size: usize,
    pub(crate) max_depth: usize,
    pub(crate) max_complexity: usize,
    pub(crate) subscription_window: u64,
    pub(crate) max_scan: usize,
    pub(crate) cors_origins: Vec<String>,
    pub(crate) prometheus: Option<PrometheusHandle>,
    pub(crate) dashboard: bool,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: say only whether there is one.
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("read_only", &self.read_only)
            .field("max_page_size", &self.max_page_size)
            .field("max_depth", &self.max_depth)
            .field("max_complexity", &self.max_complexity)
            .field("subscription_window", &self.subscription_window)
            .field("max_scan", &self.max_scan)
            .field("cors_origins", &self.cors_origins)
            .field("prometheus", &self.prometheus.is_some())
            .field("dashboard", &self.dashboard)
            .finish()
    }
}

impl ServerConfig {
    /// Listen on `listen`, with no token, mutations allowed, no CORS, and the default
    /// limits ([`DEFAULT_MAX_PAGE_SIZE`], [`DEFAULT_MAX_DEPTH`],
    /// [`DEFAULT_MAX_COMPLEXITY`]).
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            token: None,
            read_only: false,
            max_page_size: DEFAULT_MAX_PAGE_SIZE,
            max_depth: DEFAULT_MAX_DEPTH,
            max_complexity: DEFAULT_MAX_COMPLEXITY,
            subscription_window: DEFAULT_SUBSCRIPTION_WINDOW,
            max_scan: DEFAULT_MAX_SCAN,
            cors_origins: Vec::new(),
            prometheus: None,
            dashboard: true,
        }
    }

    /// The address to listen on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Requires `Authorization: Bearer <token>` on `/graphql` and `/metrics` (`/healthz`
    /// and `/readyz` stay open, for probes). Required when the listen address is not a
    /// loopback address.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Arc::from(token.into()));
        self
    }

    /// Serves the dashboard at `/` (its assets under `/assets/`): on by default. The page
    /// is public, as it holds no data; what it shows comes from the API, behind the token.
    pub fn dashboard(mut self, yes: bool) -> Self {
        self.dashboard = yes;
        self
    }

    /// Refuses every mutation (publish, replay, dead-letter reprocess and discard) with the
    /// error code `READ_ONLY`; queries work as usual.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// The largest `first` a paged query accepts; a larger one fails with
    /// `PAGE_TOO_LARGE`.
    pub fn max_page_size(mut self, events: usize) -> Self {
        self.max_page_size = events;
        self
    }

    /// How far (in events) a live subscriber may fall behind the store's head before it is
    /// told so and its subscription ends, unless configured otherwise.
    pub const DEFAULT_SUBSCRIPTION_WINDOW: u64 = 10_000;
    /// The deepest query accepted; a deeper one is refused before it runs.
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth;
        self
    }

    /// The most fields one query may select in all; a larger one is refused before it
    /// runs.
    pub fn max_complexity(mut self, fields: usize) -> Self {
        self.max_complexity = fields;
        self
    }

    /// How many events a live subscriber may fall behind the store's head before it gets
    /// `SLOW_CONSUMER` and its subscription ends ([`DEFAULT_SUBSCRIPTION_WINDOW`]). Nothing
    /// is buffered for a subscriber either way: it reads the store at its own pace.
    pub fn subscription_window(mut self, events: u64) -> Self {
        self.subscription_window = events;
        self
    }

    /// The most stored events one request may read for the queries that scan the store
    /// (`event` by id, `streams`, `trace`); past it they fail with `SCAN_LIMIT`
    /// ([`DEFAULT_MAX_SCAN`]). `events` pages are bounded on their own.
    pub fn max_scan(mut self, events: usize) -> Self {
        self.max_scan = events;
        self
    }

    /// Allows browser requests from `origin` (`https://ops.example.com`). Without any,
    /// the server sends no CORS headers, so browsers allow only same-origin requests.
    pub fn allow_origin(mut self, origin: impl Into<String>) -> Self {
        self.cors_origins.push(origin.into());
        self
    }

    /// Appends what this Prometheus recorder collected (the bus, saga and CQRS metrics of
    /// [`orchestrator::metrics`]) to `/metrics`. Without it `/metrics` serves the gauges the
    /// server reads from the orchestrator itself (store head, relay, dead letters).
    pub fn prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// Checks the settings: a token when the listen address is not loopback, a non-empty
    /// token, non-zero limits, valid origins.
    pub fn validate(&self) -> Result<()> {
        match &self.token {
            Some(token) if token.trim().is_empty() => {
                return Err(Error::InvalidConfig("the bearer token is empty".to_owned()));
            }
            None if !self.listen.ip().is_loopback() => {
                return Err(Error::TokenRequired {
                    listen: self.listen,
                });
            }
            _ => {}
        }
        for (name, value) in [
            ("max_page_size", self.max_page_size),
            ("max_depth", self.max_depth),
            ("max_complexity", self.max_complexity),
            ("max_scan", self.max_scan),
            (
                "subscription_window",
                usize::try_from(self.subscription_window).unwrap_or(usize::MAX),
            ),
        ] {
            if value == 0 {
                return Err(Error::InvalidConfig(format!("{name} is 0")));
            }
        }
        self.origin_headers().map(|_| ())
    }

    pub(crate) fn origin_headers(&self) -> Result<Vec<HeaderValue>> {
        self.cors_origins
            .iter()
            .map(|origin| {
                HeaderValue::from_str(origin).map_err(|_| {
                    Error::InvalidConfig(format!(
                        "the CORS origin `{origin}` is not a header value"
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: &str) -> ServerConfig {
        ServerConfig::new(addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}")))
    }

    #[test]
    fn loopback_needs_no_token_but_any_other_address_does() {
        assert!(at("127.0.0.1:0").validate().is_ok());
        assert!(at("[::1]:8080").validate().is_ok());
        for open in ["0.0.0.0:8080", "[::]:8080", "192.168.1.5:80"] {
            assert!(
                matches!(at(open).validate(), Err(Error::TokenRequired { .. })),
                "{open}"
            );
            assert!(at(open).bearer_token("t").validate().is_ok(), "{open}");
        }
    }

    #[test]
    fn empty_tokens_zero_limits_and_bad_origins_are_refused() {
        assert!(matches!(
            at("0.0.0.0:1").bearer_token("  ").validate(),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            at("127.0.0.1:1").max_page_size(0).validate(),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            at("127.0.0.1:1").allow_origin("bad\norigin").validate(),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn debug_output_hides_the_token() {
        let shown = format!("{:?}", at("127.0.0.1:1").bearer_token("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
