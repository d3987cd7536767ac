//! The [maximum event size](crate::MaxEventSize) on a store: refused before writing.

use crate::MaxEventSize;
use crate::envelope::EventEnvelope;
use crate::error::Error;
use crate::store::{EventStore, ReadAll};

use super::support::{Any, NO_LIMIT, Names, append, event, head, read_all};

/// A store configured with `limit` refuses a batch holding an event over it with
/// [`Error::TooLarge`] naming the event's size and the limit, and writes nothing of the
/// batch: neither the head nor the case's events move. Events under the limit are
/// written before and after.
///
/// Not part of [`run_all`](super::run_all), which runs stores at their default limit: call it
/// with a store configured with a small `limit` (1 KiB, say).
pub async fn oversize_events_are_refused<S: EventStore>(store: &S, limit: MaxEventSize) {
    let names = Names::new();
    let stream = names.stream("docs");
    let event_type = names.event_type("saved");
    append(store, &stream, Any, vec![event(&event_type, 1)]).await;
    let head_before = head(store).await;
    let big = EventEnvelope::new(&event_type, &"x".repeat(limit.bytes())).unwrap();
    for batch in [vec![big.clone()], vec![event(&event_type, 2), big]] {
        let count = batch.len();
        match store.append(&stream, Any, batch).await {
            Err(Error::TooLarge { size, limit: l }) if l == limit.bytes() && size > l => {}
            other => panic!(
                "`{}`: a batch of {count} with an event over {limit} must be Error::TooLarge \
                 with that limit, got {other:?}",
                store.name()
            ),
        }
    }
    assert_eq!(
        head(store).await,
        head_before,
        "`{}`: the refused batches moved the head",
        store.name()
    );
    append(store, &stream, Any, vec![event(&event_type, 3)]).await;
    let ours = read_all(store, ReadAll::from(1, NO_LIMIT).filter(names.all_ours())).await;
    let payloads: Vec<serde_json::Value> = ours
        .iter()
        .map(|e| e.data::<serde_json::Value>().unwrap()["n"].clone())
        .collect();
    assert_eq!(
        payloads,
        [1, 3],
        "`{}`: nothing of the refused batches may be stored",
        store.name()
    );
}
