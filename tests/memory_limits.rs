//! The facade's in-memory store is bounded: it evicts only what the outbox relay has
//! published, and a publisher that outruns the relay waits for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use orchestrator::RelayOptions;
use orchestrator::prelude::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_default_store_evicts_what_the_relay_published() {
    let orchestrator = EventOrchestrator::builder()
        .memory_limits(
            MemoryLimits::default()
                .max_events(100)
                .when_full(WhenFull::EvictReleased),
        )
        .build()
        .await
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let _subscription = orchestrator
        .subscribe("test.#", move |_event: EventEnvelope| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .unwrap();
    for n in 0..1_000 {
        orchestrator
            .publish_event("test.happened", json!({ "n": n }))
            .await
            .unwrap();
    }
    tokio::time::timeout(WAIT, async {
        while handled.load(Ordering::Relaxed) < 1_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every event is delivered");
    let store = orchestrator.store();
    assert_eq!(store.head_position().await.unwrap(), 1_000);
    let kept = store.read_all(ReadAll::from(1, usize::MAX)).await.unwrap();
    assert!(kept.len() <= 100, "{} events kept", kept.len());
    let oldest = kept[0].global_position().unwrap();
    assert!(oldest >= 901, "oldest kept {oldest}");
    assert!(orchestrator.relay_status().relayed_position >= oldest - 1);
}

#[tokio::test]
async fn without_a_relay_nothing_is_evicted_and_a_full_store_says_so() {
    let orchestrator = EventOrchestrator::builder()
        .memory_limits(
            MemoryLimits::default()
                .max_events(10)
                .when_full(WhenFull::EvictReleased)
                .max_wait(Duration::from_millis(50)),
        )
        .relay(RelayOptions::disabled())
        .build()
        .await
        .unwrap();
    for n in 0..10 {
        orchestrator
            .publish_event("test.happened", json!({ "n": n }))
            .await
            .unwrap();
    }
    let refused = orchestrator
        .publish_event("test.happened", json!({ "n": 10 }))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("is full (10 events)"),
        "{refused}"
    );
    let kept = orchestrator
        .store()
        .read_all(ReadAll::from(1, usize::MAX))
        .await
        .unwrap();
    assert_eq!(kept.len(), 10);
    assert_eq!(kept[0].global_position(), Some(1));
}
