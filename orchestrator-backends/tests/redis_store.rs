//! `RedisEventStore` against the live Redis: the event store conformance suite and the
//! Redis-specific guarantees (wire format, atomic scripts, cleanup).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::sync::atomic::{AtomicUsize, Ordering};

use orchestrator_backends::redis::RedisEventStore;
use orchestrator_core::testkit::store::run_all;
use orchestrator_core::{Error, EventEnvelope, EventStore, ExpectedVersion, ReadAll, cloudevents};
use redis_support::{Cleanup, config, random_prefix, reachable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let case = AtomicUsize::new(0);
    run_all(|| {
        // Each case gets a store of its own under a prefix of its own.
        let config = config(
            &url,
            &format!("{prefix}{}:", case.fetch_add(1, Ordering::Relaxed)),
        );
        async move { RedisEventStore::connect(config).await.unwrap() }
    })
    .await;
}

/// Every case on one store, as the suite allows: cases must not assume an empty store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shared_redis_store_conforms() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let store = RedisEventStore::connect(config(&url, &prefix))
        .await
        .unwrap();
    run_all(|| {
        let store = store.clone();
        async move { store }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_follow_the_wire_contract() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let store = RedisEventStore::connect(config(&url, &prefix))
        .await
        .unwrap();
    let event = EventEnvelope::new("order.placed", &serde_json::json!({"id": "o-1"})).unwrap();
    let result = store
        .append("order-1", ExpectedVersion::NoStream, vec![event.clone()])
        .await
        .unwrap();

    let mut raw = redis_support::raw(&url).await;
    for (key, id) in [
        (format!("{prefix}stream:order-1"), "0-1".to_owned()),
        (
            format!("{prefix}all"),
            format!("0-{}", result.last_position),
        ),
    ] {
        let entries: redis_support::RawEntries = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1, "{key}");
        assert_eq!(entries[0].0, id, "{key}");
        let fields = &entries[0].1;
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(field("type"), b"order.placed");
        // The `event` field is a complete CloudEvent, positions included.
        let stored = cloudevents::decode(&field("event")).unwrap();
        assert_eq!(stored.id(), event.id());
        assert_eq!(stored.stream_id(), Some("order-1"));
        assert_eq!(stored.stream_version(), Some(1));
        assert_eq!(stored.global_position(), Some(result.last_position));
        assert_eq!(stored.data_bytes(), event.data_bytes());
    }

    let version: Option<u64> = redis::cmd("HGET")
        .arg(format!("{prefix}stream-ids:order-1"))
        .arg(event.id().as_str())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        version,
        Some(1),
        "the stream's id hash maps the event id to its version"
    );

    let all = store.read_all(ReadAll::from(0, 10)).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        store.delete_all().await.unwrap(),
        4,
        "stream, its id hash, global stream, counter"
    );
    assert_eq!(store.head_position().await.unwrap(), 0);
}

/// A batch of events is written by one script call, so it lands whole and contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_take_contiguous_positions() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let store = RedisEventStore::connect(config(&url, &prefix))
        .await
        .unwrap();
    let batch: Vec<_> = (0..500)
        .map(|i| EventEnvelope::new("n.added", &i).unwrap())
        .collect();
    let tasks: Vec<_> = (0..4)
        .map(|s| {
            let (store, batch) = (store.clone(), batch.clone());
            tokio::spawn(async move {
                store
                    .append(&format!("s{s}"), ExpectedVersion::Any, batch)
                    .await
                    .unwrap()
            })
        })
        .collect();
    for task in tasks {
        let result = task.await.unwrap();
        assert_eq!(result.next_expected_version, 500);
        assert_eq!(result.last_position - result.first_position, 499);
    }
    assert_eq!(store.head_position().await.unwrap(), 2000);
}

/// A lost reply, simulated: writer A's append lands but A never hears of it, writer B (a
/// connection of its own) appends to the same stream, and A sends the same batch again with
/// the same expectation. Nothing is written twice and A hears the original positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_reply_returns_the_original_despite_another_writer() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let a = RedisEventStore::connect(config(&url, &prefix))
        .await
        .unwrap();
    let b = RedisEventStore::connect(config(&url, &prefix))
        .await
        .unwrap();
    let event = |n: u64| EventEnvelope::new("order.line_added", &n).unwrap();
    let opening = vec![event(0)];
    let batch = vec![event(1), event(2), event(3)];

    for events in [opening.clone(), batch.clone()] {
        let expected = match a.stream_version("order-9").await.unwrap() {
            None => ExpectedVersion::NoStream,
            Some(version) => ExpectedVersion::Exact(version),
        };
        // The first attempt: stored, but its reply is "lost".
        let original = a.append("order-9", expected, events.clone()).await.unwrap();
        let other = b
            .append("order-9", ExpectedVersion::Any, vec![event(99)])
            .await
            .unwrap();
        b.append("elsewhere", ExpectedVersion::Any, vec![event(98)])
            .await
            .unwrap();
        let head = a.head_position().await.unwrap();
        assert_eq!(head, other.last_position + 1);

        let retried = a.append("order-9", expected, events.clone()).await.unwrap();
        assert_eq!(retried, original, "the retry expecting {expected}");
        assert_eq!(a.head_position().await.unwrap(), head, "the retry wrote");
        // B's append, retried the same way, is recognised too.
        let again = b
            .append("order-9", ExpectedVersion::Any, vec![event(99)])
            .await;
        assert!(
            again.is_ok_and(|r| r.first_position > other.last_position),
            "a new event with a new id is written"
        );
    }

    let stored = a.read_stream("order-9", 1, 100).await.unwrap();
    let ids: Vec<_> = stored.iter().map(|e| e.id().clone()).collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "an event was written twice: {ids:?}"
    );
    assert_eq!(stored.len(), 1 + 2 + 3 + 2, "{ids:?}");
    assert_eq!(&ids[0], opening[0].id());
    assert_eq!(
        ids[3..6].to_vec(),
        batch.iter().map(|e| e.id().clone()).collect::<Vec<_>>()
    );

    // The same ids in another order are no retry.
    let reordered = vec![batch[2].clone(), batch[0].clone(), batch[1].clone()];
    match a.append("order-9", ExpectedVersion::Any, reordered).await {
        Err(Error::DuplicateEvent {
            stream,
            event_id,
            version,
        }) => assert_eq!(
            (stream.as_str(), &event_id, version),
            ("order-9", batch[2].id(), 6)
        ),
        other => panic!("expected DuplicateEvent, got {other:?}"),
    }
}

/// Copies of one append sent at once by many writers, as a retry racing its original: one
/// copy is written, every writer hears its positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_copies_of_an_append_are_written_once() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let store = RedisEventStore::connect(config(&url, &prefix))
        .await
        .unwrap();
    let batch: Vec<_> = (0..20)
        .map(|i| EventEnvelope::new("n.added", &i).unwrap())
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (store, batch) = (store.clone(), batch.clone());
        tasks.spawn(async move {
            store
                .append("s", ExpectedVersion::Any, batch)
                .await
                .unwrap()
        });
    }
    let results = tasks.join_all().await;
    assert!(results.iter().all(|r| *r == results[0]), "{results:?}");
    assert_eq!(results[0].next_expected_version, 20);
    assert_eq!(store.head_position().await.unwrap(), 20);
}
