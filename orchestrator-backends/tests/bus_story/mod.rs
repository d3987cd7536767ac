//! The event bus on a broker transport, told as a story both backends' bus tests share:
//! handlers, retries with backoff, dead letters and their reprocessing behave as in process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_bus::{EventBus, SubscriptionConfig};
use orchestrator_core::{DeadLetterQuery, EventEnvelope, HandlerError, RetryPolicy, Transport};

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what}: not within 20 s");
}

/// Orders o-1 (succeeds at once), o-2 (fails once, then succeeds) and o-3 (fails until it is
/// fixed, is dead-lettered after 3 attempts, then reprocessed) through a bus on `transport`;
/// the bus is shut down at the end, the transport left open.
pub(crate) async fn billing(transport: Arc<dyn Transport>) {
    let bus = EventBus::new(Arc::clone(&transport))
        .with_retry_policy(RetryPolicy::exponential(3, Duration::from_millis(10)));

    // o-1 succeeds at once, o-2 fails once then succeeds, o-3 fails until it is fixed.
    let attempts: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let handler = {
        let (attempts, fixed) = (attempts.clone(), fixed.clone());
        Arc::new(move |event: EventEnvelope| {
            let (attempts, fixed) = (attempts.clone(), fixed.clone());
            async move {
                let order: serde_json::Value = event.data()?;
                let id = order["id"].as_str().unwrap().to_owned();
                let n = {
                    let mut attempts = attempts.lock().unwrap();
                    let n = attempts.entry(id.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                match id.as_str() {
                    "o-2" if n == 1 => Err(HandlerError::retryable("payment service timed out")),
                    "o-3" if !fixed.load(Ordering::SeqCst) => {
                        Err(HandlerError::retryable("card declined"))
                    }
                    _ => Ok(()),
                }
            }
        })
    };
    let subscription = bus
        .subscribe_with(SubscriptionConfig::new("order.*").named("billing"), handler)
        .await
        .unwrap();
    for id in ["o-1", "o-2", "o-3"] {
        let event = EventEnvelope::new("order.placed", &serde_json::json!({ "id": id })).unwrap();
        bus.publish(event).await.unwrap();
    }

    let dead_letters = bus.dead_letters();
    let dlq = transport.dead_letter_queue();
    until("o-3 dead-lettered", || {
        let n = attempts.lock().unwrap().get("o-3").copied();
        n == Some(3)
    })
    .await;
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = dlq.list(&DeadLetterQuery::default()).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let [letter] = letters.as_slice() else {
        panic!("expected one dead letter, got {letters:?}");
    };
    assert_eq!(letter.subscription, "billing");
    assert_eq!(letter.topic, "order.placed");
    assert_eq!(letter.attempts, 3);
    assert!(letter.reason.contains("card declined"), "{}", letter.reason);
    {
        let attempts = attempts.lock().unwrap();
        assert_eq!(attempts.get("o-1"), Some(&1));
        assert_eq!(
            attempts.get("o-2"),
            Some(&2),
            "retried after a retryable error"
        );
    }

    fixed.store(true, Ordering::SeqCst);
    dead_letters.reprocess(&letter.id).await.unwrap();
    until("o-3 reprocessed", || {
        attempts.lock().unwrap().get("o-3").copied() == Some(4)
    })
    .await;
    assert_eq!(dead_letters.count().await.unwrap(), 0);

    subscription.unsubscribe().await;
    assert!(bus.shutdown(Duration::from_secs(5)).await.is_clean());
}
