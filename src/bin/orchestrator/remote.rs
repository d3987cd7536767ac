//! `--server URL`: the commands through a running `orchestrator-server`, as a client of its
//! GraphQL API — requests over HTTP/1 (`POST /graphql`), subscriptions over WebSocket
//! (`GET /graphql/ws`, protocol graphql-transport-ws).
//!
//! This is the way into an embedded deployment whose store directory the application
//! holds: the server runs inside that application and reads its orchestrator. The client
//! speaks plain `http://` only (no TLS): reach a remote server through a tunnel or a
//! TLS-terminating proxy on its host.

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use orchestrator::core::{EventEnvelope, cloudevents};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest as _};

/// Why a request through the server failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    /// `--server` is not an `http://` URL this client can use.
    #[error("--server `{url}` cannot be used: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Nothing answers at the server's address.
    #[error(
        "cannot reach the orchestrator server at {url}: {why} (is it running and listening there?)"
    )]
    Unreachable {
        /// The server URL.
        url: String,
        /// The connection error.
        why: String,
    },
    /// Connecting took longer than `--connect-timeout`.
    #[error(
        "the orchestrator server at {url} did not answer within {timeout:?} (see --connect-timeout)"
    )]
    Timeout {
        /// The server URL.
        url: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The server wants a bearer token, and none or a wrong one was sent.
    #[error("{}", unauthorized(url, *token_given))]
    Unauthorized {
        /// The server URL.
        url: String,
        /// Whether a token was sent (so it was the wrong one).
        token_given: bool,
    },
    /// An HTTP error that is not a GraphQL answer.
    #[error("the orchestrator server at {url} answered HTTP {status}: {body}")]
    Http {
        /// The server URL.
        url: String,
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The API refused or failed the request: its errors, with their codes.
    #[error("the orchestrator server refused the request: {message}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    GraphQl {
        /// The `extensions.code` of the first error, if any.
        code: Option<String>,
        /// The errors' messages.
        message: String,
        /// The `extensions.resumeFrom` of the first error: where a subscription that ended
        /// with `SLOW_CONSUMER` goes on from.
        resume_from: Option<u64>,
    },
    /// The answer is not what this client expects.
    #[error(
        "the answer of the orchestrator server at {url} is not what this CLI expects: {why} (is it an orchestrator-server of the same version?)"
    )]
    Protocol {
        /// The server URL.
        url: String,
        /// What was wrong.
        why: String,
    },
    /// The command, or one of its options, has no counterpart in the server's API.
    #[error("`{what}` cannot run through --server: {missing}")]
    Unsupported {
        /// The command or option.
        what: String,
        /// What the API lacks, and what to do instead.
        missing: String,
    },
}

fn unauthorized(url: &str, token_given: bool) -> String {
    if token_given {
        format!(
            "the orchestrator server at {url} refused the token (HTTP 401): check --token or \
             ORCHESTRATOR_TOKEN against the server's ORCHESTRATOR_SERVER_TOKEN"
        )
    } else {
        format!(
            "the orchestrator server at {url} needs a bearer token (HTTP 401): pass --token or \
             set ORCHESTRATOR_TOKEN"
        )
    }
}

/// A result of the client.
pub(crate) type RemoteResult<T> = Result<T, RemoteError>;

/// Where the server is and how to talk to it. Its `Debug` leaves the token out.
#[derive(Clone)]
pub(crate) struct Server {
    /// The URL as given, without a trailing `/` (for messages).
    url: String,
    /// The host to connect to, without IPv6 brackets.
    host: String,
    /// The `Host` header and WebSocket authority: host (bracketed if IPv6) and port.
    authority: String,
    port: u16,
    /// The path the server's routes are under (empty, or `/prefix`).
    base: String,
    token: Option<String>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// The server at `url` (`http://HOST[:PORT][/PATH]`), sending `token` as a bearer token.
    pub(crate) fn new(
        url: &str,
        token: Option<String>,
        connect_timeout: Duration,
    ) -> RemoteResult<Self> {
        let bad = |why: &str| RemoteError::BadUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(bad(
                "this CLI's client speaks plain http:// only (no TLS); reach the server \
                 through an SSH tunnel or a TLS-terminating proxy on its host, as \
                 http://127.0.0.1:PORT",
            ));
        } else {
            return Err(bad(
                "expected http://HOST:PORT, as the server prints on start",
            ));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() {
            return Err(bad("it names no host"));
        }
        if authority.contains('@') {
            return Err(bad(
                "credentials go in --token (or ORCHESTRATOR_TOKEN), not in the URL",
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 host needs its closing `]`"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("it names no host"));
        }
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .map_err(|_| bad(&format!("`{port}` is not a port")))?,
            None => 80,
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            host: host.to_owned(),
            authority,
            port,
            base: path.trim_end_matches('/').to_owned(),
            token,
            connect_timeout,
        })
    }

