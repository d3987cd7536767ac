//! `RedisEventStore` against the live Redis: the event store conformance suite and the
//! Redis-specific guarantees (wire format, atomic scripts, cleanup).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::sync::atomic::{AtomicUsize, Ordering};

use orchestrator_backends::redis::RedisEventStore;
use orchestrator_core::testkit::store::run_all;
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, ReadAll, cloudevents};
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

    let all = store.read_all(ReadAll::from(0, 10)).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        store.delete_all().await.unwrap(),
        3,
        "stream, global stream, counter"
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
