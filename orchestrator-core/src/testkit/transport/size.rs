//! The [maximum event size](crate::MaxEventSize) on a transport: refused before publishing,
//! and dead-lettered undecoded when received.

use super::*;
use crate::MaxEventSize;

/// An event whose encoding is over `limit`: a JSON string payload of `limit` bytes.
fn oversize(topic: &str, limit: MaxEventSize) -> EventEnvelope {
    EventEnvelope::new(topic, &"x".repeat(limit.bytes())).unwrap()
}

fn assert_too_large(cx: &Cx, what: &str, result: crate::Result<()>, limit: MaxEventSize) {
    match result {
        Err(Error::TooLarge { size, limit: l }) if l == limit.bytes() && size > l => {}
        other => panic!("{cx}: {what} must be Error::TooLarge with limit {limit}, got {other:?}"),
    }
}

/// A transport configured with `limit` refuses an event over it with
/// [`Error::TooLarge`] — alone, or in a batch, which is then refused whole — and publishes
/// nothing of it: the subscriber's next delivery is the event published after.
pub async fn oversize_events_are_refused<T: Transport + ?Sized>(
    transport: &T,
    limit: MaxEventSize,
) {
    let cx = Cx::new(transport, "oversize_events_are_refused");
    let topic = topic("doc.saved");
    let mut sub = subscribe(&cx, transport, &group(), &[&topic]).await;
    let big = oversize(&topic, limit);
    let refused = call_raw(
        &cx,
        "publish_batch",
        transport.publish_batch(&topic, vec![event(&topic, 1), big.clone()]),
    )
    .await;
    assert_too_large(&cx, "a batch with an oversize event", refused, limit);
    let refused = call_raw(&cx, "publish", transport.publish(&topic, big)).await;
    assert_too_large(&cx, "an oversize event", refused, limit);
    let after = event(&topic, 2);
    publish(&cx, transport, &topic, after.clone()).await;
    let delivery = recv(&cx, &mut sub, "the event published after the refused ones").await;
    assert_same_event(
        &cx,
        "the first delivery (the refused batch must send nothing)",
        delivery.event(),
        &after,
    );
    ack(&cx, delivery).await;
    expect_quiet(&cx, &mut sub, "after the only accepted event").await;
}

/// A message over the subscriber's `limit`, published by `publisher` (configured with a
/// larger one, as another process might be), is not delivered: the subscriber parks it in
/// its dead-letter queue with a reason naming the limit, and goes on delivering.
pub async fn received_oversize_events_are_dead_lettered<P, S>(
    publisher: &P,
    subscriber: &S,
    limit: MaxEventSize,
) where
    P: Transport + ?Sized,
    S: Transport + ?Sized,
{
    let cx = Cx::new(subscriber, "received_oversize_events_are_dead_lettered");
    let topic = topic("doc.saved");
    let group = group();
    let mut sub = subscribe(&cx, subscriber, &group, &[&topic]).await;
    publish(&cx, publisher, &topic, oversize(&topic, limit)).await;
    let after = event(&topic, 2);
    publish(&cx, publisher, &topic, after.clone()).await;
    let delivery = recv(&cx, &mut sub, "the event after the oversize one").await;
    assert_same_event(&cx, "the first delivery", delivery.event(), &after);
    ack(&cx, delivery).await;
    let dlq = subscriber.dead_letter_queue();
    let query = DeadLetterQuery {
        subscription: Some(group.clone()),
        ..DeadLetterQuery::default()
    };
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    let letter = loop {
        let letters = call(&cx, "dlq.list", dlq.list(&query)).await;
        if let Some(letter) = letters.into_iter().next() {
            break letter;
        }
        assert!(
            Instant::now() < deadline,
            "{cx}: no dead letter for group {group} within {RECEIVE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        letter.reason.contains("maximum event size"),
        "{cx}: the dead letter's reason names the limit: {}",
        letter.reason
    );
    call(&cx, "dlq.remove", dlq.remove(&letter.id)).await;
    expect_quiet(
        &cx,
        &mut sub,
        "after the oversize message was dead-lettered",
    )
    .await;
}
