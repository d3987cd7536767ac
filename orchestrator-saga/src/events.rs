//! Routing events to the sagas that wait for them.
//!
//! A wait registers its event type and correlation id; [`EventRouter::deliver`] wakes every
//! wait registered under the event's type and correlation id. An event nobody waits for
//! yet is kept in a bounded buffer, so a reply that overtakes the saga (it arrives between
//! the step that sent the request and the wait that expects the answer) is not lost: the
//! next wait to register for it takes it from there.
//!
//! An event that arrives from a transport ([`EventListener`]) is acknowledged only once it
//! is safe: every saga it woke has logged what it did with it (the wait's step completed or
//! failed), or it was dropped on purpose (the buffer overflowed). Until then the delivery is
//! held; a saga that stops before logging (aborted, its store unreachable) hands it back to
//! the transport, which delivers it again — so a crash between receipt and log loses nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use orchestrator_core::{DeliveryStream, EventEnvelope};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::Result;

/// What [`SagaOrchestrator::deliver_event`](crate::SagaOrchestrator::deliver_event) did
/// with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventRouting {
    /// It woke this many waits (every wait registered for its type and correlation id).
    Delivered {
        /// How many waits received it.
        waits: usize,
    },
    /// No wait expects it yet; it is buffered for the next wait that registers for it.
    Buffered,
    /// No wait expects it and the orchestrator keeps no buffer (capacity 0): it was
    /// dropped.
    Unmatched,
    /// It has no correlation id, so no wait can match it.
    NoCorrelationId,
}

type Key = (String, String);

/// What became of an event handed to a wait (or to the buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The saga logged what the event did to it: the delivery may be acknowledged.
    Logged,
    /// It was dropped on purpose (the buffer overflowed): acknowledge it too.
    Dropped,
}

/// An event on its way to a wait, with the channel on which the wait says it was logged
/// (`None`: nobody waits for the answer, as for [`EventRouter::deliver`]).
#[derive(Debug)]
pub(crate) struct Handoff {
    pub(crate) event: EventEnvelope,
    settle: Option<oneshot::Sender<Settled>>,
}

impl Handoff {
    fn new(event: EventEnvelope) -> (Self, oneshot::Receiver<Settled>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                event,
                settle: Some(tx),
            },
            rx,
        )
    }

    /// Says how the event was settled. Dropping a handoff unsettled (the saga stopped before
    /// it logged) tells the listener to hand the delivery back.
    pub(crate) fn settle(mut self, how: Settled) -> EventEnvelope {
        if let Some(settle) = self.settle.take() {
            let _ = settle.send(how);
        }
        self.event
    }
}

#[derive(Debug, Default)]
struct State {
    waiters: HashMap<Key, Vec<(u64, oneshot::Sender<Handoff>)>>,
    next_waiter: u64,
    buffer: VecDeque<Handoff>,
}

/// Routes delivered events to registered waits.
#[derive(Debug)]
pub(crate) struct EventRouter {
    state: Mutex<State>,
    capacity: usize,
}

/// A registered wait; dropping it unregisters.
pub(crate) struct Waiter<'a> {
    router: &'a EventRouter,
    key: Key,
    id: u64,
    pub(crate) receiver: oneshot::Receiver<Handoff>,
}

/// What registering a wait found.
pub(crate) enum Registration<'a> {
    /// A buffered event already matched.
    Ready(Box<Handoff>),
    /// The wait is registered.
    Waiting(Waiter<'a>),
}

