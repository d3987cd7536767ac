//! The server's error type.

use std::net::SocketAddr;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while configuring, binding or running the server.
///
/// Errors of a GraphQL request are not here: they go back to the client in the response's
/// `errors` list, with an `extensions.code` (see the [crate docs](crate#errors)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listen address is not a loopback address and no bearer token is configured:
    /// anyone who can reach the address could read every event.
    #[error(
        "listening on {listen}, which is not a loopback address, needs a bearer token \
         (ServerConfig::bearer_token, or `--token` / ORCHESTRATOR_SERVER_TOKEN on the command line)"
    )]
    TokenRequired {
        /// The address asked for.
        listen: SocketAddr,
    },
    /// A setting that cannot work (an empty token, a zero page size, an origin that is not
    /// a valid header value, …).
    #[error("invalid server configuration: {0}")]
    InvalidConfig(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        /// The address asked for.
        listen: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server stopped on an I/O error.
    #[error("the server stopped: {0}")]
    Serve(#[source] std::io::Error),
}
