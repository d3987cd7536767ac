//! Behaviour of the in-process transport beyond the conformance suite: backpressure,
//! closing, group lifetime and re-queueing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use orchestrator_bus::{InMemoryDeadLetterQueue, InProcessTransport};
use orchestrator_core::{
    DeadLetterQuery, DeadLetterQueue, Delivery, DeliveryStream, Error, EventEnvelope,
    SubscribeOptions, Transport,
};
use serde_json::json;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn event(topic: &str, seq: u64) -> EventEnvelope {
    EventEnvelope::new(topic, &json!({ "seq": seq })).unwrap()
}

fn seq(delivery: &Delivery) -> u64 {
    let data: serde_json::Value = delivery.event().data().unwrap();
    data["seq"].as_u64().unwrap()
}

async fn subscribe(t: &InProcessTransport, group: &str, pattern: &str) -> Box<dyn DeliveryStream> {
    t.subscribe(SubscribeOptions::new(group, pattern).unwrap())
        .await
        .unwrap()
}

async fn next(stream: &mut Box<dyn DeliveryStream>) -> Delivery {
    timeout(WAIT, stream.next())
        .await
        .expect("a delivery in time")
        .unwrap()
        .expect("an open subscription")
}

async fn nothing_within(stream: &mut Box<dyn DeliveryStream>, window: Duration) {
    if let Ok(got) = timeout(window, stream.next()).await {
        panic!("expected nothing, got {got:?}");
    }
}