impl EventRouter {
    /// A router buffering at most `capacity` unmatched events.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::default(),
            capacity,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few map or deque operations that cannot panic half
        // way through for reasons of ours, so a poisoned lock holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a wait for `event_type` with `correlation_id`.
    pub(crate) fn register(&self, event_type: &str, correlation_id: &str) -> Registration<'_> {
        let mut state = self.state();
        let buffered = state.buffer.iter().position(|h| {
            h.event.event_type() == event_type && h.event.correlation_id() == Some(correlation_id)
        });
        if let Some(event) = buffered.and_then(|i| state.buffer.remove(i)) {
            return Registration::Ready(Box::new(event));
        }
        let key = (event_type.to_owned(), correlation_id.to_owned());
        let id = state.next_waiter;
        state.next_waiter += 1;
        let (sender, receiver) = oneshot::channel();
        state
            .waiters
            .entry(key.clone())
            .or_default()
            .push((id, sender));
        Registration::Waiting(Waiter {
            router: self,
            key,
            id,
            receiver,
        })
    }

    /// Hands `event` to every wait registered for it, or buffers it, without waiting to
    /// hear that it was logged.
    pub(crate) fn deliver(&self, event: EventEnvelope) -> EventRouting {
        self.route(event).0
    }

    /// Hands `event` to every wait registered for it, or buffers it; the receivers say when
    /// each wait (or the buffer) settled it. None for an event no wait can take.
    pub(crate) fn route(
        &self,
        event: EventEnvelope,
    ) -> (EventRouting, Vec<oneshot::Receiver<Settled>>) {
        let Some(correlation_id) = event.correlation_id() else {
            tracing::warn!(event_id = %event.id(), event_type = event.event_type(), "event without correlation id cannot reach a saga");
            return (EventRouting::NoCorrelationId, Vec::new());
        };
        let key = (event.event_type().to_owned(), correlation_id.to_owned());
        let mut state = self.state();
        let mut settled = Vec::new();
        for (_, sender) in state.waiters.remove(&key).unwrap_or_default() {
            let (handoff, receiver) = Handoff::new(event.clone());
            // A wait that went away meanwhile gets nothing, and owes nothing.
            if sender.send(handoff).is_ok() {
                settled.push(receiver);
            }
        }
        if !settled.is_empty() {
            return (
                EventRouting::Delivered {
                    waits: settled.len(),
                },
                settled,
            );
        }
        if self.capacity == 0 {
            tracing::warn!(event_id = %event.id(), event_type = event.event_type(), correlation_id, "no saga waits for this event; dropped (event buffer disabled)");
            return (EventRouting::Unmatched, Vec::new());
        }
        let (handoff, receiver) = Handoff::new(event);
        state.buffer.push_back(handoff);
        while state.buffer.len() > self.capacity {
            if let Some(old) = state.buffer.pop_front() {
                tracing::warn!(event_id = %old.event.id(), event_type = old.event.event_type(), "saga event buffer full; dropped the oldest unmatched event");
                old.settle(Settled::Dropped);
            }
        }
        (EventRouting::Buffered, vec![receiver])
    }

    /// How many unmatched events are buffered.
    pub(crate) fn buffered(&self) -> usize {
        self.state().buffer.len()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut state = self.router.state();
        if let Some(list) = state.waiters.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                state.waiters.remove(&self.key);
            }
        }
    }
}

/// How long an event a saga could not log waits before the transport delivers it again.
pub(crate) const RETURN_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// A running transport subscription feeding events to the orchestrator's waits; see
/// [`SagaOrchestrator::listen`](crate::SagaOrchestrator::listen). Dropping it stops the
/// subscription.
#[derive(Debug)]
pub struct EventListener {
    task: Option<JoinHandle<Result<()>>>,
}

impl EventListener {
    /// Routes each delivery with `route` and settles it in the background once every wait
    /// it reached logged it: acknowledged then (or when it was dropped on purpose, or no wait
    /// can take it), handed back to the transport — delivered again after
    /// [`RETURN_DELAY`] — when a saga stopped before logging it.
    pub(crate) fn spawn(
        mut deliveries: Box<dyn DeliveryStream>,
        route: impl Fn(EventEnvelope) -> (EventRouting, Vec<oneshot::Receiver<Settled>>)
        + Send
        + 'static,
    ) -> Self {
        let task = tokio::spawn(async move {
            let result = async move {
                while let Some(delivery) = deliveries.next().await? {
                    let (routing, settled) = route(delivery.event().clone());
                    tracing::debug!(event_id = %delivery.event().id(), ?routing, "event routed to sagas");
                    if settled.is_empty() {
                        delivery.ack().await?;
                        continue;
                    }
                    tokio::spawn(async move {
                        let logged = futures::future::join_all(settled)
                            .await
                            .into_iter()
                            .all(|s| s.is_ok());
                        let event_id = delivery.event().id().clone();
                        let outcome = if logged {
                            delivery.ack().await
                        } else {
                            tracing::warn!(%event_id, "a saga stopped before logging the event it waited for; it goes back to the transport");
                            delivery
                                .nack(RETURN_DELAY, "a saga stopped before logging it")
                                .await
                        };
                        if let Err(e) = outcome {
                            tracing::warn!(%event_id, error = %e, "settling a saga event failed; the transport will deliver it again");
                        }
                    });
                }
                Ok(())
            }
            .await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "saga event listener stopped");
            }
            result
        });
        Self { task: Some(task) }
    }

    /// Stops listening.
    pub fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Waits until the subscription ends (the transport closed it) and returns its error,
    /// if it ended on one.
    pub async fn join(mut self) -> Result<()> {
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result,
                Err(e) => {
                    Err(orchestrator_core::Error::backend("saga event listener", false, e).into())
                }
            },
            None => Ok(()),
        }
    }
}

