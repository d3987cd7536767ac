//! The in-memory store's limits: refusing appends when full, or evicting only released
//! events, and what reads say about evicted events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use orchestrator_core::ExpectedVersion::{Any, Exact};
use orchestrator_core::{Error, EventEnvelope, EventFilter, EventStore, ReadAll};
use orchestrator_store::{InMemoryEventStore, MemoryLimits, WhenFull};
use serde_json::json;

fn event(n: u64) -> EventEnvelope {
    EventEnvelope::new("test.happened", &json!({ "n": n })).unwrap()
}

fn positions(events: &[EventEnvelope]) -> Vec<u64> {
    events
        .iter()
        .filter_map(EventEnvelope::global_position)
        .collect()
}

fn evicting(max_events: u64) -> InMemoryEventStore {
    InMemoryEventStore::with_limits(
        MemoryLimits::default()
            .max_events(max_events)
            .when_full(WhenFull::EvictReleased)
            .max_wait(Duration::ZERO),
    )
}

#[tokio::test]
async fn the_default_store_is_bounded() {
    let limits = InMemoryEventStore::new().limits();
    assert_eq!(limits.max_events, Some(MemoryLimits::DEFAULT_MAX_EVENTS));
    assert_eq!(limits.max_bytes, Some(MemoryLimits::DEFAULT_MAX_BYTES));
    assert_eq!(limits.when_full, WhenFull::Reject);
}

#[tokio::test]
async fn a_full_store_refuses_appends_and_keeps_every_event() {
    let store = InMemoryEventStore::with_limits(MemoryLimits::default().max_events(3));
    store
        .append("a", Any, vec![event(1), event(2), event(3)])
        .await
        .unwrap();
    // Released or not, `Reject` never evicts.
    store.release_through(3);
    let refused = store.append("a", Any, vec![event(4)]).await.unwrap_err();
    match &refused {
        Error::StoreFull {
            limit, temporary, ..
        } => {
            assert_eq!(limit, "3 events");
            assert!(!temporary);
        }
        other => panic!("expected StoreFull, got {other:?}"),
    }
    assert!(refused.to_string().contains("with_limits"), "{refused}");
    assert!(!refused.is_temporary());
    let all = store.read_all(ReadAll::from(1, usize::MAX)).await.unwrap();
    assert_eq!(positions(&all), [1, 2, 3]);
    assert_eq!(store.stream_version("a").await.unwrap(), Some(3));
    assert_eq!(store.usage().evicted, 0);
}

#[tokio::test]
async fn the_byte_limit_counts_too() {
    let store = InMemoryEventStore::with_limits(MemoryLimits::unbounded().max_bytes(3_000));
    let big = || EventEnvelope::new("test.big", &json!({ "pad": "x".repeat(600) })).unwrap();
    store.append("a", Any, vec![big(), big()]).await.unwrap();
    let refused = store.append("a", Any, vec![big()]).await.unwrap_err();
    assert!(
        matches!(&refused, Error::StoreFull { limit, .. } if limit.contains("3000 bytes")),
        "{refused:?}"
    );
    let usage = store.usage();
    assert_eq!(usage.events, 2);
    assert!(usage.bytes > 2_000 && usage.bytes <= 3_000, "{usage:?}");
}

#[tokio::test]
async fn an_append_larger_than_the_limit_is_invalid_input() {
    let store = InMemoryEventStore::with_limits(MemoryLimits::unbounded().max_events(2));
    let error = store
        .append("a", Any, vec![event(1), event(2), event(3)])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::InvalidInput { reason, .. } if reason.contains("never fit")),
        "{error:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 0);
}

