//! The bus's own conformance cases, run over any [`Transport`]: what the bus promises —
//! retries, dead letters with their story, reprocessing, per-key order under concurrency,
//! competing and fan-out subscriptions — must hold on every backend, not only in process.
//!
//! Each case uses fresh random topics and subscription names, so brokers shared with other
//! tests are fine. A case panics with what went wrong.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
//! use std::sync::Arc;
//! let transport = Arc::new(orchestrator_bus::InProcessTransport::new());
//! orchestrator_bus::testkit::run_all(transport).await;
//! # }
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_core::{
    DeadLetterQuery, EventEnvelope, HandlerError, Jitter, RetryPolicy, Transport,
};

use crate::{EventBus, SubscriptionConfig};

const WAIT: Duration = Duration::from_secs(30);

fn unique(what: &str) -> String {
    format!("{what}{}", &uuid::Uuid::now_v7().simple().to_string()[20..])
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "bus conformance: {what}: not within {WAIT:?}"
    );
}

/// Runs every case on `transport`.
pub async fn run_all(transport: Arc<dyn Transport>) {
    retries_dead_letters_and_reprocessing(Arc::clone(&transport)).await;
    per_key_order_under_concurrency(Arc::clone(&transport)).await;
    named_subscriptions_compete_and_others_fan_out(transport).await;
}

