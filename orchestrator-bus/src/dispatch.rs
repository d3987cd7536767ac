//! The consumer loop of one subscription: pull deliveries, run them through filter,
//! transform, middleware and handler under the concurrency limit (per key in order when
//! asked), and settle each one — ack, retry or dead-letter.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use chrono::{DateTime, Utc};
use orchestrator_core::{
    Clock, Delivery, DeliveryStream, EventEnvelope, EventHandler, EventId, EventSchemas,
    HandlerCall, HandlerError, HandlerSlot, RetryPolicy,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::metrics::{Handles, SubscriptionMetrics};
use crate::middleware::{ContextRef, Middleware, Next};
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
    /// Times handler calls: quanta's raw TSC reads cost a fraction of a `clock_gettime`
    /// (calibrated once per process; quanta falls back to the OS clock where the TSC is
    /// not reliable).
    timer: &'static quanta::Clock,
    /// Deliveries received and not yet settled, for the shutdown report.
    holding: Mutex<HashMap<u64, (EventId, Arc<str>)>>,
    /// With concurrency 1: what the loop held when its task was aborted (see [`Held`]).
    abandoned: Mutex<Vec<Unfinished>>,
    next_ticket: AtomicU64,
}

/// How many deliveries a subscription takes from its stream at once: one call into the
/// transport per batch instead of one per event. With concurrency above 1 the batch is
/// also bounded by the free buffer permits.
const BATCH: usize = 64;

/// Per-consumer-loop caches that spare the hot path a lookup and an allocation per event.
#[derive(Default)]
struct Scratch<'a> {
    /// The metric handles of the last event type handled.
    handles: Option<(Arc<str>, Arc<Handles>)>,
    /// Where the handler's calls run, one after another in one allocation.
    slot: HandlerSlot<'a>,
}

/// The deliveries the one-at-a-time loop (concurrency 1) holds: the one being handled and
/// the rest of its batch (in reverse order, taken from the end). When a shutdown deadline
/// aborts the loop's task, dropping this records them as unfinished; they then go back to
/// the transport, in their order, to be delivered again.
struct Held<'r> {
    runner: &'r Runner,
    current: Option<Delivery>,
    rest: Vec<Delivery>,
}

impl Held<'_> {
    /// Hands the deliveries not handled back to the transport, in their order, without
    /// reporting them: the loop stopped in time.
    fn release(&mut self) {
        drop(self.current.take());
        while let Some(delivery) = self.rest.pop() {
            drop(delivery);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let held: Vec<Unfinished> = self
            .current
            .iter()
            .chain(self.rest.iter().rev())
            .map(|d| {
                self.runner
                    .unfinished_entry(d.event().id(), d.event().event_type())
            })
            .collect();
        if !held.is_empty() {
            self.runner
                .abandoned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(held);
        }
        self.release();
    }
}

/// What [`Runner::handle_now`] left to do.
enum Now {
    /// Nothing: the delivery is settled.
    Done,
    /// Ack the delivery, which needs an await.
    Ack,
    /// Handle it with [`Runner::handle`], from its first attempt started here, if any.
    Later(Option<FirstPoll>),
}

/// A first attempt started by [`Runner::handle_now`]: its call is in the scratch slot.
struct FirstPoll {
    /// When it started (on the handler timer).
    started: u64,
    /// What its first poll returned.
    polled: Poll<Result<(), HandlerError>>,
}

/// Acks the delivery in `current` at once if the transport can; leaves it there otherwise.
fn ack_now(current: &mut Option<Delivery>) -> Now {
    match current.take().map(Delivery::try_ack_now) {
        None => Now::Done,
        Some(Ok(outcome)) => {
            settled(outcome);
            Now::Done
        }
        Some(Err(delivery)) => {
            *current = Some(delivery);
            Now::Ack
        }
    }
}

/// Acks the delivery in `current`: at once when the transport can, else with an await.
async fn ack(current: &mut Option<Delivery>) {
    if let Now::Ack = ack_now(current)
        && let Some(delivery) = current.take()
    {
        settled(delivery.ack().await);
    }
}