#[tokio::test]
async fn only_released_events_are_evicted() {
    let store = evicting(4);
    store
        .append("a", Any, vec![event(1), event(2)])
        .await
        .unwrap();
    store
        .append("b", Any, vec![event(3), event(4)])
        .await
        .unwrap();
    store.release_through(2);
    // Room for two: positions 1 and 2 (released) go.
    store
        .append("b", Any, vec![event(5), event(6)])
        .await
        .unwrap();
    let usage = store.usage();
    assert_eq!(
        (usage.events, usage.first_position, usage.evicted),
        (4, 3, 2)
    );
    // Nothing more is released: the next append is refused, nothing unreleased goes.
    let refused = store.append("b", Any, vec![event(7)]).await.unwrap_err();
    assert!(
        matches!(
            refused,
            Error::StoreFull {
                temporary: true,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(refused.is_temporary());
    let all = store.read_all(ReadAll::from(1, usize::MAX)).await.unwrap();
    assert_eq!(positions(&all), [3, 4, 5, 6]);
    // Releasing past the head releases up to the head only.
    store.release_through(100);
    assert_eq!(store.usage().released, 6);
    store.append("b", Any, vec![event(7)]).await.unwrap();
    assert_eq!(store.usage().first_position, 4);
}

#[tokio::test]
async fn reads_after_eviction_say_what_is_gone() {
    let store = evicting(3);
    store
        .append("a", Any, vec![event(1), event(2)])
        .await
        .unwrap();
    store.append("b", Any, vec![event(3)]).await.unwrap();
    store.release_through(3);
    store.append("a", Any, vec![event(4)]).await.unwrap();
    store.append("b", Any, vec![event(5)]).await.unwrap();
    // Positions 1 and 2 (all of `a`'s first two versions) are gone.
    assert_eq!(store.usage().first_position, 3);

    // read_all from an evicted position starts at the oldest kept one.
    let all = store.read_all(ReadAll::from(1, usize::MAX)).await.unwrap();
    assert_eq!(positions(&all), [3, 4, 5]);
    let from_four = store.read_all(ReadAll::from(4, 1)).await.unwrap();
    assert_eq!(positions(&from_four), [4]);

    // A stream read of evicted versions is a typed error naming the oldest kept version.
    let error = store.read_stream("a", 1, usize::MAX).await.unwrap_err();
    match &error {
        Error::Evicted {
            what, first_kept, ..
        } => {
            assert_eq!(*first_kept, 3);
            assert!(what.contains("stream `a` from version 1"), "{what}");
        }
        other => panic!("expected Evicted, got {other:?}"),
    }
    assert!(error.to_string().contains("snapshot"), "{error}");
    let kept = store.read_stream("a", 3, usize::MAX).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].stream_version(), Some(3));
    assert_eq!(store.read_stream("b", 1, 10).await.unwrap().len(), 2);

    // Versions stay right: an exact expected version still works, and a wrong one fails.
    assert_eq!(store.stream_version("a").await.unwrap(), Some(3));
    store.release_through(5);
    let written = store.append("a", Exact(3), vec![event(6)]).await.unwrap();
    assert_eq!(written.next_expected_version, 4);
    assert!(matches!(
        store.append("a", Exact(3), vec![event(7)]).await,
        Err(Error::WrongExpectedVersion { .. })
    ));
}

#[tokio::test]
async fn a_retry_of_a_kept_append_is_still_recognised() {
    let store = evicting(3);
    store.append("a", Any, vec![event(1)]).await.unwrap();
    let second = event(2);
    let written = store.append("a", Any, vec![second.clone()]).await.unwrap();
    store.release_through(2);
    store
        .append("a", Any, vec![event(3), event(4)])
        .await
        .unwrap();
    // Position 1 went; position 2 (the retried append) is kept.
    assert_eq!(store.usage().first_position, 2);
    let again = store.append("a", Any, vec![second]).await.unwrap();
    assert_eq!(again, written);
    assert_eq!(store.head_position().await.unwrap(), 4);
}

#[tokio::test]
async fn subscriptions_start_at_the_oldest_kept_event_and_report_being_overtaken() {
    let store = evicting(2);
    store
        .append("a", Any, vec![event(1), event(2)])
        .await
        .unwrap();
    // Made before the eviction, not read until after it.
    let mut overtaken = store.subscribe(1, EventFilter::all()).await.unwrap();
    store.release_through(2);
    store
        .append("a", Any, vec![event(3), event(4)])
        .await
        .unwrap();
    let first = overtaken.next().await.unwrap();
    match first {
        Err(Error::Evicted { first_kept, .. }) => assert_eq!(first_kept, 3),
        other => panic!("expected Evicted, got {other:?}"),
    }
    let next = overtaken.next().await.unwrap().unwrap();
    assert_eq!(next.global_position(), Some(3));

    // Made after it: starts at the oldest kept event, quietly.
    let mut later = store.subscribe(1, EventFilter::all()).await.unwrap();
    let first = later.next().await.unwrap().unwrap();
    assert_eq!(first.global_position(), Some(3));
}

#[tokio::test]
async fn an_append_waits_for_a_release_when_told_to() {
    let store = InMemoryEventStore::with_limits(
        MemoryLimits::default()
            .max_events(2)
            .when_full(WhenFull::EvictReleased)
            .max_wait(Duration::from_secs(30)),
    );
    store
        .append("a", Any, vec![event(1), event(2)])
        .await
        .unwrap();
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.append("a", Any, vec![event(3)]).await })
    };
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the append waits for room");
    store.release_through(1);
    let written = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("released: the append goes on")
        .unwrap()
        .unwrap();
    assert_eq!(written.last_position, 3);
    assert_eq!(store.usage().first_position, 2);

    // With nothing released it gives up after its wait.
    let impatient = InMemoryEventStore::with_limits(
        MemoryLimits::default()
            .max_events(1)
            .when_full(WhenFull::EvictReleased)
            .max_wait(Duration::from_millis(50)),
    );
    impatient.append("a", Any, vec![event(1)]).await.unwrap();
    let refused = impatient
        .append("a", Any, vec![event(2)])
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        Error::StoreFull {
            temporary: true,
            ..
        }
    ));
}
