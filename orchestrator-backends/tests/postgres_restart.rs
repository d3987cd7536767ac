//! Connections killed under load: while a publisher appends through `PostgresEventStore` and
//! a subscription follows, every server process of the store's application is terminated
//! (`pg_terminate_backend`) again and again — the pooled connections, the group commit's,
//! the one that `LISTEN`s. Afterwards no event is lost or stored twice, the subscription saw
//! each once in order, and the pool serves new work.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use orchestrator_backends::postgres::{PostgresConfig, PostgresEventStore};
use orchestrator_core::{EventEnvelope, EventFilter, EventStore, ExpectedVersion, ReadAll};
use postgres_support::{Cleanup, random_schema, raw, reachable};
use serde_json::json;

const EVENTS: usize = 2000;
const KILLS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_lose_no_event_and_the_pool_reconnects() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    // The store's sessions carry a name of their own, so that only they are killed.
    let application = format!("orch_restart_{}", &schema[schema.len() - 12..]);
    let separator = if url.contains('?') { '&' } else { '?' };
    let config = PostgresConfig::new(&format!("{url}{separator}application_name={application}"))
        .unwrap()
        .with_schema(&schema)
        .unwrap()
        .with_pool_size(4)
        .with_poll_interval(Duration::from_millis(100));
    let store = PostgresEventStore::connect(config).await.unwrap();

    // The subscription follows from the start, as a relay would.
    let mut subscription = store.subscribe(1, EventFilter::all()).await.unwrap();
    let follower = tokio::spawn(async move {
        let mut seen = Vec::with_capacity(EVENTS);
        while seen.len() < EVENTS {
            match tokio::time::timeout(Duration::from_secs(60), subscription.next()).await {
                Ok(Some(Ok(event))) => seen.push(event),
                Ok(Some(Err(error))) => panic!("the subscription failed: {error}"),
                Ok(None) => panic!("the subscription ended after {} events", seen.len()),
                Err(_) => panic!("the subscription stalled after {} events", seen.len()),
            }
        }
        seen
    });

    // The publisher appends one event at a time, retrying each until it is stored: a retry
    // after an unknown outcome (killed during its commit) returns the original positions.
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = tokio::spawn({
        let store = store.clone();
        let publishing = publishing.clone();
        async move {
            let mut ids = Vec::with_capacity(EVENTS);
            let mut failures = 0;
            for n in 0..EVENTS {
                let event = EventEnvelope::new("order.placed", &json!({"n": n})).unwrap();
                ids.push(event.id().clone());
                loop {
                    match store
                        .append(
                            &format!("order-{}", n % 7),
                            ExpectedVersion::Any,
                            vec![event.clone()],
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(error) => {
                            assert!(error.is_temporary(), "a permanent append error: {error}");
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            publishing.store(false, Ordering::SeqCst);
            (ids, failures)
        }
    });

    // The killer: every server process of the application, several times during the run.
    let admin = raw(&url).await;
    let mut killed = Vec::new();
    let mut while_publishing = 0;
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if publishing.load(Ordering::SeqCst) {
            while_publishing += 1;
        }
        let n: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&application],
            )
            .await
            .unwrap()
            .get(0);
        killed.push(n);
    }
    let (ids, failures) = publisher.await.unwrap();
    let seen = follower.await.unwrap();
    eprintln!(
        "killed {killed:?} connections, {while_publishing} rounds while publishing; \
         {failures} failed appends retried"
    );
    assert!(
        while_publishing >= KILLS / 2 && killed.iter().filter(|&&n| n > 0).count() >= KILLS / 2,
        "too few connections were killed while publishing to test anything: {killed:?}, \
         {while_publishing} rounds while publishing"
    );

    // The store holds every event once, at positions 1 ..= EVENTS.
    let stored = store.read_all(ReadAll::from(1, EVENTS * 2)).await.unwrap();
    assert_eq!(stored.len(), EVENTS, "events lost or stored twice");
    let positions: Vec<u64> = stored.iter().filter_map(|e| e.global_position()).collect();
    assert_eq!(positions, (1..=EVENTS as u64).collect::<Vec<_>>());
    let stored_ids: HashSet<_> = stored.iter().map(|e| e.id().clone()).collect();
    assert_eq!(stored_ids, ids.iter().cloned().collect::<HashSet<_>>());
    // The subscription saw each once, in order.
    let seen_positions: Vec<u64> = seen.iter().filter_map(|e| e.global_position()).collect();
    assert_eq!(
        seen_positions, positions,
        "the subscription missed or repeated events"
    );

    // The pool reconnected: new work goes through.
    let after = EventEnvelope::new("order.placed", &json!({"n": "after"})).unwrap();
    let written = store
        .append("order-after", ExpectedVersion::NoStream, vec![after])
        .await
        .unwrap();
    assert_eq!(written.last_position, EVENTS as u64 + 1);
    assert_eq!(store.head_position().await.unwrap(), EVENTS as u64 + 1);
}