/// The process-wide handler timer (see [`Runner::timer`]).
fn timer() -> &'static quanta::Clock {
    static CLOCK: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
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
            timer: timer(),
            holding: Mutex::new(HashMap::new()),
            abandoned: Mutex::new(Vec::new()),
            next_ticket: AtomicU64::new(0),
        }
    }

    fn holding(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (EventId, Arc<str>)>> {
        // Inserts and removes only; a poisoned lock still guards a consistent map.
        self.holding.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The deliveries received with concurrency above 1 and not yet settled. Read before
    /// aborting the task (the abort drops their tickets).
    pub(crate) fn unfinished(&self) -> Vec<Unfinished> {
        self.holding()
            .values()
            .map(|(id, event_type)| self.unfinished_entry(id, event_type))
            .collect()
    }

    /// What the one-at-a-time loop (concurrency 1) held when its task was aborted. Read
    /// after the abort completed.
    pub(crate) fn take_abandoned(&self) -> Vec<Unfinished> {
        std::mem::take(
            &mut *self
                .abandoned
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn unfinished_entry(&self, id: &EventId, event_type: &str) -> Unfinished {
        Unfinished {
            subscription: self.name.to_string(),
            event_id: id.clone(),
            event_type: event_type.to_owned(),
        }
    }

    fn track(self: &Arc<Self>, delivery: &Delivery) -> Ticket {
        let event = delivery.event();
        let entry = (event.id().clone(), event.event_type_shared());
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.holding().insert(id, entry);
        Ticket {
            runner: Arc::clone(self),
            id,
        }
    }

    /// The metric handles for `event_type`, from `cache` when the type is the one of the
    /// previous event.
    fn handles<'s>(
        &self,
        event: &EventEnvelope,
        cache: &'s mut Option<(Arc<str>, Arc<Handles>)>,
    ) -> &'s Handles {
        let event_type = event.event_type();
        if let Some((cached, _)) = cache
            && !crate::fasthash::same_str(cached, event_type)
        {
            *cache = None;
        }
        let (_, handles) = cache
            .get_or_insert_with(|| (event.event_type_shared(), self.metrics.for_type(event_type)));
        handles
    }

    /// Counts an attempt as delivered and in flight; returns its start on the handler timer.
    fn begin_attempt(&self, handles: &Handles) -> u64 {
        handles.delivered.increment(1);
        self.metrics.in_flight.increment(1.0);
        self.timer.raw()
    }

    /// Records the duration of the attempt begun at `started` and takes it out of flight.
    fn end_attempt(&self, handles: &Handles, started: u64) {
        let nanos = self.timer.delta_as_nanos(started, self.timer.raw());
        handles.duration.record(nanos as f64 / 1e9);
        self.metrics.in_flight.decrement(1.0);
    }

    /// Dead-letters the delivery in `current`, whose event cannot be upcast, as of
    /// `attempt` (first failed at `first_failure`, else now).
    async fn dead_letter_unreadable(
        &self,
        handles: &Handles,
        current: &mut Option<Delivery>,
        error: orchestrator_core::Error,
        attempt: u32,
        first_failure: Option<DateTime<Utc>>,
    ) {
        handles.dead_lettered.increment(1);
        let now = self.clock.now();
        if let Some(delivery) = current.take() {
            let reason = format!("cannot upcast the event: {error}");
            let first = first_failure.unwrap_or(now);
            settled(
                delivery
                    .dead_letter_after(reason, attempt, first, now)
                    .await,
            );
        }
    }

    /// Handles the delivery in `current` within this poll when it can: the handler (without
    /// middleware) finishes on its first poll and the transport acks at once — the common
    /// case on the in-process transport, handled without a future. Otherwise says what is
    /// left for [`handle`](Self::handle) or an ack to do.
    fn handle_now<'a>(
        &'a self,
        current: &mut Option<Delivery>,
        scratch: &mut Scratch<'a>,
        cx: &mut std::task::Context<'_>,
    ) -> Now {
        if !self.chain.is_empty() {
            return Now::Later(None);
        }
        let Scratch {
            handles: handles_cache,
            slot,
        } = scratch;
        let Some(delivery) = current.as_ref() else {
            return Now::Done;
        };
        let handles = self.handles(delivery.event(), handles_cache);
        // A failed upcast is dead-lettered by `handle`, which upcasts again.
        let Ok(event) = self.schemas.upcast(delivery.event().clone()) else {
            return Now::Later(None);
        };
        if let Some(filter) = &self.filter
            && !filter(&event)
        {
            handles.filtered.increment(1);
            return ack_now(current);
        }
        let started = self.begin_attempt(handles);
        let polled = match &self.transform {
            Some(transform) => transform(event),
            None => Ok(event),
        }
        .map(|event| {
            let ctx = ContextRef {
                subscription: &self.name,
                delivery,
                attempt: delivery.attempt(),
                last_error: delivery.last_error(),
            };
            poll_guarded(&ctx, self.handler.handle_in(event, slot), cx)
        });
        let polled = match polled {
            Ok(polled) => polled,
            Err(error) => Poll::Ready(Err(error)),
        };
        if let Poll::Ready(Ok(())) = polled {
            self.end_attempt(handles, started);
            return ack_now(current);
        }
        Now::Later(Some(FirstPoll { started, polled }))
    }

    /// Handles the delivery in `current` to the end — acked, nacked for a retry, or
    /// dead-lettered — inside a `bus.handle` span when tracing wants one. The delivery
    /// stays in `current` until it is settled, so that whoever holds `current` can tell
    /// what was left unsettled if this is cancelled.
    async fn process<'a>(&'a self, current: &mut Option<Delivery>, scratch: &mut Scratch<'a>) {
        let Some(delivery) = current.as_ref() else {
            return;
        };
        let span = tracing::info_span!(
            "bus.handle",
            subscription = %self.name,
            event_type = %delivery.event().event_type(),
            event_id = %delivery.event().id(),
            attempt = delivery.attempt(),
        );
        if span.is_disabled() {
            self.handle(current, scratch, None).await;
        } else {
            self.handle(current, scratch, None).instrument(span).await;
        }
    }

    /// See [`process`](Self::process).
    ///
    /// `first` is the first attempt when [`handle_now`](Self::handle_now) started it: its
    /// upcast, filter and metrics are done, and its call is in the scratch slot.
    async fn handle<'a>(
        &'a self,
        current: &mut Option<Delivery>,
        scratch: &mut Scratch<'a>,
        first: Option<FirstPoll>,
    ) {
        let Scratch {
            handles: handles_cache,
            slot,
        } = scratch;
        let Some(delivery) = current.as_ref() else {
            return;
        };
        let handles = self.handles(delivery.event(), handles_cache);
        let mut first = first;
        // The event each attempt hands to the handler (upcast again for a retry, which
        // spares the first attempt a copy kept for later).
        let upcast = match first {
            Some(_) => Ok(None),
            None => self.schemas.upcast(delivery.event().clone()).map(Some),
        };
        let mut next_event = match upcast {
            Ok(event) => event,
            Err(error) => {
                let attempt = delivery.attempt();
                self.dead_letter_unreadable(handles, current, error, attempt, None)
                    .await;
                return;
            }
        };
        if let (Some(filter), Some(event)) = (&self.filter, &next_event)
            && !filter(event)
        {
            handles.filtered.increment(1);
            ack(current).await;
            return;
        }
        // The attempt and last error the handler sees: the delivery's, then counted here
        // across in-place retries.
        let mut attempt = delivery.attempt();
        let mut retried_after: Option<String> = None;
        let mut first_failure = (delivery.attempt() > 1).then(|| delivery.first_attempt_at());
        loop {
            let Some(delivery) = current.as_ref() else {
                return;
            };
            let ctx = ContextRef {
                subscription: &self.name,
                delivery,
                attempt,
                last_error: retried_after.as_deref().or(delivery.last_error()),
            };
            let (started, outcome) = match first.take() {
                // Started by `handle_now`: its outcome, or the call waiting in the slot.
                Some(FirstPoll {
                    started,
                    polled: Poll::Ready(outcome),
                }) => (started, outcome),
                Some(FirstPoll {
                    started,
                    polled: Poll::Pending,
                }) => {
                    let outcome = match slot.in_flight() {
                        Some(mut call) => {
                            std::future::poll_fn(|cx| poll_guarded(&ctx, call.as_mut(), cx)).await
                        }
                        None => Err(HandlerError::retryable(
                            "the handler call to resume was not found",
                        )),
                    };
                    (started, outcome)
                }
                None => {
                    let event = match next_event.take() {
                        Some(event) => event,
                        None => match self.schemas.upcast(delivery.event().clone()) {
                            Ok(event) => event,
                            // It upcast for the first attempt; schemas changed in between.
                            Err(error) => {
                                self.dead_letter_unreadable(
                                    handles,
                                    current,
                                    error,
                                    attempt,
                                    first_failure,
                                )
                                .await;
                                return;
                            }
                        },
                    };
                    let started = self.begin_attempt(handles);
                    // One attempt: transform, middleware, handler, with `ctx` as the current
                    // context; a panic is a retryable failure. Without middleware the handler
                    // runs in `slot`, reusing the allocation of the previous call.
                    let transformed = match &self.transform {
                        Some(transform) => transform(event),
                        None => Ok(event),
                    };
                    let outcome = match transformed {
                        Err(error) => Err(error),
                        Ok(event) => {
                            // The context as middleware sees it, and their chain: boxed, to
                            // keep this future small for the common case without.
                            let value;
                            let mut run;
                            let mut call: HandlerCall<'_> = if self.chain.is_empty() {
                                self.handler.handle_in(event, slot)
                            } else {
                                value = ctx.to_context();
                                run = Box::pin(
                                    Next::new(&self.chain, self.handler.as_ref())
                                        .run(event, &value),
                                );
                                run.as_mut()
                            };
                            std::future::poll_fn(|cx| poll_guarded(&ctx, call.as_mut(), cx)).await
                        }
                    };
                    (started, outcome)
                }
            };
            self.end_attempt(handles, started);
            let error = match outcome {
                Ok(()) => {
                    ack(current).await;
                    return;
                }
                Err(error) => error,
            };
            handles.errors.increment(1);
            let now = self.clock.now();
            let first_at = *first_failure.get_or_insert(now);
            let delay = if error.is_retryable() {
                self.retry.delay_after(attempt)
            } else {
                None
            };
            match (delay, self.mode) {
                (Some(delay), RetryMode::InPlace) => {
                    handles.retries.increment(1);
                    tracing::debug!(
                        attempt,
                        ?delay,
                        error = error.message(),
                        "retrying in place"
                    );
                    self.clock.sleep(delay).await;
                    attempt += 1;
                    retried_after = Some(error.message().to_owned());
                }
                (Some(delay), RetryMode::Redeliver) => {
                    handles.retries.increment(1);
                    tracing::debug!(
                        attempt,
                        ?delay,
                        error = error.message(),
                        "nacked for redelivery"
                    );
                    if let Some(delivery) = current.take() {
                        settled(delivery.nack(delay, error.message()).await);
                    }
                    return;
                }
                (None, _) => {
                    handles.dead_lettered.increment(1);
                    tracing::warn!(attempt, error = error.message(), "dead-lettered");
                    if let Some(delivery) = current.take() {
                        settled(
                            delivery
                                .dead_letter_after(error.message(), attempt, first_at, now)
                                .await,
                        );
                    }
                    return;
                }
            }
        }
    }
}

