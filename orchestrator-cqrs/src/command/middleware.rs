//! Middleware: code that runs around every command's handler.
//!
//! A [`CommandMiddleware`] gets the [`CommandRequest`] and the [`Next`] step; it may look at
//! or change the request, refuse it, or call `next.run(request)` and look at the outcome.
//! Middleware is added to [`CommandBus::builder`](crate::CommandBus::builder); the first
//! added runs first. Validation runs after all middleware, right before the handler.
//!
//! Provided: [`LoggingMiddleware`], [`AuthorizationMiddleware`] and
//! [`IdempotencyMiddleware`](crate::IdempotencyMiddleware).
//!
//! ```
//! use orchestrator_core::HandlerError;
//! use orchestrator_cqrs::{
//!     AuthorizationMiddleware, CommandBus, CommandRequest, Error, LoggingMiddleware,
//! };
//! use serde_json::{Value, json};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_cqrs::Result<()> {
//! let admins_only = |request: &CommandRequest| match request.principal.as_deref() {
//!     Some("admin") => Ok(()),
//!     _ => Err("only admins may do this".to_owned()),
//! };
//! let bus = CommandBus::builder()
//!     .middleware(LoggingMiddleware)
//!     .middleware(AuthorizationMiddleware::new(admins_only))
//!     .build();
//! bus.register("purge", |_: Value| async { Ok::<_, HandlerError>(json!("purged")) })?;
//!
//! let refused = bus.send("purge", json!({})).await;
//! assert!(matches!(refused, Err(Error::Unauthorized { .. })));
//! let done = bus
//!     .dispatch(CommandRequest::new("purge", json!({})).with_principal("admin"))
//!     .await?;
//! assert_eq!(done.value, "purged");
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{CommandOutcome, CommandRequest, Registered, run_handler};
use crate::error::{Error, Result};

/// Runs around every command's handler; see the [module docs](self).
#[async_trait]
pub trait CommandMiddleware: Send + Sync + 'static {
    /// Handles `request`, usually by calling `next.run(request)`.
    async fn handle(&self, request: CommandRequest, next: Next<'_>) -> Result<CommandOutcome>;
}

/// The rest of the chain: later middleware, then validation and the handler.
pub struct Next<'a> {
    rest: &'a [Arc<dyn CommandMiddleware>],
    registered: &'a Registered,
}

impl std::fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next")
            .field("command", &self.registered.name)
            .field("middleware_left", &self.rest.len())
            .finish()
    }
}

impl<'a> Next<'a> {
    pub(crate) fn new(chain: &'a [Arc<dyn CommandMiddleware>], registered: &'a Registered) -> Self {
        Self {
            rest: chain,
            registered,
        }
    }

    /// Runs the rest of the chain.
    pub async fn run(self, request: CommandRequest) -> Result<CommandOutcome> {
        match self.rest.split_first() {
            Some((first, rest)) => {
                let next = Next {
                    rest,
                    registered: self.registered,
                };
                first.handle(request, next).await
            }
            None => run_handler(self.registered, request).await,
        }
    }
}

/// Logs each command's outcome and duration through `tracing` (info on success, warn on
/// failure), with its name and id but never its payload.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoggingMiddleware;

#[async_trait]
impl CommandMiddleware for LoggingMiddleware {
    async fn handle(&self, request: CommandRequest, next: Next<'_>) -> Result<CommandOutcome> {
        let name = request.name.clone();
        let id = request.id.clone();
        let started = Instant::now();
        let outcome = next.run(request).await;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        match &outcome {
            Ok(o) => tracing::info!(
                command = %name,
                command_id = id.as_deref(),
                position = o.position,
                replayed = o.replayed,
                elapsed_ms,
                "command handled"
            ),
            Err(e) => tracing::warn!(
                command = %name,
                command_id = id.as_deref(),
                outcome = e.label(),
                elapsed_ms,
                "command failed: {e}"
            ),
        }
        outcome
    }
}

/// Decides whether a command may run. Any `Fn(&CommandRequest) -> Result<(), String>`
/// closure is one (the `String` is the reason for a refusal); implement the trait for checks
/// that need to await something.
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// `Ok` to let `request` through; `Err(reason)` to refuse it.
    async fn authorize(&self, request: &CommandRequest) -> std::result::Result<(), String>;
}

#[async_trait]
impl<F> Authorizer for F
where
    F: Fn(&CommandRequest) -> std::result::Result<(), String> + Send + Sync + 'static,
{
    async fn authorize(&self, request: &CommandRequest) -> std::result::Result<(), String> {
        self(request)
    }
}

/// Refuses commands its [`Authorizer`] refuses, with [`Error::Unauthorized`]; the handler
/// does not run.
#[derive(Debug, Clone)]
pub struct AuthorizationMiddleware<A> {
    authorizer: A,
}

impl<A: Authorizer> AuthorizationMiddleware<A> {
    /// Checks every command with `authorizer`.
    pub fn new(authorizer: A) -> Self {
        Self { authorizer }
    }
}

#[async_trait]
impl<A: Authorizer> CommandMiddleware for AuthorizationMiddleware<A> {
    async fn handle(&self, request: CommandRequest, next: Next<'_>) -> Result<CommandOutcome> {
        if let Err(reason) = self.authorizer.authorize(&request).await {
            metrics::counter!(crate::telemetry::UNAUTHORIZED, "command" => request.name.clone())
                .increment(1);
            return Err(Error::Unauthorized {
                command: request.name.to_string(),
                reason,
            });
        }
        next.run(request).await
    }
}
