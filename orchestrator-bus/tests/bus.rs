//! The event bus's behaviour on the in-process transport: routing, retry counts and
//! delays, dead letters, reprocessing, panics, filter/transform order, per-key order,
//! deduplication and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_bus::middleware::{DeliveryContext, Middleware, Next};
use orchestrator_bus::{EventBus, InProcessTransport, RetryMode, SubscriptionConfig};
use orchestrator_core::{
    DeadLetterQuery, Error, EventEnvelope, EventHandler, EventId, HandlerError, Jitter,
    ManualClock, RetryPolicy, Transport,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn event(event_type: &str, n: u64) -> EventEnvelope {
    EventEnvelope::new(event_type, &json!({ "n": n })).unwrap()
}

fn n_of(event: &EventEnvelope) -> u64 {
    event.data::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

/// A handler that forwards every event it sees.
fn forward(tx: mpsc::UnboundedSender<EventEnvelope>) -> Arc<dyn EventHandler> {
    Arc::new(move |e: EventEnvelope| {
        let tx = tx.clone();
        async move {
            tx.send(e).ok();
            Ok::<_, HandlerError>(())
        }
    })
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<EventEnvelope>) -> EventEnvelope {
    timeout(WAIT, rx.recv())
        .await
        .expect("timed out")
        .expect("closed")
}

async fn nothing_more(rx: &mut mpsc::UnboundedReceiver<EventEnvelope>) {
    assert!(
        timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "unexpected extra event"
    );
}

fn bus() -> EventBus {
    EventBus::new(Arc::new(InProcessTransport::new()))
}

#[tokio::test]
async fn routing_table() {
    let bus = bus();
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "user.created",
            &["user.created"],
            &["user.deleted", "user.created.v2", "user"],
        ),
        (
            "user.*",
            &["user.created", "user.deleted"],
            &["user", "user.a.b", "users.created"],
        ),
        (
            "order.#",
            &["order", "order.placed", "order.line.added"],
            &["orders.placed", "x.order"],
        ),
        (
            "*.created",
            &["user.created", "order.created"],
            &["created", "a.b.created"],
        ),
        ("#", &["a", "a.b.c"], &[]),
    ];
    for (pattern, matching, other) in cases {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sub = bus.subscribe(pattern, forward(tx)).await.unwrap();
        for (i, topic) in other.iter().chain(matching.iter()).enumerate() {
            bus.publish(event(topic, i as u64)).await.unwrap();
        }
        for topic in *matching {
            assert_eq!(
                recv(&mut rx).await.event_type(),
                *topic,
                "pattern {pattern}"
            );
        }
        nothing_more(&mut rx).await;
        sub.unsubscribe().await;
    }
}

#[tokio::test]
async fn bad_patterns_and_topics_are_typed_errors() {
    let bus = bus();
    let (tx, _rx) = mpsc::unbounded_channel();
    for pattern in ["", "user..created", "order.#.placed", "#.x", "user.cre*"] {
        let err = bus
            .subscribe(pattern, forward(tx.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { .. }),
            "{pattern}: {err}"
        );
    }
    assert!(matches!(
        EventEnvelope::new("", &1),
        Err(Error::InvalidInput { .. })
    ));
}

#[tokio::test]
async fn groups_compete_and_different_groups_fan_out() {
    let bus = bus();
    let (a_tx, mut a_rx) = mpsc::unbounded_channel();
    let (b_tx, mut b_rx) = mpsc::unbounded_channel();
    let (c_tx, mut c_rx) = mpsc::unbounded_channel();
    for tx in [a_tx, b_tx] {
        bus.subscribe_with(
            SubscriptionConfig::new("job.#").named("workers"),
            forward(tx),
        )
        .await
        .unwrap();
    }
    bus.subscribe_with(
        SubscriptionConfig::new("job.#").named("audit"),
        forward(c_tx),
    )
    .await
    .unwrap();
    for i in 0..100 {
        bus.publish(event("job.run", i)).await.unwrap();
    }
    let mut audited = Vec::new();
    for _ in 0..100 {
        audited.push(n_of(&recv(&mut c_rx).await));
    }
    assert_eq!(audited, (0..100).collect::<Vec<_>>());
    let mut worked = Vec::new();
    while worked.len() < 100 {
        tokio::select! {
            Some(e) = a_rx.recv() => worked.push(n_of(&e)),
            Some(e) = b_rx.recv() => worked.push(n_of(&e)),
            _ = tokio::time::sleep(WAIT) => panic!("workers stalled at {}", worked.len()),
        }
    }
    worked.sort_unstable();
    assert_eq!(
        worked,
        (0..100).collect::<Vec<_>>(),
        "each job exactly once"
    );
}