/// One event succeeds at once, one after a retryable failure, one fails until its handler
/// is fixed: it is dead-lettered after the policy's attempts with reason, attempts and
/// subscription, and reprocessing it after the fix handles it and empties the queue.
pub async fn retries_dead_letters_and_reprocessing(transport: Arc<dyn Transport>) {
    let topic = format!("{}.order.placed", unique("bus"));
    let name = unique("billing");
    let bus = EventBus::new(Arc::clone(&transport)).with_retry_policy(
        RetryPolicy::exponential(3, Duration::from_millis(20)).with_jitter(Jitter::None),
    );
    let attempts: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let handler = {
        let (attempts, fixed) = (Arc::clone(&attempts), Arc::clone(&fixed));
        Arc::new(move |event: EventEnvelope| {
            let (attempts, fixed) = (Arc::clone(&attempts), Arc::clone(&fixed));
            async move {
                let id = event.data::<serde_json::Value>()?["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let n = {
                    let mut attempts = attempts.lock().unwrap();
                    let n = attempts.entry(id.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                match id.as_str() {
                    "o-2" if n == 1 => Err(HandlerError::retryable("timed out")),
                    "o-3" if !fixed.load(Ordering::SeqCst) => {
                        Err(HandlerError::retryable("card declined"))
                    }
                    _ => Ok(()),
                }
            }
        })
    };
    let subscription = bus
        .subscribe_with(
            SubscriptionConfig::new(topic.as_str()).named(name.as_str()),
            handler,
        )
        .await
        .unwrap();
    for id in ["o-1", "o-2", "o-3"] {
        let event = EventEnvelope::new(topic.as_str(), &serde_json::json!({ "id": id })).unwrap();
        bus.publish(event).await.unwrap();
    }
    until("o-3 tried three times", || {
        attempts.lock().unwrap().get("o-3") == Some(&3)
    })
    .await;
    let tools = bus.dead_letters();
    let query = DeadLetterQuery {
        subscription: Some(name.clone()),
        ..Default::default()
    };
    let mut letters = Vec::new();
    for _ in 0..(WAIT.as_millis() / 20) {
        letters = tools.list(&query).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let [letter] = letters.as_slice() else {
        panic!("bus conformance: expected one dead letter for {name}, got {letters:?}");
    };
    assert_eq!(letter.attempts, 3, "dead letter's attempts");
    assert_eq!(letter.reason, "card declined");
    assert_eq!(letter.topic, topic);
    assert!(letter.first_failure_at <= letter.last_failure_at);
    {
        let attempts = attempts.lock().unwrap();
        assert_eq!(attempts.get("o-1"), Some(&1), "o-1 handled once");
        assert_eq!(attempts.get("o-2"), Some(&2), "o-2 retried once");
    }
    fixed.store(true, Ordering::SeqCst);
    tools.reprocess(&letter.id).await.unwrap();
    until("o-3 reprocessed", || {
        attempts.lock().unwrap().get("o-3") == Some(&4)
    })
    .await;
    assert!(
        tools.list(&query).await.unwrap().is_empty(),
        "letter removed"
    );
    subscription.unsubscribe().await;
}

/// Events of one key are handled in publish order even with concurrency 4.
pub async fn per_key_order_under_concurrency(transport: Arc<dyn Transport>) {
    let topic = format!("{}.acct.moved", unique("bus"));
    let bus = EventBus::new(transport);
    let log: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let handler = {
        let log = Arc::clone(&log);
        Arc::new(move |event: EventEnvelope| {
            let log = Arc::clone(&log);
            async move {
                let n = event.data::<serde_json::Value>()?["n"]
                    .as_u64()
                    .unwrap_or_default();
                // Uneven handling times shuffle completion order across keys.
                tokio::time::sleep(Duration::from_micros((n * 7919) % 700)).await;
                let key = event.stream_id().unwrap_or_default().to_owned();
                log.lock().unwrap().push((key, n));
                Ok::<_, HandlerError>(())
            }
        })
    };
    let subscription = bus
        .subscribe_with(
            SubscriptionConfig::new(topic.as_str())
                .concurrency(4)
                .ordered_by_key(),
            handler,
        )
        .await
        .unwrap();
    const PER_KEY: u64 = 30;
    for n in 0..PER_KEY {
        for key in ["a", "b", "c"] {
            let event = EventEnvelope::new(topic.as_str(), &serde_json::json!({ "n": n }))
                .unwrap()
                .with_stream_id(key);
            bus.publish(event).await.unwrap();
        }
    }
    until("every keyed event handled", || {
        log.lock().unwrap().len() as u64 == 3 * PER_KEY
    })
    .await;
    let log = log.lock().unwrap().clone();
    for key in ["a", "b", "c"] {
        let seen: Vec<u64> = log
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            seen,
            (0..PER_KEY).collect::<Vec<_>>(),
            "key {key} out of order"
        );
    }
    subscription.unsubscribe().await;
}

/// Two subscriptions sharing a name split the events; a third with its own name gets all.
pub async fn named_subscriptions_compete_and_others_fan_out(transport: Arc<dyn Transport>) {
    let topic = format!("{}.job.run", unique("bus"));
    let workers = unique("workers");
    let audit = unique("audit");
    let bus = EventBus::new(transport);
    let worked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let audited: Arc<Mutex<Vec<u64>>> = Arc::default();
    let recorder = |into: Arc<Mutex<Vec<u64>>>| {
        Arc::new(move |event: EventEnvelope| {
            let into = Arc::clone(&into);
            async move {
                let n = event.data::<serde_json::Value>()?["n"]
                    .as_u64()
                    .unwrap_or_default();
                into.lock().unwrap().push(n);
                Ok::<_, HandlerError>(())
            }
        })
    };
    let mut subscriptions = Vec::new();
    for _ in 0..2 {
        subscriptions.push(
            bus.subscribe_with(
                SubscriptionConfig::new(topic.as_str()).named(workers.as_str()),
                recorder(Arc::clone(&worked)),
            )
            .await
            .unwrap(),
        );
    }
    subscriptions.push(
        bus.subscribe_with(
            SubscriptionConfig::new(topic.as_str()).named(audit.as_str()),
            recorder(Arc::clone(&audited)),
        )
        .await
        .unwrap(),
    );
    const EVENTS: u64 = 60;
    for n in 0..EVENTS {
        let event = EventEnvelope::new(topic.as_str(), &serde_json::json!({ "n": n })).unwrap();
        bus.publish(event).await.unwrap();
    }
    until("workers and audit saw everything", || {
        worked.lock().unwrap().len() as u64 >= EVENTS
            && audited.lock().unwrap().len() as u64 >= EVENTS
    })
    .await;
    // A moment for duplicates, if any, to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worked = worked.lock().unwrap().clone();
    worked.sort_unstable();
    assert_eq!(
        worked,
        (0..EVENTS).collect::<Vec<_>>(),
        "each job handled once by the workers"
    );
    let mut audited = audited.lock().unwrap().clone();
    audited.sort_unstable();
    assert_eq!(
        audited,
        (0..EVENTS).collect::<Vec<_>>(),
        "audit saw every job once"
    );
    for subscription in subscriptions {
        subscription.unsubscribe().await;
    }
}
