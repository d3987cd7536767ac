//! The event bus: handlers subscribed to topic patterns, with retry and dead-lettering,
//! on any [`Transport`].
//!
//! Each subscription is a consumer group of its own (so every subscription sees every
//! matching event) unless it names a group to share. A handler's outcome settles the
//! delivery: success acks it; a retryable error nacks it with the subscription's
//! [`RetryPolicy`] backoff until the attempts are spent; then — or at once for a permanent
//! error, or a panic — the event is dead-lettered with the reason. Nothing is dropped.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use orchestrator_core::transport::validate_topic;
use orchestrator_core::{
    Delivery, DeliveryStream, EventEnvelope, EventHandler, HandlerError, Result, RetryPolicy,
    SubscribeOptions, Transport,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Publishes events and runs subscribed handlers on a [`Transport`].
#[derive(Clone)]
pub struct EventBus {
    transport: Arc<dyn Transport>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("transport", &self.transport.name())
            .field("retry", &self.retry)
            .finish()
    }
}

impl EventBus {
    /// A bus on `transport` with the default [`RetryPolicy`].
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self {
            transport,
            retry: RetryPolicy::default(),
        }
    }

    /// Sets the retry policy of subscriptions made from now on.
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Publishes `event` to the topic named by its event type.
    pub async fn publish(&self, event: EventEnvelope) -> Result<()> {
        let topic = event.event_type().to_owned();
        validate_topic(&topic)?;
        self.transport.publish(&topic, event).await
    }

    /// Subscribes `handler` to `pattern` (`"user.created"`, `"user.*"`, `"order.#"`) in a
    /// consumer group of its own; it receives every matching event published from now on.
    pub async fn subscribe(
        &self,
        pattern: &str,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Subscription> {
        let group = format!("sub-{}", uuid::Uuid::now_v7().simple());
        self.subscribe_group(&group, pattern, handler).await
    }

    /// Subscribes `handler` as one consumer of `group`: the consumers of a group share its
    /// events, each event going to one of them.
    pub async fn subscribe_group(
        &self,
        group: &str,
        pattern: &str,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Subscription> {
        let options = SubscribeOptions::new(group, pattern)?;
        let stream = self.transport.subscribe(options).await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(consume(stream, handler, self.retry, stopped));
        Ok(Subscription {
            group: group.to_owned(),
            pattern: pattern.to_owned(),
            stop,
            task,
        })
    }
}

/// A running subscription. Dropping the handle leaves it running; call
/// [`Subscription::unsubscribe`] to stop it.
#[derive(Debug)]
pub struct Subscription {
    group: String,
    pattern: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// The consumer group this subscription consumes as.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Stops receiving: the delivery being handled, if any, is finished and settled first.
    pub async fn unsubscribe(self) {
        let _ = self.stop.send(true);
        // The task only ends by returning; a join error would mean the consumer loop
        // panicked, which catch_unwind around handlers rules out.
        let _ = self.task.await;
    }
}

async fn consume(
    mut stream: Box<dyn DeliveryStream>,
    handler: Arc<dyn EventHandler>,
    retry: RetryPolicy,
    mut stopped: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    loop {
        let next = tokio::select! {
            _ = stopped.changed() => break,
            next = stream.next() => next,
        };
        match next {
            Ok(Some(delivery)) => {
                failures = 0;
                settle(delivery, handler.as_ref(), &retry).await;
            }
            Ok(None) => break,
            Err(error) if error.is_temporary() => {
                failures = failures.saturating_add(1);
                let delay = retry
                    .with_max_attempts(u32::MAX)
                    .delay_after(failures)
                    .unwrap_or(Duration::from_secs(1));
                tracing::warn!(%error, ?delay, "receiving failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                tracing::error!(%error, "subscription stopped: receiving failed for good");
                break;
            }
        }
    }
}

async fn settle(delivery: Delivery, handler: &dyn EventHandler, retry: &RetryPolicy) {
    let event = delivery.event().clone();
    let outcome = AssertUnwindSafe(handler.handle(event))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::permanent("handler panicked")));
    let attempt = delivery.attempt();
    let settled = match outcome {
        Ok(()) => delivery.ack().await,
        Err(error) => match retry.delay_after(attempt).filter(|_| error.is_retryable()) {
            Some(delay) => {
                tracing::debug!(attempt, ?delay, error = error.message(), "handler failed; retrying");
                delivery.nack(delay, error.message()).await
            }
            None => {
                tracing::warn!(attempt, error = error.message(), "handler failed; dead-lettering");
                delivery.dead_letter(error.message()).await
            }
        },
    };
    if let Err(error) = settled {
        // The transport could not record the outcome; it will redeliver the event, so it is
        // not lost, but the handler may see it again.
        tracing::error!(%error, "settling a delivery failed; it will be redelivered");
    }
}
