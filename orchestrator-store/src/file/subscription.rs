//! Subscriptions: a cursor over the published log, pulled by its consumer.
//!
//! Like the in-memory store's: each subscription reads the next batch of matching events
//! only when asked, and waits on the head position when caught up. Stored and live events
//! come through the same cursor, so there is no hand-over to get wrong, and since appends
//! are published in position order, the cursor can never pass an event that is not yet
//! visible.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use futures::StreamExt;
use orchestrator_core::{EventEnvelope, EventFilter, EventStream, Result};
use tokio::sync::watch;

use super::{SCAN_CHUNK, Shared, read_range};

/// How many matching events a subscription reads at a time.
const SUBSCRIPTION_BATCH: usize = 256;

struct Subscription {
    /// Weak, so that a subscription does not keep a dropped store alive.
    shared: Weak<Shared>,
    head: watch::Receiver<u64>,
    next: u64,
    filter: EventFilter,
    buffer: VecDeque<EventEnvelope>,
}

pub(crate) fn subscribe(shared: &Arc<Shared>, from: u64, filter: EventFilter) -> EventStream {
    let subscription = Subscription {
        shared: Arc::downgrade(shared),
        head: shared.head.subscribe(),
        next: from.max(1),
        filter,
        buffer: VecDeque::new(),
    };
    futures::stream::unfold(subscription, |mut sub| async move {
        let item = sub.next_event().await?;
        Some((item, sub))
    })
    .boxed()
}

impl Subscription {
    /// The next matching event (or a read error), waiting for appends when caught up;
    /// `None` once the store is dropped.
    async fn next_event(&mut self) -> Option<Result<EventEnvelope>> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Some(Ok(event));
            }
            // Marking the head as seen before reading means an append the read misses moves
            // the head afterwards, so `changed()` below cannot miss it.
            let head = *self.head.borrow_and_update();
            let caught_up = {
                let shared = self.shared.upgrade()?;
                let until = self.next.saturating_add(SCAN_CHUNK as u64 - 1).min(head);
                match read_range(&shared, self.next, until, &self.filter, SUBSCRIPTION_BATCH) {
                    Ok((events, next)) => {
                        self.next = next;
                        self.buffer.extend(events);
                    }
                    Err(e) => return Some(Err(e.into())),
                }
                self.next > head
            };
            if self.buffer.is_empty() && caught_up {
                // An error means the sender, and so the store, is gone.
                self.head.changed().await.ok()?;
            }
        }
    }
}