/// Polls a handler call once with `ctx` as the current context; a panic ends it as a
/// retryable failure.
fn poll_guarded<F>(
    ctx: &ContextRef<'_>,
    call: Pin<&mut F>,
    cx: &mut std::task::Context<'_>,
) -> Poll<Result<(), HandlerError>>
where
    F: Future<Output = Result<(), HandlerError>> + ?Sized,
{
    match ctx.poll_in(call, cx) {
        Ok(polled) => polled,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Poll::Ready(Err(HandlerError::retryable(format!(
                "handler panicked: {message}"
            ))))
        }
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
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.runner.holding().remove(&self.id);
    }
}

/// A delivery waiting its turn, with what keeps it accounted for.
struct Job {
    delivery: Delivery,
    _ticket: Ticket,
    _buffered: OwnedSemaphorePermit,
}

type KeyQueues = Arc<Mutex<HashMap<String, VecDeque<Job>>>>;

/// Runs a subscription until it is stopped, its stream ends, or receiving fails for good.
/// On stop it takes no new delivery and waits for those it holds; the caller enforces a
/// deadline by aborting this task, which drops unsettled deliveries back to the transport.
///
/// Deliveries are taken in batches (see [`BATCH`]). With concurrency 1 the loop handles a
/// batch one delivery after another and, once stopped, hands the rest of the batch back to
/// the transport unhandled (dropped unsettled: redelivered).
pub(crate) async fn run(
    runner: Arc<Runner>,
    mut stream: Box<dyn DeliveryStream>,
    stop: watch::Receiver<bool>,
) {
    let concurrency = runner.concurrency;
    // Bounds the deliveries held at once (running or waiting behind their key).
    let buffer = Arc::new(Semaphore::new(concurrency.saturating_mul(4)));
    let running = Arc::new(Semaphore::new(concurrency));
    let keys: KeyQueues = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = JoinSet::new();
    let mut receive_failures: u32 = 0;
    let mut batch: Vec<Delivery> = Vec::with_capacity(BATCH);
    let mut permits: Vec<OwnedSemaphorePermit> = Vec::new();
    let mut scratch = Scratch::default();
    let mut held = Held {
        runner: &runner,
        current: None,
        rest: Vec::with_capacity(BATCH),
    };
    // Checked between the deliveries of a batch, without a waiter.
    let stop_flag = stop.clone();
    let is_stopped = move || stop_flag.has_changed().unwrap_or(true);
    // One waiter for the whole loop: re-creating `changed()` each time would register and
    // unregister a waiter per batch.
    let mut stop = stop;
    let stopped = async move {
        let _ = stop.changed().await;
    };
    tokio::pin!(stopped);
    loop {
        // One at a time needs no buffer: the loop itself waits for each delivery. Otherwise
        // the batch takes one buffer permit per delivery: wait for one, take what is free.
        let max = if concurrency == 1 {
            BATCH
        } else {
            let first = tokio::select! {
                biased;
                _ = &mut stopped => break,
                permit = Arc::clone(&buffer).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            permits.push(first);
            while permits.len() < BATCH {
                match Arc::clone(&buffer).try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            permits.len()
        };
        let next = tokio::select! {
            biased;
            _ = &mut stopped => break,
            next = stream.next_batch(
                max,
                if concurrency == 1 { &mut held.rest } else { &mut batch },
            ) => next,
        };
        match next {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) if error.is_temporary() => {
                permits.clear();
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
        }
        receive_failures = 0;
        if concurrency == 1 {
            held.rest.reverse();
            while !held.rest.is_empty() {
                if is_stopped() {
                    // Handed back unhandled with the rest of the batch: redelivered.
                    held.release();
                    break;
                }
                held.current = held.rest.pop();
                if crate::spans_off() {
                    let now = std::future::poll_fn(|cx| {
                        Poll::Ready(runner.handle_now(&mut held.current, &mut scratch, cx))
                    })
                    .await;
                    match now {
                        Now::Done => {}
                        Now::Ack => ack(&mut held.current).await,
                        Now::Later(first) => {
                            runner.handle(&mut held.current, &mut scratch, first).await;
                        }
                    }
                } else {
                    runner.process(&mut held.current, &mut scratch).await;
                }
            }
            continue;
        }
        // The transport hands out at most `max` deliveries; surplus permits go back.
        permits.truncate(batch.len());
        for (delivery, permit) in batch.drain(..).zip(permits.drain(..)) {
            let ticket = runner.track(&delivery);
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
                    runner
                        .process(&mut Some(delivery), &mut Scratch::default())
                        .await;
                });
            }
        }
        // Deliveries beyond the permits (a transport that ignored `max`) are not expected;
        // the drain drops any left unsettled, so they are redelivered.
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
            runner
                .process(&mut Some(delivery), &mut Scratch::default())
                .await;
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
