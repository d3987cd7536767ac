//! # orchestrator-server
//!
//! A window into a running [`EventOrchestrator`]: a GraphQL API over its events, streams,
//! sagas, dead letters, traces, schemas and outbox relay, with the endpoints operations
//! need. Embed it in the application that owns the orchestrator — the only way to look into
//! an embedded store whose directory the application has locked.
//!
//! ```
//! use orchestrator::prelude::*;
//! use orchestrator_server::{Server, ServerConfig};
//! use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let orchestrator = EventOrchestrator::new();
//! orchestrator.publish_event("order.placed", serde_json::json!({"order_id": "A1"})).await?;
//!
//! // Port 0: the system picks a free port.
//! let server = Server::bind(orchestrator, ServerConfig::new("127.0.0.1:0".parse()?)).await?;
//! let addr = server.local_addr();
//! tokio::spawn(server.run());
//!
//! let query = r#"{"query": "{ events(filter: {types: [\"order.*\"]}) { events { type data } } }"}"#;
//! let mut tcp = tokio::net::TcpStream::connect(addr).await?;
//! tcp.write_all(format!(
//!     "POST /graphql HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
//!      Content-Length: {}\r\nConnection: close\r\n\r\n{query}", query.len()
//! ).as_bytes()).await?;
//! let mut reply = String::new();
//! tcp.read_to_string(&mut reply).await?;
//! assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
//! assert!(reply.contains(r#""data":{"order_id":"A1"}"#), "{reply}");
//! # Ok(()) }
//! ```
//!
//! ## Endpoints
//!
//! - `POST /graphql` — the API; its schema is [`schema_sdl`], checked in as
//!   `orchestrator-server/schema.graphql`. Queries: `events` (filters: type patterns,
//!   stream, stream prefix, time range, correlation id; cursor pagination), `eventAt`,
//!   `event`, `streams`, `stream`, `sagas`, `saga` (steps with timings, compensations),
//!   `deadLetters`, `deadLetter`, `trace` (the causation tree of a correlation id),
//!   `schemas`, `projections` (each checkpointing reader's checkpoint and lag), `relay`
//!   (checkpoint and lag), `system`. Mutations: `publishEvent` (stored, then delivered by
//!   the relay), `replayEvents`, `reprocessDeadLetter`, `discardDeadLetter`. Every event
//!   also reads as its CloudEvents JSON (`cloudEvent`). The `orchestrator` CLI's
//!   `--server URL` runs its commands through these.
//! - `GET /graphql/ws` — GraphQL subscriptions over WebSocket (protocol
//!   `graphql-transport-ws`): `events(types, fromPosition)` streams stored events matching
//!   type patterns, catching up from a position and then live, with no gap; a live
//!   subscriber more than [`ServerConfig::subscription_window`] events behind the store's
//!   head gets `SLOW_CONSUMER` (with `resumeFrom`) and its subscription ends. Nothing is
//!   buffered per subscriber: each reads the store at its own pace. `sagaUpdates(sagaId,
//!   fromPosition)` streams saga transitions (started, steps, compensations, finished
//!   with its status) the same way; `deadLetterArrivals(since, pollMs)` pushes dead
//!   letters as they are parked (by polling the queue, which has no change feed).
//! - `GET /` — the dashboard (assets under `/assets/`, embedded in the binary, nothing
//!   fetched from elsewhere): live events with a type filter, event detail as CloudEvents
//!   JSON, a request's trace as a waterfall, sagas with their timelines, the dead-letter
//!   queue with reprocess and discard, throughput, DLQ depth and projection lag. It talks
//!   to `/graphql` and `/graphql/ws` like any client, asking for the token when the server
//!   has one; [`ServerConfig::dashboard`] turns it off.
//! - `GET /healthz` — liveness (`ok`).
//! - `GET /readyz` — readiness: the store answers and the outbox relay is relaying,
//!   standing by or idle (not retrying a failing transport); 503 otherwise, naming the
//!   failed check.
//! - `GET /metrics` — Prometheus text: store head, relay position, checkpoint and lag,
//!   dead letters, and what a [`PrometheusHandle`](metrics_exporter_prometheus::PrometheusHandle)
//!   given to [`ServerConfig::prometheus`] collected.
//!
//! ## Security
//!
//! - A bearer token ([`ServerConfig::bearer_token`]) guards `/graphql`, `/graphql/ws` (in
//!   the upgrade request's `Authorization` header, or — for browsers, which cannot set it —
//!   as `{"authorization": "Bearer <token>"}` in the `connection_init` payload) and
//!   `/metrics`; it
//!   is **required** when the listen address is not loopback ([`Error::TokenRequired`]).
//! - [`ServerConfig::read_only`] refuses every mutation.
//! - Queries deeper or larger than the limits ([`ServerConfig::max_depth`],
//!   [`ServerConfig::max_complexity`]) are refused before they run; pages are capped
//!   ([`ServerConfig::max_page_size`]), and so is what one request may scan
//!   ([`ServerConfig::max_scan`]).
//! - No CORS headers unless origins are allowed ([`ServerConfig::allow_origin`]).
//! - The token never appears in `Debug` output or logs.
//!
//! ## Errors
//!
//! A request the server refuses before execution gets a 4xx status and a GraphQL-shaped
//! body (`{"errors": [{"message", "extensions": {"code"}}]}`): `BAD_REQUEST` (not a GraphQL
//! request), `UNAUTHENTICATED` (401). Errors of an executed request come back with status
//! 200 in `errors`, with `extensions.code`: `PAGE_TOO_LARGE` (with `maxPageSize`),
//! `BAD_USER_INPUT`, `NOT_FOUND`, `READ_ONLY`, `BACKEND_ERROR`, `SCAN_LIMIT`,
//! `SLOW_CONSUMER`; syntax, validation, depth
//! and complexity errors carry the parser's message.
//!
//! ## Features
//!
//! - `redis` — serve an orchestrator on the Redis backend (forwards `orchestrator/redis`).
//! - `cli` — the `orchestrator-server` binary: `--store URL --transport URL --listen ADDR`,
//!   the token from `ORCHESTRATOR_SERVER_TOKEN`, `--read-only`, `--no-dashboard`,
//!   `--max-page-size`, `--allow-origin`
//!   (`cargo run -p orchestrator-server --features cli,redis -- --help`).
//!
//! ## Why a crate above the umbrella
//!
//! The server serves an [`EventOrchestrator`], which lives in the umbrella crate
//! `orchestrator`; so this crate depends on the umbrella, and the umbrella cannot depend on
//! it (Cargo allows no cycle). `EventOrchestrator::serve(addr)` is therefore the extension
//! trait [`ServeExt`], and the command line is this crate's own binary rather than an
//! `orchestrator serve` subcommand.
// On docs.rs (`--cfg docsrs`, a nightly rustdoc): label what needs a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod dashboard;
mod error;
mod graphql;
mod http;
mod ops;

