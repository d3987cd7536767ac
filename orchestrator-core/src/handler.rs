//! Object-safe handler traits, implemented by async closures.
//!
//! ```
//! use std::sync::Arc;
//! use orchestrator_core::{EventEnvelope, EventHandler, HandlerError, JsonHandler};
//!
//! let on_event: Arc<dyn EventHandler> = Arc::new(|event: EventEnvelope| async move {
//!     let _payload: serde_json::Value = event.data()?;
//!     Ok::<_, HandlerError>(())
//! });
//! let double: Arc<dyn JsonHandler> = Arc::new(|input: serde_json::Value| async move {
//!     Ok::<_, HandlerError>(serde_json::json!({"twice": input["n"].as_i64().unwrap_or(0) * 2}))
//! });
//! # let _ = (on_event, double);
//! ```

use std::future::Future;

use async_trait::async_trait;
use serde_json::Value;

use crate::envelope::EventEnvelope;
use crate::error::HandlerError;

/// Handles events. Any `Fn(EventEnvelope) -> impl Future<Output = Result<(), E>>` closure
/// is one, where `E` converts into [`HandlerError`].
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Handles one event. A retryable error asks for a retry, a permanent one for the
    /// dead-letter queue.
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut, E> EventHandler for F
where
    F: Fn(EventEnvelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<HandlerError> + 'static,
{
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        (self)(event).await.map_err(Into::into)
    }
}

/// Takes a JSON value and returns one: commands, queries and saga steps in their dynamic
/// form. Any `Fn(Value) -> impl Future<Output = Result<Value, E>>` closure is one.
#[async_trait]
pub trait JsonHandler: Send + Sync + 'static {
    /// Handles one input.
    async fn call(&self, input: Value) -> Result<Value, HandlerError>;
}

#[async_trait]
impl<F, Fut, E> JsonHandler for F
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, E>> + Send + 'static,
    E: Into<HandlerError> + 'static,
{
    async fn call(&self, input: Value) -> Result<Value, HandlerError> {
        (self)(input).await.map_err(Into::into)
    }
}
