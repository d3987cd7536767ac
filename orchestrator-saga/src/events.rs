//! Routing events to the sagas that wait for them.
//!
//! A wait registers its event type and correlation id; [`EventRouter::deliver`] wakes every
//! wait registered under the event's type and correlation id. An event nobody waits for
//! yet is kept in a bounded buffer, so a reply that overtakes the saga (it arrives between
//! the step that sent the request and the wait that expects the answer) is not lost: the
//! next wait to register for it takes it from there.

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

#[derive(Debug, Default)]
struct State {
    waiters: HashMap<Key, Vec<(u64, oneshot::Sender<EventEnvelope>)>>,
    next_waiter: u64,
    buffer: VecDeque<EventEnvelope>,
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
    pub(crate) receiver: oneshot::Receiver<EventEnvelope>,
}

/// What registering a wait found.
pub(crate) enum Registration<'a> {
    /// A buffered event already matched.
    Ready(Box<EventEnvelope>),
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
        let buffered = state.buffer.iter().position(|e| {
            e.event_type() == event_type && e.correlation_id() == Some(correlation_id)
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

    /// Hands `event` to every wait registered for it, or buffers it.
    pub(crate) fn deliver(&self, event: EventEnvelope) -> EventRouting {
        let Some(correlation_id) = event.correlation_id() else {
            tracing::warn!(event_id = %event.id(), event_type = event.event_type(), "event without correlation id cannot reach a saga");
            return EventRouting::NoCorrelationId;
        };
        let key = (event.event_type().to_owned(), correlation_id.to_owned());
        let mut state = self.state();
        let waits = state
            .waiters
            .remove(&key)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, sender)| sender.send(event.clone()).ok())
            .count();
        if waits > 0 {
            return EventRouting::Delivered { waits };
        }
        if self.capacity == 0 {
            tracing::warn!(event_id = %event.id(), event_type = event.event_type(), correlation_id, "no saga waits for this event; dropped (event buffer disabled)");
            return EventRouting::Unmatched;
        }
        state.buffer.push_back(event);
        while state.buffer.len() > self.capacity {
            if let Some(old) = state.buffer.pop_front() {
                tracing::warn!(event_id = %old.id(), event_type = old.event_type(), "saga event buffer full; dropped the oldest unmatched event");
            }
        }
        EventRouting::Buffered
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

/// A running transport subscription feeding events to the orchestrator's waits; see
/// [`SagaOrchestrator::listen`](crate::SagaOrchestrator::listen). Dropping it stops the
/// subscription.
#[derive(Debug)]
pub struct EventListener {
    task: Option<JoinHandle<Result<()>>>,
}

impl EventListener {
    pub(crate) fn spawn(
        mut deliveries: Box<dyn DeliveryStream>,
        route: impl Fn(EventEnvelope) -> EventRouting + Send + 'static,
    ) -> Self {
        let task = tokio::spawn(async move {
            let result = async move {
                while let Some(delivery) = deliveries.next().await? {
                    let routing = route(delivery.event().clone());
                    tracing::debug!(event_id = %delivery.event().id(), ?routing, "event routed to sagas");
                    delivery.ack().await?;
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
