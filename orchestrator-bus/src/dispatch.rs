//! The consumer loop of one subscription: pull deliveries, run them through filter,
//! transform, middleware and handler under the concurrency limit (per key in order when
//! asked), and settle each one — ack, retry or dead-letter.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use orchestrator_core::{
    Clock, Delivery, DeliveryStream, EventEnvelope, EventHandler, EventId, EventSchemas,
    HandlerError, RetryPolicy,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::metrics::SubscriptionMetrics;
use crate::middleware::{DeliveryContext, Middleware, Next};
use crate::subscription::{Filter, RetryMode, Transform};

/// An event a subscription was handling or holding when it was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// The subscription.
    pub subscription: String,
    /// The event's id.
    pub event_id: EventId,
    /// The event's type.
    pub event_type: String,
}

/// Everything one subscription needs to handle a delivery.
pub(crate) struct Runner {
    pub(crate) name: Arc<str>,
    pub(crate) handler: Arc<dyn EventHandler>,
    pub(crate) chain: Vec<Arc<dyn Middleware>>,
    pub(crate) filter: Option<Filter>,
    pub(crate) transform: Option<Transform>,
    pub(crate) retry: RetryPolicy,
    pub(crate) mode: RetryMode,
    pub(crate) concurrency: usize,
    pub(crate) ordered: bool,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) schemas: Arc<dyn EventSchemas>,
    pub(crate) metrics: SubscriptionMetrics,
    /// Deliveries received and not yet settled, for the shutdown report.
    holding: Mutex<HashMap<u64, (EventId, Arc<str>)>>,
    /// With concurrency 1, the one delivery held (cheaper than the map).
    current: Mutex<Option<(EventId, Arc<str>)>>,
    next_ticket: AtomicU64,
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        handler: Arc<dyn EventHandler>,
        chain: Vec<Arc<dyn Middleware>>,
        filter: Option<Filter>,
        transform: Option<Transform>,
        retry: RetryPolicy,
        mode: RetryMode,
        concurrency: usize,
        ordered: bool,
        clock: Arc<dyn Clock>,
        schemas: Arc<dyn EventSchemas>,
    ) -> Self {
        let metrics = SubscriptionMetrics::new(&name);
        Self {
            name: name.into(),
            handler,
            chain,
            filter,
            transform,
            retry,
            mode,
            concurrency,
            ordered,
            clock,
            schemas,
            metrics,
            holding: Mutex::new(HashMap::new()),
            current: Mutex::new(None),
            next_ticket: AtomicU64::new(0),
        }
    }

    fn holding(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (EventId, Arc<str>)>> {
        // Inserts and removes only; a poisoned lock still guards a consistent map.
        self.holding.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<(EventId, Arc<str>)>> {
        // A plain slot: a poisoned lock still holds a consistent value.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The deliveries received and not yet settled.
    pub(crate) fn unfinished(&self) -> Vec<Unfinished> {
        let current = self.current().clone();
        self.holding()
            .values()
            .chain(current.as_ref())
            .map(|(id, t)| Unfinished {
                subscription: self.name.to_string(),
                event_id: id.clone(),
                event_type: t.to_string(),
            })
            .collect()
    }

    fn track(self: &Arc<Self>, delivery: &Delivery) -> Ticket {
        let event = delivery.event();
        let entry = (event.id().clone(), event.event_type_shared());
        let id = if self.concurrency == 1 {
            *self.current() = Some(entry);
            None
        } else {
            let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            self.holding().insert(id, entry);
            Some(id)
        };
        Ticket {
            runner: Arc::clone(self),
            id,
        }
    }

    /// Handles one delivery to the end: acked, nacked for a retry, or dead-lettered.
    async fn process(&self, delivery: Delivery) {
        let handles = self.metrics.for_type(delivery.event().event_type());
        let span = tracing::info_span!(
            "bus.handle",
            subscription = %self.name,
            event_type = %delivery.event().event_type(),
            event_id = %delivery.event().id(),
            attempt = delivery.attempt(),
        );
        let work = async move {
            let event = match self.schemas.upcast(delivery.event().clone()) {
                Ok(event) => event,
                Err(error) => {
                    handles.dead_lettered.increment(1);
                    let now = self.clock.now();
                    let reason = format!("cannot upcast the event: {error}");
                    let attempt = delivery.attempt();
                    settled(delivery.dead_letter_after(reason, attempt, now, now).await);
                    return;
                }
            };
            if let Some(filter) = &self.filter
                && !filter(&event)
            {
                handles.filtered.increment(1);
                settled(delivery.ack().await);
                return;
            }
            let mut ctx = Arc::new(DeliveryContext {
                subscription: Arc::clone(&self.name),
                topic: delivery.topic().into(),
                attempt: delivery.attempt(),
                last_error: delivery.last_error().map(str::to_owned),
                first_attempt_at: delivery.first_attempt_at(),
            });
            let mut first_failure = (delivery.attempt() > 1).then(|| delivery.first_attempt_at());
            loop {
                handles.delivered.increment(1);
                self.metrics.in_flight.increment(1.0);
                let started = Instant::now();
                let outcome = self.attempt(event.clone(), Arc::clone(&ctx)).await;
                handles.duration.record(started.elapsed().as_secs_f64());
                self.metrics.in_flight.decrement(1.0);
                let error = match outcome {
                    Ok(()) => {
                        settled(delivery.ack().await);
                        return;
                    }
                    Err(error) => error,
                };
                handles.errors.increment(1);
                let now = self.clock.now();
                let first = *first_failure.get_or_insert(now);
                let delay = if error.is_retryable() {
                    self.retry.delay_after(ctx.attempt)
                } else {
                    None
                };
                match (delay, self.mode) {
                    (Some(delay), RetryMode::InPlace) => {
                        handles.retries.increment(1);
                        tracing::debug!(
                            attempt = ctx.attempt,
                            ?delay,
                            error = error.message(),
                            "retrying in place"
                        );
                        self.clock.sleep(delay).await;
                        let next = Arc::make_mut(&mut ctx);
                        next.attempt += 1;
                        next.last_error = Some(error.message().to_owned());
                    }
                    (Some(delay), RetryMode::Redeliver) => {
                        handles.retries.increment(1);
                        tracing::debug!(
                            attempt = ctx.attempt,
                            ?delay,
                            error = error.message(),
                            "nacked for redelivery"
                        );
                        settled(delivery.nack(delay, error.message()).await);
                        return;
                    }
                    (None, _) => {
                        handles.dead_lettered.increment(1);
                        tracing::warn!(
                            attempt = ctx.attempt,
                            error = error.message(),
                            "dead-lettered"
                        );
                        settled(
                            delivery
                                .dead_letter_after(error.message(), ctx.attempt, first, now)
                                .await,
                        );
                        return;
                    }
                }
            }
        };
        // An instrumented wrapper moves the whole future; skip it when nobody listens.
        if span.is_disabled() {
            work.await;
        } else {
            work.instrument(span).await;
        }
    }

    /// One attempt: transform, middleware, handler; a panic is a retryable failure.
    async fn attempt(
        &self,
        event: EventEnvelope,
        ctx: Arc<DeliveryContext>,
    ) -> Result<(), HandlerError> {
        let event = match &self.transform {
            Some(transform) => transform(event)?,
            None => event,
        };
        let run = Next::new(&self.chain, self.handler.as_ref()).run(event, &ctx);
        Arc::clone(&ctx)
            .scope(AssertUnwindSafe(run).catch_unwind())
            .await
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                Err(HandlerError::retryable(format!(
                    "handler panicked: {message}"
                )))
            })
    }
}