use std::future::Future;
use std::net::SocketAddr;

use orchestrator::EventOrchestrator;

pub use config::{
    DEFAULT_MAX_COMPLEXITY, DEFAULT_MAX_DEPTH, DEFAULT_MAX_PAGE_SIZE, DEFAULT_MAX_SCAN,
    DEFAULT_SUBSCRIPTION_WINDOW, ServerConfig,
};
pub use error::{Error, Result};
pub use graphql::schema_sdl;
pub use http::{Server, router};

/// Serves `orchestrator` on `listen` with the default [`ServerConfig`] until the process
/// ends. A loopback address only: elsewhere a token is needed ([`serve_with`]).
pub async fn serve(orchestrator: EventOrchestrator, listen: SocketAddr) -> Result<()> {
    serve_with(orchestrator, ServerConfig::new(listen)).await
}

/// Serves `orchestrator` as `config` says until the process ends.
pub async fn serve_with(orchestrator: EventOrchestrator, config: ServerConfig) -> Result<()> {
    Server::bind(orchestrator, config).await?.run().await
}

/// `orchestrator.serve(addr)`: serving as a method of [`EventOrchestrator`].
///
/// ```no_run
/// use orchestrator::EventOrchestrator;
/// use orchestrator_server::ServeExt as _;
///
/// # async fn run() -> orchestrator_server::Result<()> {
/// let orchestrator = EventOrchestrator::new();
/// orchestrator.serve("127.0.0.1:8080".parse().expect("an address")).await
/// # }
/// ```
pub trait ServeExt {
    /// Serves this orchestrator on `listen` (loopback) until the process ends; see [`serve`].
    fn serve(&self, listen: SocketAddr) -> impl Future<Output = Result<()>> + Send;

    /// Serves this orchestrator as `config` says until the process ends.
    fn serve_with(&self, config: ServerConfig) -> impl Future<Output = Result<()>> + Send;
}

impl ServeExt for EventOrchestrator {
    fn serve(&self, listen: SocketAddr) -> impl Future<Output = Result<()>> + Send {
        serve(self.clone(), listen)
    }

    fn serve_with(&self, config: ServerConfig) -> impl Future<Output = Result<()>> + Send {
        serve_with(self.clone(), config)
    }
}
