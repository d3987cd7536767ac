//! Idempotent appends on the embedded store beyond the conformance suite: recognised after
//! a reopen (the index rebuilt from the segments), and when the retry lands in the same
//! group commit as its original.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orchestrator_core::ExpectedVersion::{Any, Exact, NoStream};
use orchestrator_core::{Error, EventEnvelope, EventId, EventStore, ReadAll};
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use serde_json::json;

fn event(n: u64) -> EventEnvelope {
    EventEnvelope::new("test.happened", &json!({ "n": n, "pad": "x".repeat(40) })).unwrap()
}

async fn all(store: &FileEventStore) -> Vec<EventEnvelope> {
    store.read_all(ReadAll::from(0, usize::MAX)).await.unwrap()
}

#[tokio::test]
async fn a_retry_after_reopening_returns_the_original_positions() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so that the originals end up in a sealed segment.
    let options = FileStoreOptions::default().max_segment_bytes(512);
    let store = FileEventStore::open_with(dir.path(), options.clone()).unwrap();
    let opening = vec![event(1)];
    // A UUID id, an id that is not a UUID, and a UUID spelled in upper case (another id).
    let uuid = EventId::new();
    let batch = vec![
        event(2).with_id(uuid.clone()),
        event(3).with_id(EventId::parse("order-7-placed").unwrap()),
        event(4),
    ];
    let opened = store.append("s", NoStream, opening.clone()).await.unwrap();
    let original = store.append("s", Exact(1), batch.clone()).await.unwrap();
    store.append("t", Any, vec![event(5)]).await.unwrap();
    store.append("s", Any, vec![event(6)]).await.unwrap();
    let before = all(&store).await;
    drop(store);

    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    assert_eq!(store.recovery_report().events, 6);
    for expected in [Any, Exact(1)] {
        let retried = store.append("s", expected, batch.clone()).await.unwrap();
        assert_eq!(retried, original, "retry expecting {expected}");
    }
    let retried = store.append("s", NoStream, opening).await.unwrap();
    assert_eq!(retried, opened, "retry of the first append");
    assert_eq!(all(&store).await, before, "retries wrote nothing");

    let reordered = vec![batch[1].clone(), batch[0].clone(), batch[2].clone()];
    match store.append("s", Any, reordered).await {
        Err(Error::DuplicateEvent {
            stream,
            event_id,
            version,
        }) => assert_eq!(
            (stream.as_str(), &event_id, version),
            ("s", batch[1].id(), 3)
        ),
        other => panic!("expected DuplicateEvent, got {other:?}"),
    }
    assert_eq!(all(&store).await, before, "a clash wrote nothing");

    let upper = EventId::parse(uuid.as_str().to_uppercase()).unwrap();
    let written = store
        .append("s", Any, vec![event(7).with_id(upper)])
        .await
        .unwrap();
    assert_eq!(
        (written.next_expected_version, written.first_position),
        (6, 7),
        "an upper-case spelling of a stored UUID id is another id"
    );
}

/// Appenders sending the same batch at once, so that copies land in the group of the
/// original or of the next ones: one copy is written, every appender hears its positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_an_append_in_one_group_are_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let options =
        FileStoreOptions::default().fsync(FsyncPolicy::Interval(Duration::from_millis(50)));
    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    store.append("s", Any, vec![event(0)]).await.unwrap();
    let batch = vec![event(1), event(2), event(3)];
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (store, batch) = (store.clone(), batch.clone());
        tasks.spawn(async move { store.append("s", Any, batch).await.unwrap() });
    }
    let results = tasks.join_all().await;
    assert!(
        results.iter().all(|r| *r == results[0]),
        "every copy hears the same result: {results:?}"
    );
    assert_eq!(results[0].next_expected_version, 4);
    assert_eq!(
        (results[0].first_position, results[0].last_position),
        (2, 4)
    );
    assert_eq!(store.stream_version("s").await.unwrap(), Some(4));
    assert_eq!(store.head_position().await.unwrap(), 4);
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (2, 4), "{stats:?}");
}