/// Logs a settlement the transport could not record. The transport still holds the
/// delivery and will redeliver it, so the event is not lost, but the handler may see it
/// again.
fn settled(result: orchestrator_core::Result<()>) {
    if let Err(error) = result {
        tracing::error!(%error, "settling a delivery failed; it will be redelivered");
    }
}

/// Marks a delivery as held by the subscription until dropped.
struct Ticket {
    runner: Arc<Runner>,
    /// `None`: the runner's single `current` slot.
    id: Option<u64>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match self.id {
            Some(id) => {
                self.runner.holding().remove(&id);
            }
            None => *self.runner.current() = None,
        }
    }
}

/// A delivery waiting its turn, with what keeps it accounted for.
struct Job {
    delivery: Delivery,
    _ticket: Ticket,
    _buffered: Option<OwnedSemaphorePermit>,
}

type KeyQueues = Arc<Mutex<HashMap<String, VecDeque<Job>>>>;

/// Runs a subscription until it is stopped, its stream ends, or receiving fails for good.
/// On stop it takes no new delivery and waits for those it holds; the caller enforces a
/// deadline by aborting this task, which drops unsettled deliveries back to the transport.
pub(crate) async fn run(
    runner: Arc<Runner>,
    mut stream: Box<dyn DeliveryStream>,
    mut stop: watch::Receiver<bool>,
) {
    let concurrency = runner.concurrency;
    // Bounds the deliveries held at once (running or waiting behind their key).
    let buffer = Arc::new(Semaphore::new(concurrency.saturating_mul(4)));
    let running = Arc::new(Semaphore::new(concurrency));
    let keys: KeyQueues = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = JoinSet::new();
    let mut receive_failures: u32 = 0;
    // One waiter for the whole loop: re-creating `changed()` each time would register and
    // unregister a waiter per delivery.
    let stopped = async move {
        let _ = stop.changed().await;
    };
    tokio::pin!(stopped);
    loop {
        // One at a time needs no buffer: the loop itself waits for each delivery.
        let permit = if concurrency == 1 {
            None
        } else {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                permit = Arc::clone(&buffer).acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                },
            }
        };
        let next = tokio::select! {
            biased;
            _ = &mut stopped => break,
            next = stream.next() => next,
        };
        let delivery = match next {
            Ok(Some(delivery)) => delivery,
            Ok(None) => break,
            Err(error) if error.is_temporary() => {
                receive_failures = receive_failures.saturating_add(1);
                let delay = RetryPolicy::exponential(u32::MAX, Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(5))
                    .delay_after(receive_failures)
                    .unwrap_or(Duration::from_secs(1));
                tracing::warn!(subscription = %runner.name, %error, ?delay, "receiving failed; retrying");
                tokio::select! {
                    _ = &mut stopped => break,
                    () = runner.clock.sleep(delay) => continue,
                }
            }
            Err(error) => {
                tracing::error!(subscription = %runner.name, %error, "subscription stopped: receiving failed for good");
                break;
            }
        };
        receive_failures = 0;
        let ticket = runner.track(&delivery);
        if concurrency == 1 {
            runner.process(delivery).await;
            drop((ticket, permit));
            continue;
        }
        let job = Job {
            delivery,
            _ticket: ticket,
            _buffered: permit,
        };
        if runner.ordered {
            let key = job.delivery.event().partition_key();
            let mut queues = keys.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(waiting) = queues.get_mut(&key) {
                waiting.push_back(job);
                continue;
            }
            queues.insert(key.clone(), VecDeque::new());
            drop(queues);
            tasks.spawn(key_chain(
                Arc::clone(&runner),
                Arc::clone(&keys),
                Arc::clone(&running),
                key,
                job,
            ));
        } else {
            let runner = Arc::clone(&runner);
            let running = Arc::clone(&running);
            tasks.spawn(async move {
                // The semaphore is never closed, so acquiring only fails if it were.
                let _slot = running.acquire_owned().await;
                let Job { delivery, .. } = job;
                runner.process(delivery).await;
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Handles the deliveries of one key one after another, then retires the key.
async fn key_chain(
    runner: Arc<Runner>,
    keys: KeyQueues,
    running: Arc<Semaphore>,
    key: String,
    mut job: Job,
) {
    loop {
        {
            let _slot = running.acquire().await;
            let Job {
                delivery,
                _ticket,
                _buffered,
            } = job;
            runner.process(delivery).await;
        }
        let mut queues = keys.lock().unwrap_or_else(PoisonError::into_inner);
        match queues.get_mut(&key).and_then(VecDeque::pop_front) {
            Some(next) => job = next,
            None => {
                queues.remove(&key);
                return;
            }
        }
    }
}