    /// The URL as given (for messages).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> RemoteResult<TcpStream> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(error)) => Err(RemoteError::Unreachable {
                url: self.url.clone(),
                why: error.to_string(),
            }),
            Err(_) => Err(self.timeout()),
        }
    }

    fn timeout(&self) -> RemoteError {
        RemoteError::Timeout {
            url: self.url.clone(),
            timeout: self.connect_timeout,
        }
    }

    fn protocol(&self, why: impl Into<String>) -> RemoteError {
        RemoteError::Protocol {
            url: self.url.clone(),
            why: why.into(),
        }
    }

    /// Runs a GraphQL query or mutation; returns its `data`.
    pub(crate) async fn query(&self, query: &str, variables: Value) -> RemoteResult<Value> {
        let body = json!({ "query": query, "variables": variables }).to_string();
        let tcp = self.connect().await?;
        let handshake = hyper::client::conn::http1::handshake(TokioIo::new(tcp));
        let (mut sender, connection) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| self.timeout())?
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(connection);
        let mut request = Request::post(format!("{}/graphql", self.base))
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.protocol(format!("the request cannot be built: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        if status == StatusCode::UNAUTHORIZED {
            return Err(RemoteError::Unauthorized {
                url: self.url.clone(),
                token_given: self.token.is_some(),
            });
        }
        let answer: Value = match serde_json::from_slice(&body) {
            Ok(answer) => answer,
            Err(_) if !status.is_success() => {
                return Err(RemoteError::Http {
                    url: self.url.clone(),
                    status: status.as_u16(),
                    body: crate::output::shorten(&String::from_utf8_lossy(&body), 200),
                });
            }
            Err(e) => return Err(self.protocol(format!("the body is not JSON: {e}"))),
        };
        if let Some(error) = graphql_errors(&answer) {
            return Err(error);
        }
        if !status.is_success() {
            return Err(RemoteError::Http {
                url: self.url.clone(),
                status: status.as_u16(),
                body: crate::output::shorten(&answer.to_string(), 200),
            });
        }
        match answer.get("data") {
            Some(data) if !data.is_null() => Ok(data.clone()),
            _ => Err(self.protocol("a GraphQL answer with neither data nor errors")),
        }
    }

    fn unreachable(&self, error: impl std::fmt::Display) -> RemoteError {
        RemoteError::Unreachable {
            url: self.url.clone(),
            why: error.to_string(),
        }
    }

    /// Starts a GraphQL subscription over WebSocket; its items are the `data` of each
    /// `next` message.
    pub(crate) async fn subscribe(
        &self,
        query: &str,
        variables: Value,
    ) -> RemoteResult<Subscription> {
        let tcp = self.connect().await?;
        let mut request = format!("ws://{}{}/graphql/ws", self.authority, self.base)
            .into_client_request()
            .map_err(|e| self.protocol(format!("the WebSocket request cannot be built: {e}")))?;
        let headers = request.headers_mut();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static("graphql-transport-ws"),
        );
        if let Some(token) = &self.token {
            let value = header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| self.protocol("the token is not a valid header value"))?;
            headers.insert(header::AUTHORIZATION, value);
        }
        let handshake = tokio_tungstenite::client_async(request, tcp);
        let (socket, _) = match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => return Err(self.timeout()),
            Ok(Err(tungstenite::Error::Http(response)))
                if response.status() == StatusCode::UNAUTHORIZED =>
            {
                return Err(RemoteError::Unauthorized {
                    url: self.url.clone(),
                    token_given: self.token.is_some(),
                });
            }
            Ok(Err(error)) => return Err(self.unreachable(error)),
            Ok(Ok(connected)) => connected,
        };
        let mut subscription = Subscription {
            server: self.clone(),
            socket,
            ended: false,
        };
        let init = match &self.token {
            Some(token) => {
                json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}})
            }
            None => json!({"type": "connection_init"}),
        };
        subscription.send(init).await?;
        loop {
            let Some(message) = subscription.receive().await? else {
                return Err(self.protocol("the connection closed before it was acknowledged"));
            };
            match message["type"].as_str() {
                Some("connection_ack") => break,
                Some("ping") => subscription.send(json!({"type": "pong"})).await?,
                _ => return Err(self.protocol(format!("expected connection_ack, got {message}"))),
            }
        }
        subscription
            .send(json!({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}}))
            .await?;
        Ok(subscription)
    }
}

