//! Subscriptions with an inbox on the in-process transport: an event delivered twice is
//! handled once, a failed handler's event is not recorded (its retry runs), and after a
//! restart (a new bus, the same group, the same durable inbox) a handled event is skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_bus::{EventBus, InProcessTransport, RetryMode, SubscriptionConfig};
use orchestrator_core::{
    EventEnvelope, EventHandler, EventId, HandlerError, InMemoryInbox, Inbox, InboxRetention,
    Jitter, RetryPolicy,
};
use orchestrator_store::inbox::FileInbox;
use serde_json::json;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn event(n: u64) -> EventEnvelope {
    EventEnvelope::new("pay.captured", &json!({ "n": n })).unwrap()
}

/// A handler that records the id of every event it is called with.
fn recording(calls: Arc<Mutex<Vec<EventId>>>) -> Arc<dyn EventHandler> {
    Arc::new(move |e: EventEnvelope| {
        let calls = calls.clone();
        async move {
            calls.lock().unwrap().push(e.id().clone());
            Ok::<_, HandlerError>(())
        }
    })
}

async fn wait_until(mut check: impl FnMut() -> bool) {
    timeout(WAIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("condition not reached in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_twice_is_handled_once() {
    let bus = EventBus::new(Arc::new(InProcessTransport::new()));
    let inbox: Arc<dyn Inbox> = Arc::new(InMemoryInbox::default());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let _sub = bus
        .subscribe_with(
            SubscriptionConfig::new("pay.#")
                .named("payments")
                .inbox(Arc::clone(&inbox)),
            recording(calls.clone()),
        )
        .await
        .unwrap();
    let (twice, after) = (event(1), event(2));
    // The same envelope twice, as a relay publishing again after a crash would.
    bus.publish(twice.clone()).await.unwrap();
    bus.publish(twice.clone()).await.unwrap();
    bus.publish(after.clone()).await.unwrap();
    // One at a time, in order: once `after` is handled, the duplicate was settled.
    wait_until(|| calls.lock().unwrap().contains(after.id())).await;
    assert_eq!(
        *calls.lock().unwrap(),
        vec![twice.id().clone(), after.id().clone()]
    );
    assert!(inbox.seen("payments", twice.id()).await.unwrap());
    assert!(inbox.seen("payments", after.id()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handlers_event_is_not_recorded_and_its_retry_runs() {
    for mode in [RetryMode::InPlace, RetryMode::Redeliver] {
        let bus = EventBus::new(Arc::new(InProcessTransport::new()));
        let inbox: Arc<dyn Inbox> = Arc::new(InMemoryInbox::default());
        // Each call: whether the inbox had the id while the handler ran.
        let calls: Arc<Mutex<Vec<bool>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, i) = (calls.clone(), Arc::clone(&inbox));
        let handler: Arc<dyn EventHandler> = Arc::new(move |e: EventEnvelope| {
            let (calls, inbox) = (c.clone(), Arc::clone(&i));
            async move {
                let seen = inbox.seen("flaky", e.id()).await.unwrap();
                let first = {
                    let mut calls = calls.lock().unwrap();
                    calls.push(seen);
                    calls.len() == 1
                };
                if first {
                    return Err(HandlerError::retryable("first call fails"));
                }
                Ok(())
            }
        });
        let _sub = bus
            .subscribe_with(
                SubscriptionConfig::new("pay.#")
                    .named("flaky")
                    .inbox(Arc::clone(&inbox))
                    .retry_mode(mode)
                    .retry(
                        RetryPolicy::exponential(3, Duration::from_millis(5))
                            .with_jitter(Jitter::None),
                    ),
                handler,
            )
            .await
            .unwrap();
        let e = event(1);
        bus.publish(e.clone()).await.unwrap();
        wait_until(|| calls.lock().unwrap().len() == 2).await;
        timeout(WAIT, async {
            while !inbox.seen("flaky", e.id()).await.unwrap() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the id was never recorded");
        assert_eq!(
            *calls.lock().unwrap(),
            vec![false, false],
            "{mode:?}: the failed first call recorded the id"
        );
        // Delivered again now: skipped.
        bus.publish(e).await.unwrap();
        bus.publish(event(2)).await.unwrap();
        wait_until(|| calls.lock().unwrap().len() == 3).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(calls.lock().unwrap().len(), 3, "{mode:?}");
        bus.shutdown(WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handled_event_is_skipped_after_a_restart_with_a_durable_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (before, after) = (event(1), event(2));

    // First run: `before` is handled and recorded.
    {
        let inbox: Arc<dyn Inbox> = Arc::new(FileInbox::open(dir.path()).unwrap());
        let bus = EventBus::new(Arc::new(InProcessTransport::new()));
        let _sub = bus
            .subscribe_with(
                SubscriptionConfig::new("pay.#")
                    .named("billing")
                    .inbox(inbox),
                recording(calls.clone()),
            )
            .await
            .unwrap();
        bus.publish(before.clone()).await.unwrap();
        wait_until(|| calls.lock().unwrap().len() == 1).await;
        let report = bus.shutdown(WAIT).await;
        assert!(report.unfinished.is_empty(), "{report:?}");
    }

    // The restart: a new process's bus and inbox; the relay publishes `before` again.
    let inbox: Arc<dyn Inbox> = Arc::new(
        FileInbox::open(dir.path())
            .unwrap()
            .with_retention(InboxRetention::default()),
    );
    let bus = EventBus::new(Arc::new(InProcessTransport::new()));
    let h = handled.clone();
    let c = calls.clone();
    let _sub = bus
        .subscribe_with(
            SubscriptionConfig::new("pay.#")
                .named("billing")
                .inbox(inbox),
            Arc::new(move |e: EventEnvelope| {
                h.fetch_add(1, Ordering::SeqCst);
                c.lock().unwrap().push(e.id().clone());
                async { Ok::<_, HandlerError>(()) }
            }),
        )
        .await
        .unwrap();
    bus.publish(before.clone()).await.unwrap();
    bus.publish(after.clone()).await.unwrap();
    wait_until(|| calls.lock().unwrap().contains(after.id())).await;
    assert_eq!(
        *calls.lock().unwrap(),
        vec![before.id().clone(), after.id().clone()],
        "`before` was handled again after the restart"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1);
}
