//! The `EventOrchestrator` facade on the embedded default.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use orchestrator::prelude::*;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

#[tokio::test]
async fn published_events_reach_subscribers_and_the_store() {
    let orchestrator = EventOrchestrator::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    orchestrator
        .subscribe("user.*", move |event: EventEnvelope| {
            let tx = tx.clone();
            async move {
                tx.send(event).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    let id = orchestrator
        .publish_event(
            "user.created",
            json!({"user_id": "123", "username": "john_doe"}),
        )
        .await
        .unwrap();

    let got = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*got.id(), id);
    assert_eq!(got.event_type(), "user.created");
    assert_eq!(
        got.data::<serde_json::Value>().unwrap()["username"],
        "john_doe"
    );
    assert_eq!(
        got.global_position(),
        Some(1),
        "subscribers see the stored position"
    );

    let stored = orchestrator
        .store()
        .read_all(ReadAll::from(0, 10))
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(*stored[0].id(), id);
    assert_eq!(stored[0].stream_id(), Some("user.created"));
}

#[tokio::test]
async fn failing_handlers_end_in_the_dead_letter_queue() {
    let orchestrator = EventOrchestrator::with_parts(
        Arc::new(InProcessTransport::new()),
        Arc::new(InMemoryEventStore::new()),
        RetryPolicy::exponential(2, Duration::from_millis(1)),
    );
    orchestrator
        .subscribe("payment.requested", |_event: EventEnvelope| async {
            Err::<(), _>(HandlerError::retryable("gateway down"))
        })
        .await
        .unwrap();
    orchestrator
        .publish_event("payment.requested", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    let dead = orchestrator.dead_letters();
    timeout(Duration::from_secs(5), async {
        while dead.count().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let letter = dead
        .list(&DeadLetterQuery::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(letter.attempts, 2);
    assert_eq!(letter.reason, "gateway down");
}

#[tokio::test]
async fn bad_event_types_and_patterns_are_typed_errors() {
    let orchestrator = EventOrchestrator::new();
    assert!(matches!(
        orchestrator.publish_event("", json!({})).await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        orchestrator
            .subscribe("order.#.x", |_e: EventEnvelope| async {
                Ok::<_, HandlerError>(())
            })
            .await,
        Err(Error::InvalidInput { .. })
    ));
}