/// The first error of a GraphQL answer, with every message joined, if it has errors.
fn graphql_errors(answer: &Value) -> Option<RemoteError> {
    let errors = answer.get("errors")?.as_array()?;
    let first = errors.first()?;
    let messages: Vec<&str> = errors
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("(no message)"))
        .collect();
    Some(RemoteError::GraphQl {
        code: first["extensions"]["code"].as_str().map(str::to_owned),
        message: messages.join("; "),
        resume_from: first["extensions"]["resumeFrom"].as_u64(),
    })
}

/// A running GraphQL subscription.
pub(crate) struct Subscription {
    server: Server,
    socket: tokio_tungstenite::WebSocketStream<TcpStream>,
    ended: bool,
}

impl Subscription {
    async fn send(&mut self, message: Value) -> RemoteResult<()> {
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .map_err(|e| self.server.unreachable(e))
    }

    /// The next protocol message; `None` once the server closed the connection. A close
    /// before the subscription ended says why (a refused token closes with 4403).
    async fn receive(&mut self) -> RemoteResult<Option<Value>> {
        loop {
            let frame = match self.socket.next().await {
                None => return Ok(None),
                Some(Ok(frame)) => frame,
                Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(None),
                Some(Err(error)) => return Err(self.server.unreachable(error)),
            };
            match frame {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str())
                        .map(Some)
                        .map_err(|e| self.server.protocol(format!("a message is not JSON: {e}")));
                }
                Message::Close(close) => {
                    let (code, reason) = close
                        .map(|c| (u16::from(c.code), c.reason.to_string()))
                        .unwrap_or_default();
                    // A refused `connection_init` closes with the server's reason (1002).
                    if code == 4401 || code == 4403 || reason.contains("bearer token") {
                        return Err(RemoteError::Unauthorized {
                            url: self.server.url.clone(),
                            token_given: self.server.token.is_some(),
                        });
                    }
                    if code == 1000 || code == 0 {
                        return Ok(None);
                    }
                    return Err(self.server.protocol(format!(
                        "the server closed the connection ({code}): {reason}"
                    )));
                }
                _ => {}
            }
        }
    }

    /// The `data` of the next item; `None` once the subscription completed.
    pub(crate) async fn next(&mut self) -> RemoteResult<Option<Value>> {
        if self.ended {
            return Ok(None);
        }
        loop {
            let Some(message) = self.receive().await? else {
                self.ended = true;
                return Ok(None);
            };
            match message["type"].as_str() {
                Some("next") => {
                    let payload = &message["payload"];
                    if let Some(error) = graphql_errors(payload) {
                        self.ended = true;
                        return Err(error);
                    }
                    return Ok(Some(payload["data"].clone()));
                }
                Some("error") => {
                    self.ended = true;
                    let errors = json!({ "errors": message["payload"] });
                    return Err(graphql_errors(&errors)
                        .unwrap_or_else(|| self.server.protocol(format!("{message}"))));
                }
                Some("complete") => {
                    self.ended = true;
                    return Ok(None);
                }
                Some("ping") => self.send(json!({"type": "pong"})).await?,
                _ => {}
            }
        }
    }
}

