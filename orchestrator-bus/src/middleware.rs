//! Middleware: cross-cutting code wrapped around every handler call of a subscription
//! (logging, timing, deduplication, authorization, …), and the [`DeliveryContext`] it sees.
//!
//! A middleware gets the event, the context and [`Next`] — the rest of the chain ending in
//! the handler. It may change the event, skip the handler (return without calling `next`),
//! or look at the outcome.
//!
//! ```
//! use async_trait::async_trait;
//! use orchestrator_bus::middleware::{DeliveryContext, Middleware, Next};
//! use orchestrator_core::{EventEnvelope, HandlerError};
//!
//! /// Refuses events without a tenant header, for good.
//! struct RequireTenant;
//!
//! #[async_trait]
//! impl Middleware for RequireTenant {
//!     async fn handle(
//!         &self,
//!         event: EventEnvelope,
//!         ctx: &DeliveryContext,
//!         next: Next<'_>,
//!     ) -> Result<(), HandlerError> {
//!         if event.header("tenant").is_none() {
//!             return Err(HandlerError::permanent("no tenant header"));
//!         }
//!         next.run(event, ctx).await
//!     }
//! }
//! ```

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::{
    Delivery, EventEnvelope, EventHandler, HandlerError, InMemoryInbox, Inbox, InboxRetention,
};

/// What a handler or middleware knows about the delivery it is handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryContext {
    /// The subscription's name (its consumer group).
    pub subscription: Arc<str>,
    /// The topic the event was published to.
    pub topic: Arc<str>,
    /// Which attempt this is: 1 for the first.
    pub attempt: u32,
    /// The error of the previous attempt, if this is a retry.
    pub last_error: Option<String>,
    /// When the event was first delivered to this subscription.
    pub first_attempt_at: DateTime<Utc>,
}

thread_local! {
    /// The context of the delivery whose handler this thread is polling. Between polls it
    /// keeps the last one, inactive, so that the next poll for the same subscription only
    /// updates what changed — no reference count, no allocation per delivery.
    static CURRENT: RefCell<Current> = const {
        RefCell::new(Current {
            active: false,
            ctx: None,
        })
    };
}

struct Current {
    /// Whether a handler is being polled under `ctx` right now.
    active: bool,
    ctx: Option<DeliveryContext>,
}

impl DeliveryContext {
    /// The context of the delivery being handled by the calling task, if any: lets a plain
    /// closure handler read its attempt count and last error. It is set while the bus
    /// polls the handler, so code the handler spawns onto other tasks does not see it.
    /// Each call returns a new copy.
    pub fn current() -> Option<Arc<DeliveryContext>> {
        CURRENT
            .try_with(|current| {
                let current = current.try_borrow().ok()?;
                current
                    .active
                    .then(|| current.ctx.clone().map(Arc::new))
                    .flatten()
            })
            .ok()
            .flatten()
    }
}

/// The context of a delivery as the bus polls its handler, borrowed from the delivery and
/// the subscription.
pub(crate) struct ContextRef<'a> {
    pub(crate) subscription: &'a Arc<str>,
    pub(crate) delivery: &'a Delivery,
    pub(crate) attempt: u32,
    pub(crate) last_error: Option<&'a str>,
}

impl ContextRef<'_> {
    /// The context as a value (for middleware).
    pub(crate) fn to_context(&self) -> DeliveryContext {
        DeliveryContext {
            subscription: Arc::clone(self.subscription),
            topic: self.delivery.topic_shared(),
            attempt: self.attempt,
            last_error: self.last_error.map(str::to_owned),
            first_attempt_at: self.delivery.first_attempt_at(),
        }
    }

    /// Makes `ctx` this context, touching only the fields that differ.
    fn write_into(&self, ctx: &mut Option<DeliveryContext>) {
        let Some(ctx) = ctx else {
            *ctx = Some(self.to_context());
            return;
        };
        if !Arc::ptr_eq(&ctx.subscription, self.subscription) {
            ctx.subscription = Arc::clone(self.subscription);
        }
        if !crate::fasthash::same_str(&ctx.topic, self.delivery.topic()) {
            ctx.topic = self.delivery.topic_shared();
        }
        ctx.attempt = self.attempt;
        if ctx.last_error.as_deref() != self.last_error {
            ctx.last_error = self.last_error.map(str::to_owned);
        }
        ctx.first_attempt_at = self.delivery.first_attempt_at();
    }

    /// Polls `future` once with this as the [`current`](DeliveryContext::current)
    /// context. A panic in it is caught and returned as `Err`.
    pub(crate) fn poll_in<F: Future + ?Sized>(
        &self,
        mut future: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> std::thread::Result<Poll<F::Output>> {
        let mut poll = || std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        // One access to the thread-local for the whole poll. `try_with`: a thread being
        // torn down has no context to give; the poll goes on without one.
        let mut polled = None;
        let _ = CURRENT.try_with(|current| polled = Some(self.poll_with(current, &mut poll)));
        match polled {
            Some(polled) => polled,
            None => poll(),
        }
    }

    /// Runs `poll` with this as the context in `current`. A thread already polling a
    /// handler (one polled from inside another) gets the outer context back afterwards; a
    /// context being read right now (`try_borrow_mut` fails) leaves the handler without.
    fn poll_with<T>(&self, current: &RefCell<Current>, poll: impl FnOnce() -> T) -> T {
        let outer = match current.try_borrow_mut() {
            Ok(mut current) if !current.active => {
                self.write_into(&mut current.ctx);
                current.active = true;
                None
            }
            Ok(mut current) => Some(current.ctx.replace(self.to_context())),
            Err(_) => return poll(),
        };
        let polled = poll();
        if let Ok(mut current) = current.try_borrow_mut() {
            match outer {
                None => current.active = false,
                Some(outer) => current.ctx = outer,
            }
        }
        polled
    }
}