/// A handler failing the first `fail` calls, recording each call's attempt number.
/// Each call's attempt number and last error.
type Calls = Arc<Mutex<Vec<(u32, Option<String>)>>>;

fn flaky(fail: u32, calls: Calls) -> Arc<dyn EventHandler> {
    let count = Arc::new(AtomicU32::new(0));
    Arc::new(move |_e: EventEnvelope| {
        let count = count.clone();
        let calls = calls.clone();
        async move {
            let ctx = DeliveryContext::current().expect("handlers run inside a delivery context");
            calls
                .lock()
                .unwrap()
                .push((ctx.attempt, ctx.last_error.clone()));
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= fail {
                return Err(HandlerError::retryable(format!("boom {n}")));
            }
            Ok(())
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

/// Lets spawned tasks run until they block on the clock or a channel.
async fn settle_tasks() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test]
async fn in_place_retries_follow_the_backoff_exactly() {
    let clock = ManualClock::starting_at_epoch();
    let transport = Arc::new(InProcessTransport::new());
    let bus = EventBus::new(transport.clone()).with_clock(Arc::new(clock.clone()));
    let policy = RetryPolicy::exponential(4, Duration::from_millis(100)).with_jitter(Jitter::None);
    let calls = Arc::new(Mutex::new(Vec::new()));
    bus.subscribe_with(
        SubscriptionConfig::new("pay.#")
            .retry(policy)
            .retry_mode(RetryMode::InPlace),
        flaky(3, calls.clone()),
    )
    .await
    .unwrap();
    bus.publish(event("pay.requested", 1)).await.unwrap();

    // Attempt 1 fails at once; then retries wait 100, 200, 400 ms of clock time.
    wait_until(|| calls.lock().unwrap().len() == 1).await;
    for (delay_ms, expected_calls) in [(100, 2), (200, 3), (400, 4)] {
        clock.advance(Duration::from_millis(delay_ms - 1));
        settle_tasks().await;
        assert_eq!(
            calls.lock().unwrap().len(),
            expected_calls - 1,
            "retried too early"
        );
        clock.advance(Duration::from_millis(1));
        wait_until(|| calls.lock().unwrap().len() == expected_calls).await;
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![
            (1, None),
            (2, Some("boom 1".into())),
            (3, Some("boom 2".into())),
            (4, Some("boom 3".into())),
        ]
    );
    settle_tasks().await;
    assert!(transport.dead_letter_queue().is_empty().await.unwrap());
}

#[tokio::test]
async fn redelivered_retries_use_the_transport_and_its_clock() {
    let clock = ManualClock::starting_at_epoch();
    let transport = Arc::new(
        InProcessTransport::builder()
            .clock(Arc::new(clock.clone()))
            .build(),
    );
    let bus = EventBus::new(transport.clone());
    let policy = RetryPolicy::exponential(3, Duration::from_secs(1)).with_jitter(Jitter::None);
    let calls = Arc::new(Mutex::new(Vec::new()));
    bus.subscribe_with(
        SubscriptionConfig::new("pay.#").retry(policy),
        flaky(2, calls.clone()),
    )
    .await
    .unwrap();
    bus.publish(event("pay.requested", 1)).await.unwrap();
    wait_until(|| calls.lock().unwrap().len() == 1).await;
    clock.advance(Duration::from_millis(999));
    settle_tasks().await;
    assert_eq!(calls.lock().unwrap().len(), 1);
    clock.advance(Duration::from_millis(1));
    wait_until(|| calls.lock().unwrap().len() == 2).await;
    clock.advance(Duration::from_secs(2));
    wait_until(|| calls.lock().unwrap().len() == 3).await;
    assert_eq!(
        calls.lock().unwrap().clone(),
        vec![
            (1, None),
            (2, Some("boom 1".into())),
            (3, Some("boom 2".into()))
        ]
    );
}

#[tokio::test]
async fn exhausted_retries_dead_letter_with_the_whole_story_and_reprocess_works() {
    let transport = Arc::new(InProcessTransport::new());
    let bus = EventBus::new(transport.clone());
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handled = Arc::new(AtomicUsize::new(0));
    let (f, h) = (fixed.clone(), handled.clone());
    let policy = RetryPolicy::exponential(3, Duration::from_millis(5)).with_jitter(Jitter::None);
    bus.subscribe_with(
        SubscriptionConfig::new("invoice.#")
            .named("invoicing")
            .retry(policy),
        Arc::new(move |_e: EventEnvelope| {
            let (f, h) = (f.clone(), h.clone());
            async move {
                if !f.load(Ordering::SeqCst) {
                    return Err(HandlerError::retryable("ledger offline"));
                }
                h.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }),
    )
    .await
    .unwrap();
    let sent = event("invoice.issued", 7);
    bus.publish(sent.clone()).await.unwrap();

    let tools = bus.dead_letters();
    wait_until_async(|| async { tools.count().await.unwrap() == 1 }).await;
    let letters = tools
        .list(&DeadLetterQuery {
            subscription: Some("invoicing".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let letter = &letters[0];
    assert_eq!(letter.event.id(), sent.id());
    assert_eq!(letter.reason, "ledger offline");
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.subscription, "invoicing");
    assert_eq!(letter.topic, "invoice.issued");
    assert!(letter.first_failure_at <= letter.last_failure_at);
    assert_eq!(tools.inspect(&letter.id).await.unwrap(), *letter);

    let report = tools.report().await.unwrap();
    assert_eq!(report.total, 1);
    assert_eq!(report.groups[0].event_type, "invoice.issued");
    assert_eq!(report.groups[0].error, "ledger offline");
    assert_eq!(report.groups[0].count, 1);

    // Fixed handler: reprocessing succeeds and empties the queue.
    fixed.store(true, Ordering::SeqCst);
    tools.reprocess(&letter.id).await.unwrap();
    wait_until(|| handled.load(Ordering::SeqCst) == 1).await;
    assert_eq!(tools.count().await.unwrap(), 0);
    assert!(matches!(
        tools.reprocess(&letter.id).await,
        Err(Error::NotFound { .. })
    ));
}

async fn wait_until_async<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    timeout(WAIT, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("condition not reached in time");
}

#[tokio::test]
async fn permanent_errors_dead_letter_at_once() {
    let bus = bus();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    bus.subscribe(
        "bad.#",
        Arc::new(move |_e: EventEnvelope| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::permanent("malformed")) }
        }),
    )
    .await
    .unwrap();
    bus.publish(event("bad.data", 1)).await.unwrap();
    let tools = bus.dead_letters();
    wait_until_async(|| async { tools.count().await.unwrap() == 1 }).await;
    let letter = tools
        .list(&DeadLetterQuery::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!((letter.attempts, letter.reason.as_str()), (1, "malformed"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_panicking_handler_is_retried_then_dead_lettered_and_the_bus_keeps_going() {
    let bus = bus().with_retry_policy(
        RetryPolicy::exponential(2, Duration::from_millis(1)).with_jitter(Jitter::None),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.subscribe(
        "risky.#",
        Arc::new(move |e: EventEnvelope| {
            let tx = tx.clone();
            async move {
                if n_of(&e) == 0 {
                    panic!("handler bug");
                }
                tx.send(e).ok();
                Ok::<_, HandlerError>(())
            }
        }),
    )
    .await
    .unwrap();
    bus.publish(event("risky.op", 0)).await.unwrap();
    bus.publish(event("risky.op", 1)).await.unwrap();
    assert_eq!(n_of(&recv(&mut rx).await), 1, "the bus survived the panic");
    let tools = bus.dead_letters();
    wait_until_async(|| async { tools.count().await.unwrap() == 1 }).await;
    let letter = tools
        .list(&DeadLetterQuery::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(letter.attempts, 2);
    assert!(letter.reason.contains("handler bug"), "{}", letter.reason);
}

#[tokio::test]
async fn filter_runs_before_transform_and_both_before_the_handler() {
    let bus = bus();
    let seen_by_filter = Arc::new(Mutex::new(Vec::new()));
    let s = seen_by_filter.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = SubscriptionConfig::new("order.#")
        .filter(move |e| {
            s.lock().unwrap().push(e.header("stage").map(str::to_owned));
            n_of(e).is_multiple_of(2)
        })
        .transform(|e| Ok(e.with_header("stage", "transformed")?));
    bus.subscribe_with(config, forward(tx)).await.unwrap();
    for i in 0..4 {
        bus.publish(event("order.placed", i)).await.unwrap();
    }
    for expected in [0, 2] {
        let e = recv(&mut rx).await;
        assert_eq!(n_of(&e), expected);
        assert_eq!(e.header("stage"), Some("transformed"));
    }
    nothing_more(&mut rx).await;
    // The filter saw every event, untransformed.
    assert_eq!(*seen_by_filter.lock().unwrap(), vec![None; 4]);
}

#[tokio::test]
async fn per_key_order_holds_under_concurrency() {
    let bus = bus();
    let log = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let (l, i, m) = (log.clone(), in_flight.clone(), max_in_flight.clone());
    bus.subscribe_with(
        SubscriptionConfig::new("acct.#")
            .concurrency(4)
            .ordered_by_key(),
        Arc::new(move |e: EventEnvelope| {
            let (l, i, m) = (l.clone(), i.clone(), m.clone());
            async move {
                let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                // Uneven handling times shuffle completion order across keys.
                tokio::time::sleep(Duration::from_micros(fastrand_like(n_of(&e)))).await;
                l.lock()
                    .unwrap()
                    .push((e.stream_id().unwrap().to_owned(), n_of(&e)));
                i.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        }),
    )
    .await
    .unwrap();
    for n in 0..50 {
        for key in ["a", "b", "c", "d"] {
            bus.publish(event("acct.moved", n).with_stream_id(key))
                .await
                .unwrap();
        }
    }
    wait_until(|| log.lock().unwrap().len() == 200).await;
    let log = log.lock().unwrap().clone();
    for key in ["a", "b", "c", "d"] {
        let ns: Vec<u64> = log
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(ns, (0..50).collect::<Vec<_>>(), "key {key} out of order");
    }
    assert!(max_in_flight.load(Ordering::SeqCst) > 1, "ran concurrently");
    assert!(
        max_in_flight.load(Ordering::SeqCst) <= 4,
        "respected the limit"
    );
}

fn fastrand_like(n: u64) -> u64 {
    (n * 7919) % 500
}

#[tokio::test]
async fn in_place_retries_keep_key_order_across_failures() {
    let bus = bus().with_retry_policy(
        RetryPolicy::exponential(5, Duration::from_millis(1)).with_jitter(Jitter::None),
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let failed_once = Arc::new(AtomicU32::new(0));
    let (l, f) = (log.clone(), failed_once.clone());
    bus.subscribe_with(
        SubscriptionConfig::new("k.#")
            .concurrency(2)
            .ordered_by_key(),
        Arc::new(move |e: EventEnvelope| {
            let (l, f) = (l.clone(), f.clone());
            async move {
                if n_of(&e) == 3 && f.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(HandlerError::retryable("first try of 3 fails"));
                }
                l.lock().unwrap().push(n_of(&e));
                Ok(())
            }
        }),
    )
    .await
    .unwrap();
    for n in 0..10 {
        bus.publish(event("k.v", n).with_stream_id("one-key"))
            .await
            .unwrap();
    }
    wait_until(|| log.lock().unwrap().len() == 10).await;
    assert_eq!(*log.lock().unwrap(), (0..10).collect::<Vec<_>>());
}

struct Trace(&'static str, Arc<Mutex<Vec<String>>>);

#[async_trait]
impl Middleware for Trace {
    async fn handle(
        &self,
        event: EventEnvelope,
        ctx: &DeliveryContext,
        next: Next<'_>,
    ) -> Result<(), HandlerError> {
        self.1.lock().unwrap().push(format!("{} in", self.0));
        let out = next.run(event, ctx).await;
        self.1.lock().unwrap().push(format!("{} out", self.0));
        out
    }
}

#[tokio::test]
async fn middleware_wraps_the_handler_in_order() {
    let bus = bus();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    bus.subscribe_with(
        SubscriptionConfig::new("m.#")
            .middleware(Trace("outer", log.clone()))
            .middleware(Trace("inner", log.clone())),
        Arc::new(move |_e: EventEnvelope| {
            let l = l.clone();
            async move {
                l.lock().unwrap().push("handler".to_owned());
                Ok::<_, HandlerError>(())
            }
        }),
    )
    .await
    .unwrap();
    bus.publish(event("m.x", 1)).await.unwrap();
    wait_until(|| log.lock().unwrap().len() == 5).await;
    assert_eq!(
        *log.lock().unwrap(),
        ["outer in", "inner in", "handler", "inner out", "outer out"]
    );
}

#[tokio::test]
async fn the_idempotent_consumer_skips_redelivered_ids() {
    let transport = Arc::new(InProcessTransport::new());
    let bus = EventBus::new(transport.clone());
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let sub = bus
        .subscribe_with(
            SubscriptionConfig::new("pay.#")
                .named("payments")
                .idempotent(100),
            Arc::new(move |_e: EventEnvelope| {
                h.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, HandlerError>(()) }
            }),
        )
        .await
        .unwrap();
    let e = event("pay.captured", 1);
    bus.publish(e.clone()).await.unwrap();
    wait_until(|| handled.load(Ordering::SeqCst) == 1).await;
    // The same event again (a redelivery, or a publisher retry): skipped.
    transport
        .redeliver(sub.name(), "pay.captured", e.clone())
        .await
        .unwrap();
    bus.publish(e).await.unwrap();
    bus.publish(event("pay.captured", 2)).await.unwrap();
    wait_until(|| handled.load(Ordering::SeqCst) == 2).await;
    settle_tasks().await;
    assert_eq!(handled.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn shutdown_drains_in_flight_handlers_within_the_deadline() {
    let transport = Arc::new(InProcessTransport::new());
    let bus = EventBus::new(transport.clone());
    let finished = Arc::new(AtomicU32::new(0));
    let started = Arc::new(AtomicU32::new(0));
    let (f, s) = (finished.clone(), started.clone());
    bus.subscribe_with(
        SubscriptionConfig::new("slow.#").concurrency(2),
        Arc::new(move |_e: EventEnvelope| {
            let (f, s) = (f.clone(), s.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        }),
    )
    .await
    .unwrap();
    bus.publish(event("slow.job", 1)).await.unwrap();
    bus.publish(event("slow.job", 2)).await.unwrap();
    wait_until(|| started.load(Ordering::SeqCst) == 2).await;
    let report = bus.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.subscriptions, 1);
    assert_eq!(
        finished.load(Ordering::SeqCst),
        2,
        "both finished before shutdown returned"
    );
    assert!(matches!(
        bus.publish(event("slow.job", 3)).await,
        Err(Error::Closed { .. })
    ));
}

/// Subscribes `name` to `pattern` with a handler that never finishes; the receiver gets
/// each event as its handling starts.
async fn subscribe_stuck(
    bus: &EventBus,
    pattern: &str,
    name: &str,
) -> mpsc::UnboundedReceiver<EventEnvelope> {
    let (started_tx, started_rx) = mpsc::unbounded_channel();
    bus.subscribe_with(
        SubscriptionConfig::new(pattern).named(name),
        Arc::new(move |e: EventEnvelope| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send(e).ok();
                std::future::pending::<()>().await;
                Ok::<_, HandlerError>(())
            }
        }),
    )
    .await
    .unwrap();
    started_rx
}

#[tokio::test]
async fn shutdown_reports_what_missed_the_deadline_and_it_is_redelivered() {
    let transport = Arc::new(InProcessTransport::new());
    let bus = EventBus::new(transport.clone());
    let mut started_rx = subscribe_stuck(&bus, "stuck.#", "stuck-workers").await;
    let stuck = event("stuck.job", 1);
    bus.publish(stuck.clone()).await.unwrap();
    recv(&mut started_rx).await;
    let report = bus.shutdown(Duration::from_millis(50)).await;
    assert_eq!(report.unfinished.len(), 1);
    assert_eq!(report.unfinished[0].event_id, *stuck.id());
    assert_eq!(report.unfinished[0].subscription, "stuck-workers");

    // Nothing lost: the unfinished delivery went back to its group's queue.
    let mut again = transport
        .subscribe(orchestrator_core::SubscribeOptions::new("stuck-workers", "stuck.#").unwrap())
        .await
        .unwrap();
    let d = timeout(WAIT, again.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(d.event().id(), stuck.id());
    assert_eq!(d.attempt(), 2);
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let bus = bus();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = bus.subscribe("u.#", forward(tx)).await.unwrap();
    bus.publish(event("u.a", 1)).await.unwrap();
    recv(&mut rx).await;
    sub.unsubscribe().await;
    bus.publish(event("u.a", 2)).await.unwrap();
    nothing_more(&mut rx).await;
}

/// What a handler saw of its delivery context: before and after an await, and from a task
/// it spawned.
type Seen = (Option<String>, Option<String>, bool);

#[tokio::test]
async fn the_delivery_context_is_current_on_every_poll_of_the_handler_and_only_there() {
    let bus = EventBus::new(Arc::new(InProcessTransport::new()));
    let (tx, mut rx) = mpsc::channel::<Seen>(4);
    let handler: Arc<dyn EventHandler> = Arc::new(move |_e: EventEnvelope| {
        let tx = tx.clone();
        async move {
            let name = || DeliveryContext::current().map(|c| c.subscription.to_string());
            let before = name();
            // Suspends the handler: the next poll must set the context again.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let after = name();
            let spawned = tokio::spawn(async { DeliveryContext::current().is_some() })
                .await
                .unwrap();
            tx.send((before, after, spawned)).await.unwrap();
            Ok::<_, HandlerError>(())
        }
    });
    bus.subscribe_with(
        SubscriptionConfig::new("ctx.*").named("ctx-reader"),
        handler,
    )
    .await
    .unwrap();
    for _ in 0..2 {
        bus.publish(EventEnvelope::new("ctx.checked", &json!({})).unwrap())
            .await
            .unwrap();
        let (before, after, spawned) = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        assert_eq!(before.as_deref(), Some("ctx-reader"));
        assert_eq!(
            after.as_deref(),
            Some("ctx-reader"),
            "set again after an await"
        );
        assert!(
            !spawned,
            "a task the handler spawns has no delivery context"
        );
    }
    assert!(
        DeliveryContext::current().is_none(),
        "no context outside a handler"
    );
}

#[tokio::test]
async fn shutdown_hands_back_a_held_batch_in_order_and_reports_it() {
    let transport = Arc::new(InProcessTransport::new());
    let bus = EventBus::new(transport.clone());
    let mut started_rx = subscribe_stuck(&bus, "held.#", "held-batch").await;
    let events: Vec<EventEnvelope> = (0..5).map(|n| event("held.job", n)).collect();
    // One publish of the whole batch: the consumer wakes to a queue holding all five.
    transport
        .publish_batch("held.job", events.clone())
        .await
        .unwrap();
    let first = recv(&mut started_rx).await;
    assert_eq!(first.id(), events[0].id(), "the first is handled first");
    let report = bus.shutdown(Duration::from_millis(50)).await;
    let reported: Vec<&EventId> = report.unfinished.iter().map(|u| &u.event_id).collect();
    let expected: Vec<&EventId> = events.iter().map(EventEnvelope::id).collect();
    assert_eq!(
        reported, expected,
        "the one in flight, then the rest of its batch"
    );
    assert!(
        report
            .unfinished
            .iter()
            .all(|u| u.subscription == "held-batch")
    );

    // Nothing lost, order kept: all five come back, each as its second attempt.
    let mut again = transport
        .subscribe(orchestrator_core::SubscribeOptions::new("held-batch", "held.#").unwrap())
        .await
        .unwrap();
    for expected in &events {
        let d = timeout(WAIT, again.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(d.event().id(), expected.id());
        assert_eq!(d.attempt(), 2);
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn a_handler_that_suspends_then_fails_is_retried_with_its_history() {
    // Each call first waits (its first poll returns `Pending`), then fails the first two
    // times: the bus must finish the suspended call, then retry it, as for any other.
    let bus = EventBus::new(Arc::new(InProcessTransport::new()));
    let calls: Calls = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    bus.subscribe_with(
        SubscriptionConfig::new("slow.#")
            .retry(RetryPolicy::exponential(5, Duration::from_millis(1)).with_jitter(Jitter::None))
            .retry_mode(RetryMode::InPlace),
        Arc::new(move |_e: EventEnvelope| {
            let (count, seen) = (count.clone(), seen.clone());
            async move {
                tokio::task::yield_now().await;
                let ctx = DeliveryContext::current().expect("a context after the suspension");
                seen.lock()
                    .unwrap()
                    .push((ctx.attempt, ctx.last_error.clone()));
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= 2 {
                    return Err(HandlerError::retryable(format!("slow boom {n}")));
                }
                Ok(())
            }
        }),
    )
    .await
    .unwrap();
    bus.publish(event("slow.job", 1)).await.unwrap();
    wait_until(|| calls.lock().unwrap().len() == 3).await;
    settle_tasks().await;
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            (1, None),
            (2, Some("slow boom 1".into())),
            (3, Some("slow boom 2".into())),
        ]
    );
    assert!(bus.shutdown(Duration::from_secs(5)).await.is_clean());
}