/// An event of the API (selected with [`EVENT_FIELDS`]) as the envelope it stands for: its
/// CloudEvents JSON carries every attribute and its place in the store.
pub(crate) fn event(server: &Server, value: &Value) -> RemoteResult<EventEnvelope> {
    let cloud_event = value
        .get("cloudEvent")
        .ok_or_else(|| server.protocol("an event without `cloudEvent`"))?;
    let bytes = serde_json::to_vec(cloud_event)
        .map_err(|e| server.protocol(format!("an event's CloudEvent: {e}")))?;
    cloudevents::decode(&bytes).map_err(|e| server.protocol(format!("an event's CloudEvent: {e}")))
}

/// The fields of an `Event` that [`event`] reads.
pub(crate) const EVENT_FIELDS: &str = "cloudEvent";

/// A field of an answer, or a protocol error naming it.
pub(crate) fn field<'a>(server: &Server, value: &'a Value, name: &str) -> RemoteResult<&'a Value> {
    value.get(name).ok_or_else(|| {
        server.protocol(format!(
            "no `{name}` in {}",
            crate::output::shorten(&value.to_string(), 200)
        ))
    })
}

/// A string field of an answer.
pub(crate) fn text<'a>(server: &Server, value: &'a Value, name: &str) -> RemoteResult<&'a str> {
    field(server, value, name)?
        .as_str()
        .ok_or_else(|| server.protocol(format!("`{name}` is not a string")))
}

/// An array field of an answer.
pub(crate) fn list<'a>(
    server: &Server,
    value: &'a Value,
    name: &str,
) -> RemoteResult<&'a Vec<Value>> {
    field(server, value, name)?
        .as_array()
        .ok_or_else(|| server.protocol(format!("`{name}` is not a list")))
}

/// A time field of an answer (RFC 3339).
pub(crate) fn time(
    server: &Server,
    value: &Value,
    name: &str,
) -> RemoteResult<chrono::DateTime<chrono::Utc>> {
    let text = text(server, value, name)?;
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| server.protocol(format!("`{name}`: `{text}` is not an RFC 3339 time: {e}")))
}

/// A whole-number field of an answer.
pub(crate) fn number(server: &Server, value: &Value, name: &str) -> RemoteResult<u64> {
    field(server, value, name)?
        .as_u64()
        .ok_or_else(|| server.protocol(format!("`{name}` is not a whole number")))
}

/// The error for a command or option the server's API does not offer.
pub(crate) fn unsupported(what: &str, missing: &str) -> RemoteError {
    RemoteError::Unsupported {
        what: what.to_owned(),
        missing: missing.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(url: &str) -> RemoteResult<Server> {
        Server::new(url, None, Duration::from_secs(1))
    }

    #[test]
    fn server_urls_parse() {
        let s = server("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.base.as_str()),
            ("127.0.0.1", 8080, "")
        );
        assert_eq!(s.url(), "http://127.0.0.1:8080");
        let s = server("http://example.com/orchestrator/").unwrap();
        assert_eq!(
            (s.authority.as_str(), s.base.as_str()),
            ("example.com:80", "/orchestrator")
        );
        let s = server("http://[::1]:9000").unwrap();
        assert_eq!(
            (s.host.as_str(), s.authority.as_str()),
            ("::1", "[::1]:9000")
        );
        for (bad, says) in [
            ("https://x:1", "plain http://"),
            ("127.0.0.1:8080", "expected http://"),
            ("http://:8080", "no host"),
            ("http://h:port", "not a port"),
            ("http://user:pw@h:1", "--token"),
            ("http://", "no host"),
        ] {
            let error = server(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn graphql_errors_are_joined_with_the_first_code() {
        let answer = json!({"errors": [
            {"message": "dead letter `x` not found", "extensions": {"code": "NOT_FOUND"}},
            {"message": "second"}
        ]});
        let error = graphql_errors(&answer).unwrap().to_string();
        assert_eq!(
            error,
            "the orchestrator server refused the request: dead letter `x` not found; second (NOT_FOUND)"
        );
        assert!(graphql_errors(&json!({"data": {}})).is_none());
    }
}