/// Code wrapped around a subscription's handler.
#[async_trait]
pub trait Middleware: Send + Sync + 'static {
    /// Handles `event`, usually by calling `next.run(event, ctx)` somewhere inside.
    async fn handle(
        &self,
        event: EventEnvelope,
        ctx: &DeliveryContext,
        next: Next<'_>,
    ) -> Result<(), HandlerError>;
}

/// The rest of a middleware chain, ending in the handler.
pub struct Next<'a> {
    rest: &'a [Arc<dyn Middleware>],
    handler: &'a dyn EventHandler,
}

impl std::fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next")
            .field("middleware_left", &self.rest.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Next<'a> {
    pub(crate) fn new(chain: &'a [Arc<dyn Middleware>], handler: &'a dyn EventHandler) -> Self {
        Self {
            rest: chain,
            handler,
        }
    }

    /// Runs the rest of the chain and the handler.
    pub async fn run(
        self,
        event: EventEnvelope,
        ctx: &DeliveryContext,
    ) -> Result<(), HandlerError> {
        match self.rest.split_first() {
            Some((first, rest)) => {
                first
                    .handle(event, ctx, Next::new(rest, self.handler))
                    .await
            }
            None => self.handler.handle(event).await,
        }
    }
}

/// Logs each handled event (type, id, attempt, duration, outcome) with `tracing` — never
/// the payload.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogEvents;

#[async_trait]
impl Middleware for LogEvents {
    async fn handle(
        &self,
        event: EventEnvelope,
        ctx: &DeliveryContext,
        next: Next<'_>,
    ) -> Result<(), HandlerError> {
        let event_type = event.event_type().to_owned();
        let event_id = event.id().clone();
        let started = Instant::now();
        let outcome = next.run(event, ctx).await;
        let elapsed = started.elapsed();
        match &outcome {
            Ok(()) => tracing::info!(
                subscription = %ctx.subscription, %event_type, %event_id,
                attempt = ctx.attempt, ?elapsed, "handled"
            ),
            Err(error) => tracing::warn!(
                subscription = %ctx.subscription, %event_type, %event_id,
                attempt = ctx.attempt, ?elapsed, error = error.message(),
                retryable = error.is_retryable(), "handler failed"
            ),
        }
        outcome
    }
}

/// The idempotent consumer: skips an event whose id its [`Inbox`] has seen for the
/// subscription (`ctx.subscription`, the consumer group), and records the id after the rest
/// of the chain and the handler succeeded — before the bus acknowledges the delivery. A
/// failed handler's id is not recorded, so its retry runs.
///
/// If the inbox cannot answer [`seen`](Inbox::seen), the attempt fails as retryable (the
/// retry policy applies) rather than risk a second handling. If it cannot
/// [`record`](Inbox::record), the error is logged and the delivery acknowledged anyway: the
/// handler did succeed, and the only cost is that a later redelivery would be handled again.
///
/// [`SubscriptionConfig::idempotent`](crate::SubscriptionConfig::idempotent) and
/// [`SubscriptionConfig::inbox`](crate::SubscriptionConfig::inbox) put it first in the chain.
#[derive(Clone)]
pub struct Deduplicate {
    inbox: Arc<dyn Inbox>,
}

impl std::fmt::Debug for Deduplicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduplicate")
            .field("inbox", &self.inbox.describe())
            .finish()
    }
}

impl Deduplicate {
    /// Remembers the last `window` (at least 1) successfully handled event ids of each
    /// subscription, in memory (forgotten on restart).
    pub fn new(window: usize) -> Self {
        Self::with_inbox(Arc::new(InMemoryInbox::new(InboxRetention::last(window))))
    }

    /// Keeps the handled ids in `inbox` (durable or not).
    pub fn with_inbox(inbox: Arc<dyn Inbox>) -> Self {
        Self { inbox }
    }

    /// The inbox the ids are kept in.
    pub fn inbox(&self) -> &Arc<dyn Inbox> {
        &self.inbox
    }
}

#[async_trait]
impl Middleware for Deduplicate {
    async fn handle(
        &self,
        event: EventEnvelope,
        ctx: &DeliveryContext,
        next: Next<'_>,
    ) -> Result<(), HandlerError> {
        let id = event.id().clone();
        match self.inbox.seen(&ctx.subscription, &id).await {
            Ok(true) => {
                crate::metrics::duplicate(&ctx.subscription, event.event_type());
                tracing::debug!(subscription = %ctx.subscription, event_id = %id, "duplicate skipped");
                return Ok(());
            }
            Ok(false) => {}
            Err(error) => {
                return Err(HandlerError::from_error(
                    format!(
                        "cannot tell whether {id} was handled: {}: {error}",
                        self.inbox.describe()
                    ),
                    true,
                ));
            }
        }
        next.run(event, ctx).await?;
        if let Err(error) = self.inbox.record(&ctx.subscription, &id).await {
            tracing::warn!(
                subscription = %ctx.subscription, event_id = %id, %error,
                inbox = %self.inbox.describe(),
                "handled, but recording the id in the inbox failed: a redelivery would be handled again"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_core::EventId;

    #[tokio::test]
    async fn dedup_window_is_bounded() {
        let d = Deduplicate::new(2);
        let ids: Vec<EventId> = (0..3).map(|_| EventId::new()).collect();
        for id in &ids {
            d.inbox().record("group", id).await.unwrap();
        }
        assert!(
            !d.inbox().seen("group", &ids[0]).await.unwrap(),
            "evicted beyond the window"
        );
        assert!(d.inbox().seen("group", &ids[1]).await.unwrap());
        assert!(d.inbox().seen("group", &ids[2]).await.unwrap());
    }
}