impl Drop for EventListener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, correlation: Option<&str>) -> EventEnvelope {
        let e = EventEnvelope::new(event_type, &serde_json::json!({"ok": true})).unwrap();
        match correlation {
            Some(c) => e.with_correlation_id(c),
            None => e,
        }
    }

    #[test]
    fn waits_get_matching_events_and_others_are_buffered() {
        let router = EventRouter::new(2);
        let Registration::Waiting(mut waiter) = router.register("a.b", "c1") else {
            panic!("nothing is buffered yet");
        };
        assert_eq!(
            router.deliver(event("a.b", Some("c2"))),
            EventRouting::Buffered
        );
        assert_eq!(
            router.deliver(event("a.c", Some("c1"))),
            EventRouting::Buffered
        );
        assert_eq!(
            router.deliver(event("a.b", Some("c1"))),
            EventRouting::Delivered { waits: 1 }
        );
        assert!(waiter.receiver.try_recv().is_ok());
        assert_eq!(
            router.deliver(event("a.b", None)),
            EventRouting::NoCorrelationId
        );
        assert!(matches!(
            router.register("a.b", "c2"),
            Registration::Ready(_)
        ));
        assert_eq!(router.buffered(), 1);
        for _ in 0..3 {
            router.deliver(event("x.y", Some("z")));
        }
        assert_eq!(router.buffered(), 2, "the buffer is bounded");
    }

    #[test]
    fn routed_events_report_how_they_were_settled() {
        let router = EventRouter::new(1);
        let Registration::Waiting(mut waiter) = router.register("a.b", "c1") else {
            panic!("nothing is buffered yet");
        };
        let (routing, mut settled) = router.route(event("a.b", Some("c1")));
        assert_eq!(routing, EventRouting::Delivered { waits: 1 });
        let handoff = waiter.receiver.try_recv().unwrap();
        assert!(
            settled[0].try_recv().is_err(),
            "not settled before the saga logs it"
        );
        handoff.settle(Settled::Logged);
        assert_eq!(settled[0].try_recv(), Ok(Settled::Logged));

        // A wait that stops before logging: the listener hears the sender go.
        let Registration::Waiting(mut waiter) = router.register("a.b", "c2") else {
            panic!("nothing is buffered yet");
        };
        let (_, mut settled) = router.route(event("a.b", Some("c2")));
        drop(waiter.receiver.try_recv().unwrap());
        assert!(matches!(
            settled[0].try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));

        // Buffered, then pushed out of the (one-event) buffer: dropped on purpose.
        let (routing, mut first) = router.route(event("x.y", Some("z")));
        assert_eq!(routing, EventRouting::Buffered);
        let (_, _second) = router.route(event("x.y", Some("z")));
        assert_eq!(first[0].try_recv(), Ok(Settled::Dropped));
    }

    #[test]
    fn dropped_waits_unregister() {
        let router = EventRouter::new(0);
        drop(router.register("a.b", "c"));
        assert_eq!(
            router.deliver(event("a.b", Some("c"))),
            EventRouting::Unmatched
        );
        assert!(router.state().waiters.is_empty());
    }
}
