//! The HTTP side: routes, bearer-token check, CORS, and [`Server`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use orchestrator::EventOrchestrator;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::ServerConfig;
use crate::dashboard;
use crate::error::{Error, Result};
use crate::graphql::{self, ApiSchema};
use crate::ops;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) orchestrator: EventOrchestrator,
    schema: ApiSchema,
    token: Option<Arc<str>>,
    pub(crate) prometheus: Option<PrometheusHandle>,
}

/// The server's routes over `orchestrator`, to serve yourself or to nest in an axum
/// application: `POST /graphql`, `GET /graphql/ws` (subscriptions over WebSocket), `GET /healthz`,
/// `GET /readyz`, `GET /metrics`, and the dashboard (`GET /`, `GET /assets/…`) unless
/// [`ServerConfig::dashboard`] turned it off.
///
/// Fails like [`ServerConfig::validate`] (the listen address decides whether a token is
/// required, even though this does not listen).
pub fn router(orchestrator: EventOrchestrator, config: &ServerConfig) -> Result<Router> {
    config.validate()?;
    let state = AppState {
        schema: graphql::schema(orchestrator.clone(), config),
        orchestrator,
        token: config.token.clone(),
        prometheus: config.prometheus.clone(),
    };
    let guarded = Router::new()
        .route("/graphql", post(graphql_request))
        .route("/metrics", get(ops::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let mut app = Router::new()
        // Checks the token itself: browsers cannot set headers on a WebSocket, so the token
        // may also come in the `connection_init` message.
        .route("/graphql/ws", get(graphql_ws))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .merge(guarded);
    if config.dashboard {
        // Public: the page holds no data, and asks for the token the API needs.
        app = app.merge(dashboard::routes());
    }
    let app = app.with_state(state);
    let origins = config.origin_headers()?;
    if origins.is_empty() {
        return Ok(app);
    }
    Ok(app.layer(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    ))
}

/// A GraphQL error response outside of execution (bad JSON, no token), shaped like the
/// errors of an executed request.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "errors": [{ "message": message, "extensions": { "code": code } }] });
    (status, Json(body)).into_response()
}

/// `POST /graphql`: a JSON body `{query, variables?, operationName?}`.
async fn graphql_request(State(state): State<AppState>, body: Bytes) -> Response {
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!(
                    "the body is not a GraphQL request (a JSON object with `query`, and optionally \
                     `variables` and `operationName`): {error}"
                ),
            );
        }
    };
    Json(state.schema.execute(request).await).into_response()
}

/// `GET /graphql/ws`: GraphQL over WebSocket (graphql-transport-ws, or the older
/// graphql-ws). With a token configured, the upgrade request carries it in
/// `Authorization: Bearer <token>`, or the `connection_init` payload does
/// (`{"authorization": "Bearer <token>"}`); otherwise the connection is closed with a
/// reason saying so.
async fn graphql_ws(
    State(state): State<AppState>,
    protocol: GraphQLProtocol,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let token = state.token.clone();
    let by_header = token.as_deref().is_none_or(|token| {
        bearer(
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
        .is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes()))
    });
    let schema = state.schema.clone();
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| {
            GraphQLWebSocket::new(socket, schema, protocol)
                .on_connection_init(move |payload| async move {
                    let by_payload = || {
                        let given = ["authorization", "Authorization"]
                            .iter()
                            .find_map(|key| payload.get(key).and_then(|v| v.as_str()));
                        token.as_deref().is_some_and(|token| {
                            bearer(given).is_some_and(|given| {
                                same_secret(given.as_bytes(), token.as_bytes())
                            })
                        })
                    };
                    if by_header || by_payload() {
                        Ok(async_graphql::Data::default())
                    } else {
                        tracing::info!("WebSocket refused: missing or wrong bearer token");
                        // The reason travels in a close frame: at most 123 bytes.
                        Err(async_graphql::Error::new(
                            "missing or wrong bearer token: send `authorization: Bearer <token>` \
                             in the upgrade or the connection_init payload",
                        ))
                    }
                })
                .serve()
        })
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer(value: Option<&str>) -> Option<&str> {
    value.and_then(|value| value.strip_prefix("Bearer "))
}

/// Lets a request through when no token is configured or it carries
/// `Authorization: Bearer <token>`.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let given = bearer(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok()),
    );
    match given {
        Some(given) if same_secret(given.as_bytes(), token.as_bytes()) => next.run(request).await,
        given => {
            tracing::info!(
                path = %request.uri().path(),
                token_given = given.is_some(),
                "request refused: missing or wrong bearer token"
            );
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "this server needs `Authorization: Bearer <token>`, and the request has none or \
                 a wrong one",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// Compares two secrets in time that depends on their lengths only, not on where they
/// first differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// A bound server, ready to run.
///
/// [`Server::bind`] checks the configuration and listens, so that the address (with port
/// 0: the port the system chose) is known before [`run`](Server::run).
pub struct Server {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    app: Router,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Checks `config` ([`ServerConfig::validate`]) and listens on its address.
    pub async fn bind(orchestrator: EventOrchestrator, config: ServerConfig) -> Result<Self> {
        let app = router(orchestrator, &config)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                listen: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            listen: config.listen,
            source,
        })?;
        tracing::info!(
            listen = %local_addr,
            auth = config.token.is_some(),
            read_only = config.read_only,
            "orchestrator server listening"
        );
        Ok(Self {
            listener,
            local_addr,
            app,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until the process ends or the listener fails.
    pub async fn run(self) -> Result<()> {
        axum::serve(self.listener, self.app)
            .await
            .map_err(Error::Serve)
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        axum::serve(self.listener, self.app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(Error::Serve)
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