#[tokio::test]
async fn a_full_queue_makes_publish_wait_until_a_consumer_reads() {
    let t = InProcessTransport::with_capacity(4);
    let mut slow = subscribe(&t, "slow", "job.run").await;
    for i in 0..4 {
        timeout(WAIT, t.publish("job.run", event("job.run", i)))
            .await
            .expect("room in the queue")
            .unwrap();
    }
    assert_eq!(t.queued("slow"), Some(4));

    let mut fifth = t.publish("job.run", event("job.run", 4));
    assert!(
        timeout(Duration::from_millis(200), &mut fifth)
            .await
            .is_err(),
        "the fifth publish must wait while the queue is full"
    );
    // Publishers wake once consumers took half the capacity (at most 64 events), not at
    // every event taken.
    let first = next(&mut slow).await;
    assert_eq!(seq(&first), 0);
    first.ack().await.unwrap();
    assert!(
        timeout(Duration::from_millis(100), &mut fifth)
            .await
            .is_err(),
        "one event taken of four: the publish still waits"
    );
    let second = next(&mut slow).await;
    assert_eq!(seq(&second), 1);
    second.ack().await.unwrap();
    timeout(WAIT, fifth)
        .await
        .expect("the publish completes once consumers took half the queue")
        .unwrap();

    for want in 2..5 {
        let d = next(&mut slow).await;
        assert_eq!(seq(&d), want);
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn close_ends_subscriptions_and_rejects_later_calls() {
    let t = InProcessTransport::new();
    let mut idle = subscribe(&t, "g", "a.*").await;
    let waiting = tokio::spawn(async move { idle.next().await.map(|d| d.is_none()) });
    tokio::task::yield_now().await;

    t.close();
    assert!(t.is_closed());
    assert!(timeout(WAIT, waiting).await.unwrap().unwrap().unwrap());
    assert!(matches!(
        t.publish("a.b", event("a.b", 0)).await,
        Err(Error::Closed { .. })
    ));
    assert!(matches!(
        t.subscribe(SubscribeOptions::new("g", "a.*").unwrap())
            .await,
        Err(Error::Closed { .. })
    ));
    assert!(matches!(
        t.redeliver("g", "a.b", event("a.b", 0)).await,
        Err(Error::Closed { .. })
    ));
    t.close(); // twice is harmless
}

#[tokio::test]
async fn close_fails_a_publisher_waiting_on_a_full_queue() {
    let t = InProcessTransport::with_capacity(1);
    let mut sub = subscribe(&t, "g", "a.b").await;
    t.publish("a.b", event("a.b", 0)).await.unwrap();
    let publisher = {
        let t = t.clone();
        tokio::spawn(async move { t.publish("a.b", event("a.b", 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!publisher.is_finished());
    t.close();
    let result = timeout(WAIT, publisher).await.unwrap().unwrap();
    assert!(matches!(result, Err(Error::Closed { .. })), "{result:?}");
    assert!(sub.next().await.unwrap().is_none());
}

#[tokio::test]
async fn dropping_the_last_clone_closes_the_transport() {
    let t = InProcessTransport::new();
    let mut sub = subscribe(&t, "g", "a.b").await;
    let other = t.clone();
    drop(t);
    other.publish("a.b", event("a.b", 0)).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    drop(other);
    assert!(timeout(WAIT, sub.next()).await.unwrap().unwrap().is_none());
}

#[tokio::test]
async fn a_group_without_consumers_keeps_its_queue_but_leaves_routing() {
    let t = InProcessTransport::new();
    let sub = subscribe(&t, "g", "a.b").await;
    t.publish("a.b", event("a.b", 0)).await.unwrap();
    drop(sub);

    // No consumer: not routed any more, but the queued event stays.
    t.publish("a.b", event("a.b", 1)).await.unwrap();
    assert_eq!(t.queued("g"), Some(1));
    // `redeliver` still reaches the group.
    t.redeliver("g", "a.b", event("a.b", 2)).await.unwrap();
    assert_eq!(t.queued("g"), Some(2));

    let mut again = subscribe(&t, "g", "a.b").await;
    for want in [0, 2] {
        let d = next(&mut again).await;
        assert_eq!(seq(&d), want);
        d.ack().await.unwrap();
    }
    nothing_within(&mut again, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_group_routes_the_union_of_its_subscriptions_patterns() {
    let t = InProcessTransport::new();
    let mut orders = subscribe(&t, "g", "order.*").await;
    let users = subscribe(&t, "g", "user.*").await;
    t.publish("order.placed", event("order.placed", 0))
        .await
        .unwrap();
    t.publish("user.created", event("user.created", 1))
        .await
        .unwrap();
    assert_eq!(t.queued("g"), Some(2));

    // Each consumer of the group takes from the one queue, whatever its own pattern.
    for want in [0, 1] {
        let d = next(&mut orders).await;
        assert_eq!(seq(&d), want);
        d.ack().await.unwrap();
    }
    drop(users);
    t.publish("user.created", event("user.created", 2))
        .await
        .unwrap();
    assert_eq!(t.queued("g"), Some(0), "user.* left with its subscription");
}

#[tokio::test]
async fn redeliver_to_an_unknown_group_is_not_found() {
    let t = InProcessTransport::new();
    let result = t.redeliver("nobody", "a.b", event("a.b", 0)).await;
    assert!(matches!(result, Err(Error::NotFound { .. })), "{result:?}");
    assert_eq!(t.queued("nobody"), None);
}

#[tokio::test]
async fn a_delivery_dropped_while_the_queue_is_full_comes_back() {
    let t = InProcessTransport::with_capacity(1);
    let mut sub = subscribe(&t, "g", "a.b").await;
    t.publish("a.b", event("a.b", 0)).await.unwrap();
    let first = next(&mut sub).await;
    t.publish("a.b", event("a.b", 1)).await.unwrap(); // fills the queue
    drop(first); // no room: re-queued by a task once there is

    let second = next(&mut sub).await;
    assert_eq!((seq(&second), second.attempt()), (1, 1));
    second.ack().await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!((seq(&again), again.attempt()), (0, 2));
    again.ack().await.unwrap();
    nothing_within(&mut sub, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_nack_without_delay_redelivers_at_once() {
    let t = InProcessTransport::new();
    let mut sub = subscribe(&t, "g", "a.b").await;
    t.publish("a.b", event("a.b", 0)).await.unwrap();
    let first = next(&mut sub).await;
    let first_attempt_at = first.first_attempt_at();
    first.nack(Duration::ZERO, "busy").await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!(again.attempt(), 2);
    assert_eq!(again.last_error(), Some("busy"));
    assert_eq!(again.first_attempt_at(), first_attempt_at);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn dead_letters_go_to_the_given_queue() {
    let dlq = InMemoryDeadLetterQueue::new();
    let t = InProcessTransport::builder()
        .capacity(8)
        .dead_letter_queue(Arc::new(dlq.clone()))
        .build();
    assert_eq!(t.capacity(), 8);
    let mut sub = subscribe(&t, "g", "a.b").await;
    t.publish("a.b", event("a.b", 0)).await.unwrap();
    next(&mut sub).await.dead_letter("bad data").await.unwrap();

    let letters = dlq.list(&DeadLetterQuery::default()).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "bad data");
    assert_eq!(letters[0].subscription, "g");
    assert_eq!(t.dead_letter_queue().len().await.unwrap(), 1);
}

#[tokio::test]
async fn works_behind_arc_dyn_transport() {
    let t: Arc<dyn Transport> = Arc::new(InProcessTransport::with_capacity(0));
    assert_eq!(t.name(), "in-process");
    let mut sub = t
        .subscribe(SubscribeOptions::new("g", "#").unwrap())
        .await
        .unwrap();
    t.publish("x.y.z", event("x.y.z", 7)).await.unwrap();
    let d = timeout(WAIT, sub.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((d.topic(), seq(&d)), ("x.y.z", 7));
    d.ack().await.unwrap();
}

#[tokio::test]
async fn next_batch_hands_out_at_most_the_prefetch_and_drops_go_back() {
    let t = InProcessTransport::new();
    let mut sub = t
        .subscribe(
            SubscribeOptions::new("batched", "job.run")
                .unwrap()
                .prefetch(3),
        )
        .await
        .unwrap();
    for i in 0..10 {
        t.publish("job.run", event("job.run", i)).await.unwrap();
    }
    let mut batch = Vec::new();
    assert!(sub.next_batch(64, &mut batch).await.unwrap());
    assert_eq!(batch.iter().map(seq).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(t.queued("batched"), Some(7));

    // Dropped unsettled, a batch goes back to the queue as the next attempt.
    batch.clear();
    assert_eq!(t.queued("batched"), Some(10));
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let mut batch = Vec::new();
        assert!(sub.next_batch(64, &mut batch).await.unwrap());
        assert!(batch.len() <= 3);
        for d in batch {
            seen.push((seq(&d), d.attempt()));
            d.ack().await.unwrap();
        }
    }
    seen.sort_unstable();
    let want: Vec<(u64, u32)> = (0..10).map(|i| (i, if i < 3 { 2 } else { 1 })).collect();
    assert_eq!(seen, want);
    assert_eq!(t.queued("batched"), Some(0));
}

/// What the outbox relay relies on before it checkpoints: idle means every published event
/// was settled — not queued, not handed out unacknowledged, not waiting out a retry delay.
#[tokio::test]
async fn idle_only_once_every_published_event_is_settled() {
    let transport = InProcessTransport::new();
    assert!(transport.is_idle(), "nothing published yet");
    let mut orders = subscribe(&transport, "orders", "order.*").await;
    transport
        .publish("order.placed", event("order.placed", 1))
        .await
        .unwrap();
    assert!(!transport.is_idle(), "queued");

    let delivery = next(&mut orders).await;
    assert!(!transport.is_idle(), "handed out, not acknowledged");
    delivery.ack().await.unwrap();
    assert!(transport.is_idle(), "acknowledged");

    transport
        .publish("order.placed", event("order.placed", 1))
        .await
        .unwrap();
    let delivery = next(&mut orders).await;
    delivery
        .nack(Duration::from_millis(100), "try again")
        .await
        .unwrap();
    assert!(!transport.is_idle(), "a retry waiting out its delay");
    let retry = next(&mut orders).await;
    assert_eq!(retry.attempt(), 2);
    assert!(!transport.is_idle(), "the retry is handed out");
    drop(retry);
    assert!(!transport.is_idle(), "dropped unsettled: queued again");
    let again = next(&mut orders).await;
    again.dead_letter("gave up").await.unwrap();
    assert!(transport.is_idle(), "dead-lettered");
    assert_eq!(transport.dead_letter_queue().len().await.unwrap(), 1);
}

/// An event over the configured maximum size is refused with `TooLarge` — alone or in a
/// batch, which then sends nothing — by the transport and by the bus's direct path to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_events_are_refused() {
    use orchestrator_core::MaxEventSize;
    let limit = MaxEventSize::new(1024).unwrap();
    let transport = InProcessTransport::builder().max_event_size(limit).build();
    orchestrator_core::testkit::transport::oversize_events_are_refused(&transport, limit).await;

    let bus = orchestrator_bus::EventBus::new(Arc::new(transport.clone()));
    let mut sub = subscribe(&transport, "g", "doc.saved").await;
    let big = EventEnvelope::new("doc.saved", &"x".repeat(1024)).unwrap();
    let refused = bus
        .publish_batch(vec![event("doc.saved", 1), big.clone()])
        .await;
    assert!(
        matches!(refused, Err(Error::TooLarge { limit: 1024, .. })),
        "{refused:?}"
    );
    let refused = bus.publish(big).await;
    assert!(
        matches!(refused, Err(Error::TooLarge { limit: 1024, .. })),
        "{refused:?}"
    );
    bus.publish(event("doc.saved", 2)).await.unwrap();
    assert_eq!(
        seq(&next(&mut sub).await),
        2,
        "the refused batch sent nothing"
    );
}
