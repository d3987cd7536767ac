//! `RedisInbox` against the live Redis: the inbox conformance suite, trimming of both
//! sorted sets, surviving a new connection, the store's inbox, and a subscription that
//! skips after a "restart" an event it handled before.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_backends::redis::{RedisEventStore, RedisInbox};
use orchestrator_bus::{EventBus, InProcessTransport, SubscriptionConfig};
use orchestrator_core::testkit::inbox::run_all;
use orchestrator_core::{EventEnvelope, EventId, EventStore, HandlerError, Inbox, InboxRetention};
use redis_support::{Cleanup, config, random_prefix, raw, reachable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_inbox_conforms() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let case = AtomicUsize::new(0);
    run_all(|retention, clock| {
        let config = config(
            &url,
            &format!("{prefix}{}:", case.fetch_add(1, Ordering::Relaxed)),
        );
        async move {
            RedisInbox::connect(config)
                .await
                .unwrap()
                .with_retention(retention)
                .with_clock(clock)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sets_are_trimmed_to_the_window_and_survive_a_new_connection() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let inbox = RedisInbox::connect(config(&url, &prefix))
        .await
        .unwrap()
        .with_retention(InboxRetention::last(3).and_max_age(Duration::from_secs(3600)));
    let ids: Vec<EventId> = (0..10).map(|_| EventId::new()).collect();
    for id in &ids {
        inbox.record("billing", id).await.unwrap();
    }
    let (by_order, by_time) = inbox.keys_of("billing");
    let mut conn = raw(&url).await;
    for key in [&by_order, &by_time] {
        let len: usize = redis::cmd("ZCARD")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(len, 3, "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= 3_600_000,
            "{key} expires with the age bound: {ttl}"
        );
    }
    drop(inbox);

    // Another process, another connection: the same ids.
    let inbox = RedisInbox::connect(config(&url, &prefix))
        .await
        .unwrap()
        .with_retention(InboxRetention::last(3));
    assert!(inbox.durable());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(inbox.seen("billing", id).await.unwrap(), i >= 7, "id {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_hands_out_an_inbox_under_its_prefix() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let store = RedisEventStore::connect(config(&url, &prefix))
        .await
        .unwrap();
    let inbox = store.inbox().expect("the Redis store keeps an inbox");
    assert!(inbox.durable());
    let id = EventId::new();
    inbox.record("billing", &id).await.unwrap();
    assert!(store.inbox().unwrap().seen("billing", &id).await.unwrap());
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}inbox:billing"))
        .query_async(&mut raw(&url).await)
        .await
        .unwrap();
    assert!(exists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handled_event_is_skipped_after_a_restart() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let calls: Arc<Mutex<Vec<EventId>>> = Arc::new(Mutex::new(Vec::new()));
    let before = EventEnvelope::new("pay.captured", &serde_json::json!({"n": 1})).unwrap();
    let after = EventEnvelope::new("pay.captured", &serde_json::json!({"n": 2})).unwrap();

    let run = |events: Vec<EventEnvelope>, wait_for: EventId| {
        let (calls, url, prefix) = (calls.clone(), url.clone(), prefix.clone());
        async move {
            let inbox: Arc<dyn Inbox> =
                Arc::new(RedisInbox::connect(config(&url, &prefix)).await.unwrap());
            let bus = EventBus::new(Arc::new(InProcessTransport::new()));
            let c = calls.clone();
            let _sub = bus
                .subscribe_with(
                    SubscriptionConfig::new("pay.#")
                        .named("billing")
                        .inbox(inbox),
                    Arc::new(move |e: EventEnvelope| {
                        c.lock().unwrap().push(e.id().clone());
                        async { Ok::<_, HandlerError>(()) }
                    }),
                )
                .await
                .unwrap();
            for event in events {
                bus.publish(event).await.unwrap();
            }
            tokio::time::timeout(Duration::from_secs(10), async {
                while !calls.lock().unwrap().contains(&wait_for) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await
            .expect("not handled in time");
            bus.shutdown(Duration::from_secs(10)).await;
        }
    };
    run(vec![before.clone()], before.id().clone()).await;
    // The restart: `before` is published again (a relay resuming from its checkpoint).
    run(vec![before.clone(), after.clone()], after.id().clone()).await;
    assert_eq!(
        *calls.lock().unwrap(),
        vec![before.id().clone(), after.id().clone()]
    );
}
