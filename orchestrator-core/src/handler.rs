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
use std::pin::Pin;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::ReusableBoxFuture;

use crate::envelope::EventEnvelope;
use crate::error::HandlerError;

/// Handles events. Any `Fn(EventEnvelope) -> impl Future<Output = Result<(), E>>` closure
/// is one, where `E` converts into [`HandlerError`].
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Handles one event. A retryable error asks for a retry, a permanent one for the
    /// dead-letter queue.
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError>;

    /// Starts [`handle`](Self::handle) in `slot` and returns the call to poll. The default
    /// stores the boxed future `handle` returns; closure handlers override it to put their
    /// future straight into the slot, whose allocation is reused from one event to the
    /// next. Implement it only to spare that allocation in a hand-written handler, as
    /// `slot.set(async move { … })`.
    fn handle_in<'a, 's>(
        &'a self,
        event: EventEnvelope,
        slot: &'s mut HandlerSlot<'a>,
    ) -> HandlerCall<'s> {
        slot.set(self.handle(event))
    }
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

    fn handle_in<'a, 's>(
        &'a self,
        event: EventEnvelope,
        slot: &'s mut HandlerSlot<'a>,
    ) -> HandlerCall<'s> {
        let handling = (self)(event);
        slot.set(async move { handling.await.map_err(Into::into) })
    }
}

/// A handler call started by [`EventHandler::handle_in`], to be polled to its end.
pub type HandlerCall<'s> = Pin<&'s mut (dyn Future<Output = Result<(), HandlerError>> + Send + 's)>;

/// Where a consumer keeps the future of the handler call it is running, so that calling
/// the same handler again and again reuses one allocation (see
/// [`EventHandler::handle_in`]).
///
/// ```
/// use orchestrator_core::{EventEnvelope, EventHandler, HandlerError, HandlerSlot};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator_core::Result<()> {
/// let handler = |event: EventEnvelope| async move {
///     assert_eq!(event.event_type(), "user.created");
///     Ok::<_, HandlerError>(())
/// };
/// let mut slot = HandlerSlot::new();
/// for _ in 0..3 {
///     handler.handle_in(EventEnvelope::new("user.created", &1)?, &mut slot).await.unwrap();
/// }
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct HandlerSlot<'a> {
    future: Option<ReusableBoxFuture<'a, Result<(), HandlerError>>>,
}

impl std::fmt::Debug for HandlerSlot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerSlot")
            .field("started", &self.future.is_some())
            .finish()
    }
}

impl<'a> HandlerSlot<'a> {
    /// An empty slot: its first call allocates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the future in the slot (dropping the previous one), reusing its allocation
    /// when the two futures have the same size and alignment, and returns it to poll.
    pub fn set<F>(&mut self, future: F) -> HandlerCall<'_>
    where
        F: Future<Output = Result<(), HandlerError>> + Send + 'a,
    {
        let slot = match self.future.take() {
            Some(mut slot) => {
                slot.set(future);
                self.future.insert(slot)
            }
            None => self.future.insert(ReusableBoxFuture::new(future)),
        };
        slot.get_pin()
    }

    /// The call last [`set`](Self::set), to poll again after a first poll returned
    /// `Pending`; `None` before the first call.
    pub fn in_flight(&mut self) -> Option<HandlerCall<'_>> {
        self.future.as_mut().map(ReusableBoxFuture::get_pin)
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
