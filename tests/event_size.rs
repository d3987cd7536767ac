//! The maximum event size through the facade: `publish` refuses an event over it with
//! `TooLarge` before anything is stored, on `file://` the store opens and reads afterwards,
//! and a stored event the transport refuses is dead-lettered by the relay, not retried
//! forever.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use orchestrator::EventOrchestrator;
use orchestrator_bus::InProcessTransport;
use orchestrator_core::{
    DeadLetterQuery, Error as CoreError, EventEnvelope, EventStore, MaxEventSize,
};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::file::FileEventStore;

fn too_large(result: orchestrator::Result<orchestrator_core::EventId>) -> (usize, usize) {
    match result {
        Err(orchestrator::Error::Core(CoreError::TooLarge { size, limit })) => (size, limit),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// A 70 MiB event on `file://` is refused with `TooLarge` (the default limit), nothing is
/// written, and the directory reopens and reads what was published around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_70_mib_event_is_refused_on_file_and_the_store_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let orchestrator = EventOrchestrator::builder()
        .store_url(&url)
        .build()
        .await
        .unwrap();
    orchestrator
        .publish_event("doc.saved", serde_json::json!({"n": 1}))
        .await
        .unwrap();
    let huge = EventEnvelope::from_bytes(
        "doc.saved",
        "application/octet-stream",
        vec![7_u8; 70 * 1024 * 1024],
    )
    .unwrap();
    let (size, limit) = too_large(orchestrator.publish(huge).await);
    assert_eq!(limit, MaxEventSize::DEFAULT.bytes());
    assert!(size > 70 * 1024 * 1024, "{size}");
    orchestrator
        .publish_event("doc.saved", serde_json::json!({"n": 2}))
        .await
        .unwrap();
    orchestrator.shutdown(Duration::from_secs(5)).await;
    drop(orchestrator);
    let reopened = FileEventStore::open(dir.path()).unwrap();
    // The stream the events went to (the store also holds the relay's checkpoint).
    let events = reopened.read_stream("doc.saved", 1, 10).await.unwrap();
    let ns: Vec<serde_json::Value> = events
        .iter()
        .map(|e| e.data::<serde_json::Value>().unwrap()["n"].clone())
        .collect();
    assert_eq!(ns, [1, 2]);
}

/// `max_event_size` applies to `publish`, to the store and to the transport the builder
/// makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_option_applies_to_publish_store_and_transport() {
    let limit = MaxEventSize::new(1024).unwrap();
    let orchestrator = EventOrchestrator::builder()
        .max_event_size(limit)
        .build()
        .await
        .unwrap();
    let big = EventEnvelope::new("doc.saved", &"x".repeat(1024)).unwrap();
    assert_eq!(too_large(orchestrator.publish(big.clone()).await).1, 1024);
    let head = orchestrator.store().head_position().await.unwrap();
    assert_eq!(head, 0, "nothing was stored");
    // The store the builder made refuses it as well (`store()` is the validating wrapper of
    // that store), and so does the transport.
    let refused = orchestrator
        .store()
        .append(
            "docs",
            orchestrator_core::ExpectedVersion::Any,
            vec![big.clone()],
        )
        .await;
    assert!(
        matches!(refused, Err(CoreError::TooLarge { limit: 1024, .. })),
        "{refused:?}"
    );
    let refused = orchestrator.transport().publish("doc.saved", big).await;
    assert!(
        matches!(refused, Err(CoreError::TooLarge { limit: 1024, .. })),
        "{refused:?}"
    );
}

/// A stored event over the transport's limit (a store given ready-made with a larger one,
/// or an event stored before the limit was lowered) is parked in the dead-letter queue by
/// the relay, which goes on with the next event instead of retrying it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_dead_letters_a_stored_event_the_transport_refuses() {
    let limit = MaxEventSize::new(1024).unwrap();
    let store = InMemoryEventStore::new();
    let big = EventEnvelope::new("doc.saved", &"x".repeat(2048)).unwrap();
    let small = EventEnvelope::new("doc.saved", &1).unwrap();
    store
        .append(
            "docs",
            orchestrator_core::ExpectedVersion::Any,
            vec![big.clone(), small],
        )
        .await
        .unwrap();
    let transport = InProcessTransport::builder().max_event_size(limit).build();
    let orchestrator = EventOrchestrator::builder()
        .store(Arc::new(store))
        .transport(Arc::new(transport))
        .build()
        .await
        .unwrap();
    let mut sub = orchestrator
        .transport()
        .subscribe(orchestrator_core::SubscribeOptions::new("g", "doc.saved").unwrap())
        .await
        .unwrap();
    orchestrator.start_relay();
    let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the small event is relayed")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.event().data::<u64>().unwrap(), 1);
    let letters = orchestrator
        .dead_letters()
        .list(&DeadLetterQuery::default())
        .await
        .unwrap();
    let [letter] = letters.as_slice() else {
        panic!("expected one dead letter, got {letters:?}")
    };
    assert_eq!(letter.event.id(), big.id());
    assert!(
        letter.reason.contains("maximum event size"),
        "{}",
        letter.reason
    );
}
