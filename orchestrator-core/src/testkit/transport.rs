//! The [`Transport`] conformance suite: the behaviour every transport must show, so that the
//! bus, sagas and CQRS behave the same in process and on every broker.
//!
//! An implementation runs the whole suite from one of its tests:
//!
//! ```no_run
//! # async fn example<T: orchestrator_core::Transport>(make_my_transport: fn() -> T) {
//! orchestrator_core::testkit::transport::run_all(|| async move { make_my_transport() }).await;
//! # }
//! ```
//!
//! [`run_all`] makes a fresh transport for each case and runs the cases one after another;
//! each case is also public, to run (or debug) alone. A failing case panics with a message
//! naming the transport, the case and what went wrong.
//!
//! # What the suite assumes
//!
//! - Every case uses its own randomly named topics (`t<uuid>.order.placed`) and consumer
//!   groups, so brokers can run the suite against shared servers, even concurrently. Each
//!   event's type is the topic it is published to.
//! - A group subscribes before anything is published to it: once
//!   [`Transport::subscribe`] has returned, the group receives every event published
//!   afterwards.
//! - A transport may make publishers wait while consumers are behind (bounded queues):
//!   the suite receives while it publishes, never publishing many events up front.
//! - Every wait is bounded ([`RECEIVE_TIMEOUT`]), so a broken transport fails with a message
//!   instead of hanging. Checks that something does *not* arrive wait [`QUIET_PERIOD`].
//! - [`DeliveryStream::next`] is cancel-safe: the suite drops a pending `next()` when a wait
//!   times out or when it stops listening at the end of a case.
//! - The [`DeadLetterQueue`](crate::DeadLetterQueue) of the transport has no other writer
//!   while a case runs (the dead-letter case checks that `len` changes by exactly one).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Notify;
use tokio::time::timeout;

use crate::dlq::{DeadLetter, DeadLetterQuery};
use crate::envelope::{EventEnvelope, EventId};
use crate::error::Error;
use crate::pattern::TopicPattern;
use crate::transport::{Delivery, DeliveryStream, SubscribeOptions, Transport};

mod size;
pub use size::{oversize_events_are_refused, received_oversize_events_are_dead_lettered};

/// How long the suite waits for an event or a batch of events (brokers can be slow).
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the suite listens to check that nothing more arrives.
pub const QUIET_PERIOD: Duration = Duration::from_secs(1);

/// How long a single publish, subscribe or dead-letter-queue call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs every case, each against a fresh transport from `make`.
pub async fn run_all<T, F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Transport,
{
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            let transport = make().await;
            eprintln!(
                "transport conformance: `{}` / `{}`",
                transport.name(),
                stringify!($case)
            );
            $case(&transport).await;
            drop(transport);
        )*};
    }
    cases!(
        publish_subscribe_delivers_intact,
        publish_without_subscribers_succeeds,
        pattern_routing,
        competing_consumers_share_a_group,
        every_group_gets_every_event,
        nack_redelivers_after_delay,
        dead_letter_parks_the_event,
        dead_letter_queue_queries,
        redeliver_targets_one_group,
        order_is_kept_per_key,
        unsettled_delivery_is_redelivered,
        publish_batch_delivers_in_order,
        next_batch_takes_what_is_ready,
        invalid_input_is_rejected,
    );
}

/// A subscribed group receives a published event with its payload, id, type, headers and
/// correlation id intact, as attempt 1, with the right topic and group.
pub async fn publish_subscribe_delivers_intact<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "publish_subscribe_delivers_intact");
    let topic = topic("order.placed");
    let group = group();
    let mut sub = subscribe(&cx, transport, &group, &[&topic]).await;

    let event = EventEnvelope::new(&topic, &json!({"order_id": "o-1", "amount_cents": 1299}))
        .unwrap()
        .with_source("urn:conformance")
        .with_correlation_id("corr-1")
        .with_causation_id("cause-1")
        .with_subject("o-1")
        .with_stream_id("order-o-1")
        .with_header("tenant", "acme")
        .unwrap()
        .with_header("region", "eu1")
        .unwrap();
    publish(&cx, transport, &topic, event.clone()).await;

    let delivery = recv(&cx, &mut sub, "the published event").await;
    assert_same_event(&cx, "the delivered event", delivery.event(), &event);
    assert_eq!(delivery.attempt(), 1, "{cx}: first delivery's attempt");
    assert_eq!(delivery.topic(), topic, "{cx}: delivery's topic");
    assert_eq!(delivery.group(), group, "{cx}: delivery's group");
    assert_eq!(
        delivery.last_error(),
        None,
        "{cx}: first delivery's last_error"
    );
    assert!(
        delivery.first_attempt_at() <= chrono::Utc::now() + chrono::Duration::seconds(1),
        "{cx}: first_attempt_at {} lies in the future",
        delivery.first_attempt_at()
    );
    ack(&cx, delivery).await;
    expect_quiet(&cx, &mut sub, "after the only event was acked").await;
}

/// Publishing to a topic no group subscribes to succeeds (there is nothing to deliver).
pub async fn publish_without_subscribers_succeeds<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "publish_without_subscribers_succeeds");
    let topic = topic("nobody.listens");
    publish(&cx, transport, &topic, event(&topic, 0)).await;
}

/// `x.*` gets `x.a` but not `x.a.b`; `x.#` gets both; an exact pattern gets only its topic;
/// a group with two patterns gets the topics of both.
pub async fn pattern_routing<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "pattern_routing");
    let base = format!("t{}", suffix());
    let prefix = format!("{base}.x");
    let (xa, xab, yb) = (
        format!("{prefix}.a"),
        format!("{prefix}.a.b"),
        format!("{base}.y.b"),
    );
    let (one, any, exact, two) = (group(), group(), group(), group());
    let mut s_one = subscribe(&cx, transport, &one, &[&format!("{prefix}.*")]).await;
    let mut s_any = subscribe(&cx, transport, &any, &[&format!("{prefix}.#")]).await;
    let mut s_exact = subscribe(&cx, transport, &exact, &[&xa]).await;
    let mut s_two = subscribe(&cx, transport, &two, &[&xa, &yb]).await;

    let publish_all = async {
        for t in [&xab, &yb, &xa] {
            publish(&cx, transport, t, event(t, 0)).await;
        }
    };
    let ((), got_one, got_any, got_exact, got_two) = tokio::join!(
        publish_all,
        receive_and_ack(&cx, &mut s_one, 1, "the `x.*` group's event"),
        receive_and_ack(&cx, &mut s_any, 2, "the `x.#` group's events"),
        receive_and_ack(&cx, &mut s_exact, 1, "the exact group's event"),
        receive_and_ack(&cx, &mut s_two, 2, "the two-pattern group's events"),
    );
    for (what, got, want) in [
        ("`x.*`", got_one, vec![&xa]),
        ("`x.#`", got_any, vec![&xa, &xab]),
        ("exact `x.a`", got_exact, vec![&xa]),
        ("`x.a` + `y.b`", got_two, vec![&xa, &yb]),
    ] {
        let topics: HashSet<&str> = got.iter().map(|d| d.topic.as_str()).collect();
        let want: HashSet<&str> = want.into_iter().map(String::as_str).collect();
        assert_eq!(topics, want, "{cx}: topics received by the {what} group");
        for d in &got {
            assert_eq!(
                d.event.event_type(),
                d.topic,
                "{cx}: the {what} group got an event under another topic than it was published to"
            );
        }
    }
    quiet_all(&cx, [&mut s_one, &mut s_any, &mut s_exact, &mut s_two]).await;
}

/// Two consumers of one group share 200 events: each gets some, together they get every
/// event exactly once.
pub async fn competing_consumers_share_a_group<T: Transport + ?Sized>(transport: &T) {
    const N: usize = 200;
    let cx = Cx::new(transport, "competing_consumers_share_a_group");
    let topic = topic("work.item");
    let group = group();
    let mut first = subscribe_with(&cx, transport, &group, &[&topic], 10).await;
    let mut second = subscribe_with(&cx, transport, &group, &[&topic], 10).await;

    let events: Vec<EventEnvelope> = (0..N).map(|i| event(&topic, i)).collect();
    let all: HashSet<EventId> = events.iter().map(|e| e.id().clone()).collect();
    let total = AtomicUsize::new(0);
    let done = Notify::new();
    let work = async {
        tokio::join!(
            publish_each(&cx, transport, &topic, events),
            consume_shared(&cx, &mut first, &total, &done, N),
            consume_shared(&cx, &mut second, &total, &done, N),
        )
    };
    let Ok(((), a, b)) = timeout(RECEIVE_TIMEOUT, work).await else {
        panic!(
            "{cx}: only {} of {N} events reached the two consumers within {RECEIVE_TIMEOUT:?}",
            total.load(Ordering::SeqCst)
        );
    };

    assert!(
        !a.is_empty() && !b.is_empty(),
        "{cx}: consumers of one group must share the work, but one got {} events and the \
         other {} (both were consuming concurrently)",
        a.len(),
        b.len()
    );
    let mut union = HashSet::new();
    for id in a.iter().chain(&b) {
        assert!(union.insert(id.clone()), "{cx}: event {id} delivered twice");
    }
    assert_eq!(union, all, "{cx}: the group must receive every event");
    quiet_all(&cx, [&mut first, &mut second]).await;
}

/// Two groups subscribed to one topic each get every one of 100 events.
pub async fn every_group_gets_every_event<T: Transport + ?Sized>(transport: &T) {
    const N: usize = 100;
    let cx = Cx::new(transport, "every_group_gets_every_event");
    let topic = topic("fan.out");
    let (g1, g2) = (group(), group());
    let mut s1 = subscribe(&cx, transport, &g1, &[&topic]).await;
    let mut s2 = subscribe(&cx, transport, &g2, &[&topic]).await;

    let events: Vec<EventEnvelope> = (0..N).map(|i| event(&topic, i)).collect();
    let all: HashSet<EventId> = events.iter().map(|e| e.id().clone()).collect();
    let ((), got1, got2) = tokio::join!(
        publish_each(&cx, transport, &topic, events),
        receive_and_ack(&cx, &mut s1, N, "the first group's events"),
        receive_and_ack(&cx, &mut s2, N, "the second group's events"),
    );
    for (group, got) in [(&g1, got1), (&g2, got2)] {
        let ids: HashSet<EventId> = got.iter().map(|d| d.event.id().clone()).collect();
        assert_eq!(ids.len(), N, "{cx}: group {group} got duplicates");
        assert_eq!(ids, all, "{cx}: group {group} must get every event");
        assert!(got.iter().all(|d| d.group == *group), "{cx}: wrong group");
    }
    quiet_all(&cx, [&mut s1, &mut s2]).await;
}

/// A nack with 300 ms redelivers not before then, as attempt 2 with the nack's reason as
/// `last_error`; after an ack nothing more arrives.
pub async fn nack_redelivers_after_delay<T: Transport + ?Sized>(transport: &T) {
    const DELAY: Duration = Duration::from_millis(300);
    const SLACK: Duration = Duration::from_millis(50);
    let cx = Cx::new(transport, "nack_redelivers_after_delay");
    let topic = topic("payment.requested");
    let group = group();
    let mut sub = subscribe(&cx, transport, &group, &[&topic]).await;
    let event = event(&topic, 7);
    publish(&cx, transport, &topic, event.clone()).await;

    let first = recv(&cx, &mut sub, "the first delivery").await;
    assert_eq!(first.attempt(), 1, "{cx}: first delivery's attempt");
    let first_attempt_at = first.first_attempt_at();
    let nacked_at = Instant::now();
    call(&cx, "nack", first.nack(DELAY, "card declined")).await;

    let again = recv(&cx, &mut sub, "the redelivery after the nack").await;
    let waited = nacked_at.elapsed();
    assert!(
        waited + SLACK >= DELAY,
        "{cx}: nacked with a {DELAY:?} delay, redelivered after only {waited:?}"
    );
    assert_same_event(&cx, "the redelivered event", again.event(), &event);
    assert_eq!(again.attempt(), 2, "{cx}: redelivery's attempt");
    assert_eq!(
        again.last_error(),
        Some("card declined"),
        "{cx}: redelivery's last_error must be the nack's reason"
    );
    assert_eq!(again.topic(), topic, "{cx}: redelivery's topic");
    assert_eq!(again.group(), group, "{cx}: redelivery's group");
    let drift = (again.first_attempt_at() - first_attempt_at).abs();
    assert!(
        drift <= chrono::Duration::seconds(1),
        "{cx}: first_attempt_at changed on redelivery ({first_attempt_at} → {})",
        again.first_attempt_at()
    );
    ack(&cx, again).await;
    expect_quiet(&cx, &mut sub, "after the redelivery was acked").await;
}

/// After two nacks, `dead_letter` parks the event: the letter holds the reason, 3 attempts,
/// topic, subscription, failure times and the event; it is not redelivered; `get`, `remove`
/// and `len` agree. `dead_letter` returns once the letter is parked.
pub async fn dead_letter_parks_the_event<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "dead_letter_parks_the_event");
    let dlq = transport.dead_letter_queue();
    let topic = topic("invoice.issued");
    let group = group();
    let mut sub = subscribe(&cx, transport, &group, &[&topic]).await;
    let len_before = call(&cx, "dlq.len", dlq.len()).await;
    let event = event(&topic, 3)
        .with_correlation_id("corr-dl")
        .with_header("tenant", "acme")
        .unwrap();
    publish(&cx, transport, &topic, event.clone()).await;

    for attempt in 1..=2 {
        let d = recv(&cx, &mut sub, &format!("delivery attempt {attempt}")).await;
        assert_eq!(d.attempt(), attempt, "{cx}: attempt number");
        let reason = format!("failure {attempt}");
        call(&cx, "nack", d.nack(Duration::from_millis(20), reason)).await;
    }
    let last = recv(&cx, &mut sub, "delivery attempt 3").await;
    assert_eq!(last.attempt(), 3, "{cx}: attempt number");
    assert_eq!(last.last_error(), Some("failure 2"), "{cx}: last_error");
    let before_dead_letter = chrono::Utc::now();
    call(&cx, "dead_letter", last.dead_letter("gave up")).await;
    expect_quiet(&cx, &mut sub, "after the event was dead-lettered").await;

    let query = DeadLetterQuery {
        subscription: Some(group.clone()),
        ..DeadLetterQuery::default()
    };
    let letters = call(&cx, "dlq.list", dlq.list(&query)).await;
    let [letter] = letters.as_slice() else {
        panic!(
            "{cx}: expected one dead letter for subscription {group}, found {}",
            letters.len()
        );
    };
    assert_eq!(letter.reason, "gave up", "{cx}: dead letter's reason");
    assert_eq!(letter.attempts, 3, "{cx}: dead letter's attempts");
    assert_eq!(letter.topic, topic, "{cx}: dead letter's topic");
    assert_eq!(
        letter.subscription, group,
        "{cx}: dead letter's subscription"
    );
    assert!(
        letter.first_failure_at <= letter.last_failure_at,
        "{cx}: first failure {} is after last failure {}",
        letter.first_failure_at,
        letter.last_failure_at
    );
    assert!(
        letter.last_failure_at >= before_dead_letter - chrono::Duration::seconds(1),
        "{cx}: last_failure_at {} is before the event was dead-lettered",
        letter.last_failure_at
    );
    assert_same_event(&cx, "the dead letter's event", &letter.event, &event);
    assert!(!letter.id.is_empty(), "{cx}: dead letter without an id");

    assert_eq!(
        call(&cx, "dlq.len", dlq.len()).await,
        len_before + 1,
        "{cx}: dlq.len after one dead letter"
    );
    let got = call(&cx, "dlq.get", dlq.get(&letter.id)).await;
    assert_eq!(got.as_ref(), Some(letter), "{cx}: dlq.get(id)");
    let removed = call(&cx, "dlq.remove", dlq.remove(&letter.id)).await;
    assert_eq!(removed.as_ref(), Some(letter), "{cx}: dlq.remove(id)");
    assert_eq!(
        call(&cx, "dlq.len", dlq.len()).await,
        len_before,
        "{cx}: dlq.len after removing the letter"
    );
    assert_eq!(
        call(&cx, "dlq.get", dlq.get(&letter.id)).await,
        None,
        "{cx}: dlq.get after remove"
    );
    assert_eq!(
        call(&cx, "dlq.remove", dlq.remove(&letter.id)).await,
        None,
        "{cx}: a second dlq.remove"
    );
}

/// The dead-letter queue lists oldest first, filters by event type and subscription, and
/// pages with offset and limit.
pub async fn dead_letter_queue_queries<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "dead_letter_queue_queries");
    let dlq = transport.dead_letter_queue();
    let (type_a, type_b) = (topic("letter.a"), topic("letter.b"));
    let (sub, other_sub) = (group(), group());
    // Pushed in this order: a0 b1 a2 b3 a4, then one letter of another subscription.
    let mut pushed = Vec::new();
    for i in 0..5 {
        let t = if i % 2 == 0 { &type_a } else { &type_b };
        pushed.push(letter(t, &sub, i));
    }
    pushed.push(letter(&type_a, &other_sub, 5));
    for l in &pushed {
        call(&cx, "dlq.push", dlq.push(l.clone())).await;
    }
    let ids = |letters: &[DeadLetter]| letters.iter().map(|l| l.id.clone()).collect::<Vec<_>>();
    let want = |idx: &[usize]| {
        idx.iter()
            .map(|&i| pushed[i].id.clone())
            .collect::<Vec<_>>()
    };
    let query =
        |event_type: Option<&String>, subscription: &String, offset, limit| DeadLetterQuery {
            event_type: event_type.cloned(),
            subscription: Some(subscription.clone()),
            offset,
            limit,
        };

    let cases = [
        (
            "subscription filter",
            query(None, &sub, 0, 100),
            want(&[0, 1, 2, 3, 4]),
        ),
        (
            "other subscription",
            query(None, &other_sub, 0, 100),
            want(&[5]),
        ),
        (
            "event type filter",
            query(Some(&type_a), &sub, 0, 100),
            want(&[0, 2, 4]),
        ),
        ("offset 1 limit 2", query(None, &sub, 1, 2), want(&[1, 2])),
        ("offset 4", query(None, &sub, 4, 10), want(&[4])),
        (
            "type b, offset 1",
            query(Some(&type_b), &sub, 1, 10),
            want(&[3]),
        ),
        ("offset past the end", query(None, &sub, 10, 10), want(&[])),
        ("limit 0", query(None, &sub, 0, 0), want(&[])),
    ];
    for (what, query, want) in cases {
        let got = call(&cx, "dlq.list", dlq.list(&query)).await;
        assert_eq!(ids(&got), want, "{cx}: dlq.list, {what} (oldest first)");
    }
    let first = call(&cx, "dlq.list", dlq.list(&query(None, &sub, 0, 1))).await;
    assert_eq!(
        first.first(),
        Some(&pushed[0]),
        "{cx}: listed letter intact"
    );

    for l in &pushed {
        let removed = call(&cx, "dlq.remove", dlq.remove(&l.id)).await;
        assert_eq!(removed.as_ref(), Some(l), "{cx}: dlq.remove({})", l.id);
    }
    let left = call(&cx, "dlq.list", dlq.list(&query(None, &sub, 0, 100))).await;
    assert!(left.is_empty(), "{cx}: letters left after removing all");
}

/// `redeliver(group, topic, event)` delivers to that group alone, as attempt 1.
pub async fn redeliver_targets_one_group<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "redeliver_targets_one_group");
    let topic = topic("shipment.sent");
    let (target, bystander) = (group(), group());
    let mut s_target = subscribe(&cx, transport, &target, &[&topic]).await;
    let mut s_bystander = subscribe(&cx, transport, &bystander, &[&topic]).await;
    let event = event(&topic, 11).with_correlation_id("corr-re");

    let redeliver = transport.redeliver(&target, &topic, event.clone());
    call(&cx, "redeliver", redeliver).await;
    let d = recv(&cx, &mut s_target, "the redelivered event").await;
    assert_same_event(&cx, "the redelivered event", d.event(), &event);
    assert_eq!(
        d.attempt(),
        1,
        "{cx}: a redelivered event starts again at attempt 1"
    );
    assert_eq!(d.topic(), topic, "{cx}: redelivery's topic");
    assert_eq!(d.group(), target, "{cx}: redelivery's group");
    ack(&cx, d).await;
    quiet_all(&cx, [&mut s_target, &mut s_bystander]).await;
}

/// One consumer gets the events of two keys (stream ids), published interleaved, with each
/// key's events in publish order.
pub async fn order_is_kept_per_key<T: Transport + ?Sized>(transport: &T) {
    const PER_KEY: usize = 100;
    let cx = Cx::new(transport, "order_is_kept_per_key");
    let topic = topic("account.changed");
    let group = group();
    let mut sub = subscribe(&cx, transport, &group, &[&topic]).await;
    let keys = [
        format!("acct-a-{}", suffix()),
        format!("acct-b-{}", suffix()),
    ];
    let events: Vec<EventEnvelope> = (0..PER_KEY)
        .flat_map(|seq| keys.iter().map(move |k| (k, seq)))
        .map(|(key, seq)| {
            EventEnvelope::new(&topic, &json!({"key": key, "seq": seq}))
                .unwrap()
                .with_stream_id(key)
        })
        .collect();

    let ((), got) = tokio::join!(
        publish_each(&cx, transport, &topic, events),
        receive_and_ack(&cx, &mut sub, 2 * PER_KEY, "events of both keys"),
    );
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for d in &got {
        let key = d.event.stream_id().unwrap_or_default().to_owned();
        let seq: serde_json::Value = d.event.data().unwrap();
        seen.entry(key)
            .or_default()
            .push(seq["seq"].as_u64().unwrap());
    }
    let in_order: Vec<u64> = (0..PER_KEY as u64).collect();
    for key in &keys {
        assert_eq!(
            seen.get(key),
            Some(&in_order),
            "{cx}: events of key {key} out of publish order"
        );
    }
    expect_quiet(&cx, &mut sub, "after every event was acked").await;
}

/// A delivery dropped without ack or nack is delivered again (to the same or another
/// consumer of the group): forgetting a delivery loses nothing.
pub async fn unsettled_delivery_is_redelivered<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "unsettled_delivery_is_redelivered");
    let topic = topic("email.queued");
    let group = group();
    let mut a = subscribe(&cx, transport, &group, &[&topic]).await;
    let mut b = subscribe(&cx, transport, &group, &[&topic]).await;
    let event = event(&topic, 5);
    publish(&cx, transport, &topic, event.clone()).await;

    let first = recv_either(&cx, &mut a, &mut b, "the first delivery").await;
    assert_same_event(&cx, "the first delivery", first.event(), &event);
    drop(first);
    let again = recv_either(&cx, &mut a, &mut b, "the redelivery of a dropped delivery").await;
    assert_same_event(&cx, "the redelivered event", again.event(), &event);
    assert_eq!(again.group(), group, "{cx}: redelivery's group");
    ack(&cx, again).await;
    quiet_all(&cx, [&mut a, &mut b]).await;
}

/// `publish_batch` delivers every event, in order.
pub async fn publish_batch_delivers_in_order<T: Transport + ?Sized>(transport: &T) {
    const N: usize = 20;
    let cx = Cx::new(transport, "publish_batch_delivers_in_order");
    let topic = topic("batch.item");
    let group = group();
    let mut sub = subscribe(&cx, transport, &group, &[&topic]).await;
    let events: Vec<EventEnvelope> = (0..N).map(|i| event(&topic, i)).collect();
    let want: Vec<EventId> = events.iter().map(|e| e.id().clone()).collect();

    // Received while publishing: a transport may make a batch wait for its consumers.
    let batch = call(
        &cx,
        "publish_batch",
        transport.publish_batch(&topic, events),
    );
    let ((), got) = tokio::join!(batch, receive_and_ack(&cx, &mut sub, N, "the batch"));
    let got: Vec<EventId> = got.iter().map(|d| d.event.id().clone()).collect();
    assert_eq!(got, want, "{cx}: batch delivered out of order");
    expect_quiet(&cx, &mut sub, "after the batch was acked").await;
}

/// [`DeliveryStream::next_batch`] hands out every event once, in publish order, at least
/// one and at most `max` per call (`max` of 0 counting as 1), appending to what the caller's
/// vector already holds.
pub async fn next_batch_takes_what_is_ready<T: Transport + ?Sized>(transport: &T) {
    const N: usize = 30;
    const MAX: usize = 8;
    let cx = Cx::new(transport, "next_batch_takes_what_is_ready");
    let topic = topic("batch.pull");
    let group = group();
    let mut sub = subscribe(&cx, transport, &group, &[&topic]).await;
    // One key: order is only promised per key.
    let key = format!("pull-{}", suffix());
    let events: Vec<EventEnvelope> = (0..N)
        .map(|i| event(&topic, i).with_stream_id(&key))
        .collect();
    let want: Vec<EventId> = events.iter().map(|e| e.id().clone()).collect();

    let receive = async {
        let mut got: Vec<EventId> = Vec::new();
        let mut batch: Vec<Delivery> = Vec::new();
        let mut calls = 0;
        while got.len() < N {
            // The first call asks for 0: it must still hand out one delivery.
            let max = if calls == 0 { 0 } else { MAX };
            calls += 1;
            let before = batch.len();
            match timeout(RECEIVE_TIMEOUT, sub.next_batch(max, &mut batch)).await {
                Err(_) => panic!(
                    "{cx}: timed out after {RECEIVE_TIMEOUT:?} in next_batch with {} of {N} events",
                    got.len()
                ),
                Ok(Err(e)) => panic!("{cx}: next_batch failed: {e}"),
                Ok(Ok(false)) => panic!("{cx}: the subscription ended in next_batch"),
                Ok(Ok(true)) => {}
            }
            let taken = batch.len() - before;
            assert!(
                (1..=max.max(1)).contains(&taken),
                "{cx}: next_batch({max}) handed out {taken} deliveries"
            );
            // Settle all but the last one taken, which stays in the vector: the next call
            // must append after it, not overwrite it.
            let keep = batch.pop().expect("at least one delivery");
            for delivery in batch.drain(..) {
                got.push(delivery.event().id().clone());
                ack(&cx, delivery).await;
            }
            batch.push(keep);
            if got.len() + 1 == N {
                break;
            }
        }
        for delivery in batch.drain(..) {
            got.push(delivery.event().id().clone());
            ack(&cx, delivery).await;
        }
        got
    };
    let ((), got) = tokio::join!(publish_each(&cx, transport, &topic, events), receive);
    assert_eq!(
        got, want,
        "{cx}: next_batch delivered out of order or not once each"
    );
    expect_quiet(&cx, &mut sub, "after every batch was acked").await;
}

/// Invalid group names, empty pattern lists and invalid topics are
/// [`Error::InvalidInput`], for `subscribe`, `publish`, `publish_batch` and `redeliver`.
pub async fn invalid_input_is_rejected<T: Transport + ?Sized>(transport: &T) {
    let cx = Cx::new(transport, "invalid_input_is_rejected");
    let valid_topic = topic("valid.topic");
    let pattern = TopicPattern::parse(&valid_topic).unwrap();
    for bad_group in ["", "bad group", "bad/group", "gr*up"] {
        let options = SubscribeOptions {
            group: bad_group.to_owned(),
            patterns: vec![pattern.clone()],
            prefetch: 1,
            ephemeral: false,
        };
        let result = call_raw(&cx, "subscribe", transport.subscribe(options)).await;
        assert_invalid(
            &cx,
            &format!("subscribe with group {bad_group:?}"),
            result.err(),
        );
        let redeliver = transport.redeliver(bad_group, &valid_topic, event(&valid_topic, 0));
        let result = call_raw(&cx, "redeliver", redeliver).await;
        assert_invalid(
            &cx,
            &format!("redeliver to group {bad_group:?}"),
            result.err(),
        );
    }
    let options = SubscribeOptions {
        group: group(),
        patterns: Vec::new(),
        prefetch: 1,
        ephemeral: false,
    };
    let result = call_raw(&cx, "subscribe", transport.subscribe(options)).await;
    assert_invalid(&cx, "subscribe without patterns", result.err());

    let good_group = group();
    let _sub = subscribe(&cx, transport, &good_group, &[&valid_topic]).await;
    for bad_topic in ["", "a..b", ".a", "a.", "a.*", "a.#", "a b"] {
        let e = event(&valid_topic, 0);
        let result = call_raw(&cx, "publish", transport.publish(bad_topic, e)).await;
        assert_invalid(&cx, &format!("publish to {bad_topic:?}"), result.err());
        let batch = transport.publish_batch(bad_topic, vec![event(&valid_topic, 1)]);
        let result = call_raw(&cx, "publish_batch", batch).await;
        assert_invalid(
            &cx,
            &format!("publish_batch to {bad_topic:?}"),
            result.err(),
        );
        let redeliver = transport.redeliver(&good_group, bad_topic, event(&valid_topic, 2));
        let result = call_raw(&cx, "redeliver", redeliver).await;
        assert_invalid(
            &cx,
            &format!("redeliver with topic {bad_topic:?}"),
            result.err(),
        );
    }
}

// ----- helpers -----

/// Names the transport and the case in every failure message.
struct Cx {
    transport: &'static str,
    case: &'static str,
}

impl Cx {
    fn new<T: Transport + ?Sized>(transport: &T, case: &'static str) -> Self {
        Self {
            transport: transport.name(),
            case,
        }
    }
}

impl fmt::Display for Cx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "transport `{}`, case `{}`", self.transport, self.case)
    }
}

/// What the suite keeps of a delivery after settling it.
struct Received {
    event: EventEnvelope,
    topic: String,
    group: String,
}

fn suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A fresh topic: `t<uuid>.<rest>`.
fn topic(rest: &str) -> String {
    format!("t{}.{rest}", suffix())
}

/// A fresh consumer group name.
fn group() -> String {
    format!("g{}", suffix())
}

/// An event of type `topic` with payload `{"seq": seq}`.
fn event(topic: &str, seq: usize) -> EventEnvelope {
    EventEnvelope::new(topic, &json!({ "seq": seq })).unwrap()
}

fn letter(event_type: &str, subscription: &str, seq: usize) -> DeadLetter {
    let now = chrono::Utc::now();
    DeadLetter::new(
        event(event_type, seq),
        event_type.to_owned(),
        subscription.to_owned(),
        format!("reason {seq}"),
        3,
        now - chrono::Duration::seconds(2),
        now,
    )
}

/// Awaits `fut` (bounded by [`CALL_TIMEOUT`]) and returns its result unchecked.
async fn call_raw<R>(cx: &Cx, what: &str, fut: impl Future<Output = R>) -> R {
    timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{cx}: `{what}` did not return within {CALL_TIMEOUT:?}"))
}

/// Awaits `fut` (bounded by [`CALL_TIMEOUT`]) and panics if it failed.
async fn call<R>(cx: &Cx, what: &str, fut: impl Future<Output = crate::Result<R>>) -> R {
    call_raw(cx, what, fut)
        .await
        .unwrap_or_else(|e| panic!("{cx}: `{what}` failed: {e}"))
}

fn assert_invalid(cx: &Cx, what: &str, error: Option<Error>) {
    match error {
        Some(Error::InvalidInput { .. }) => {}
        Some(other) => panic!("{cx}: {what} must be Error::InvalidInput, got: {other:?}"),
        None => panic!("{cx}: {what} must be Error::InvalidInput, but it succeeded"),
    }
}

async fn subscribe<T: Transport + ?Sized>(
    cx: &Cx,
    transport: &T,
    group: &str,
    patterns: &[&String],
) -> Box<dyn DeliveryStream> {
    subscribe_with(cx, transport, group, patterns, 64).await
}

async fn subscribe_with<T: Transport + ?Sized>(
    cx: &Cx,
    transport: &T,
    group: &str,
    patterns: &[&String],
    prefetch: usize,
) -> Box<dyn DeliveryStream> {
    let (first, rest) = patterns.split_first().expect("at least one pattern");
    let mut options = SubscribeOptions::new(group, first).unwrap();
    for p in rest {
        options = options.pattern(p).unwrap();
    }
    call(
        cx,
        "subscribe",
        transport.subscribe(options.prefetch(prefetch)),
    )
    .await
}

async fn publish<T: Transport + ?Sized>(cx: &Cx, transport: &T, topic: &str, e: EventEnvelope) {
    call(cx, "publish", transport.publish(topic, e)).await;
}

async fn publish_each<T: Transport + ?Sized>(
    cx: &Cx,
    transport: &T,
    topic: &str,
    events: Vec<EventEnvelope>,
) {
    for e in events {
        publish(cx, transport, topic, e).await;
    }
}

async fn ack(cx: &Cx, delivery: Delivery) {
    call(cx, "ack", delivery.ack()).await;
}

/// The next delivery, or a panic naming `what` was awaited.
async fn recv(cx: &Cx, stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    match timeout(RECEIVE_TIMEOUT, stream.next()).await {
        Err(_) => panic!("{cx}: timed out after {RECEIVE_TIMEOUT:?} waiting for {what}"),
        Ok(Err(e)) => panic!("{cx}: next() failed while waiting for {what}: {e}"),
        Ok(Ok(None)) => panic!("{cx}: the subscription ended while waiting for {what}"),
        Ok(Ok(Some(d))) => d,
    }
}

/// The next delivery of either of two consumers.
async fn recv_either(
    cx: &Cx,
    a: &mut Box<dyn DeliveryStream>,
    b: &mut Box<dyn DeliveryStream>,
    what: &str,
) -> Delivery {
    let either = async {
        tokio::select! {
            r = a.next() => r,
            r = b.next() => r,
        }
    };
    match timeout(RECEIVE_TIMEOUT, either).await {
        Err(_) => panic!("{cx}: timed out after {RECEIVE_TIMEOUT:?} waiting for {what}"),
        Ok(Err(e)) => panic!("{cx}: next() failed while waiting for {what}: {e}"),
        Ok(Ok(None)) => panic!("{cx}: a subscription ended while waiting for {what}"),
        Ok(Ok(Some(d))) => d,
    }
}

/// Receives `n` deliveries within [`RECEIVE_TIMEOUT`], acking each.
async fn receive_and_ack(
    cx: &Cx,
    stream: &mut Box<dyn DeliveryStream>,
    n: usize,
    what: &str,
) -> Vec<Received> {
    let mut got = Vec::with_capacity(n);
    let all = async {
        while got.len() < n {
            let d = match stream.next().await {
                Ok(Some(d)) => d,
                Ok(None) => return Err("the subscription ended".to_owned()),
                Err(e) => return Err(format!("next() failed: {e}")),
            };
            let received = Received {
                event: d.event().clone(),
                topic: d.topic().to_owned(),
                group: d.group().to_owned(),
            };
            d.ack().await.map_err(|e| format!("ack failed: {e}"))?;
            got.push(received);
        }
        Ok(())
    };
    match timeout(RECEIVE_TIMEOUT, all).await {
        Ok(Ok(())) => got,
        Ok(Err(why)) => panic!("{cx}: {why} after {} of {n} {what}", got.len()),
        Err(_) => panic!(
            "{cx}: timed out after {RECEIVE_TIMEOUT:?} with {} of {n} {what}",
            got.len()
        ),
    }
}

/// One of several competing consumers: receives, acks and counts in `total` until `n`
/// events arrived in all; returns the ids it got. Pauses a millisecond per event, like a
/// real handler, so that the consumers interleave.
async fn consume_shared(
    cx: &Cx,
    stream: &mut Box<dyn DeliveryStream>,
    total: &AtomicUsize,
    done: &Notify,
    n: usize,
) -> Vec<EventId> {
    let mut got = Vec::new();
    while total.load(Ordering::SeqCst) < n {
        let delivery = tokio::select! {
            () = done.notified() => break,
            r = stream.next() => match r {
                Ok(Some(d)) => d,
                Ok(None) => panic!("{cx}: a subscription ended after {} events", got.len()),
                Err(e) => panic!("{cx}: next() failed: {e}"),
            },
        };
        got.push(delivery.event().id().clone());
        ack(cx, delivery).await;
        if total.fetch_add(1, Ordering::SeqCst) + 1 >= n {
            done.notify_waiters();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    got
}

/// Listens for [`QUIET_PERIOD`] and panics if anything arrives.
async fn expect_quiet(cx: &Cx, stream: &mut Box<dyn DeliveryStream>, when: &str) {
    match timeout(QUIET_PERIOD, stream.next()).await {
        Err(_) => {}
        Ok(Ok(Some(d))) => panic!(
            "{cx}: unexpected delivery {when}: event {} of type `{}` on topic `{}` to group \
             `{}`, attempt {}",
            d.event().id(),
            d.event().event_type(),
            d.topic(),
            d.group(),
            d.attempt()
        ),
        Ok(Ok(None)) => panic!("{cx}: the subscription ended unexpectedly {when}"),
        Ok(Err(e)) => panic!("{cx}: next() failed {when}: {e}"),
    }
}

/// [`expect_quiet`] on several streams at once.
async fn quiet_all<const N: usize>(cx: &Cx, streams: [&mut Box<dyn DeliveryStream>; N]) {
    let checks = streams
        .into_iter()
        .map(|s| expect_quiet(cx, s, "after everything expected was received and acked"));
    futures::future::join_all(checks).await;
}

fn assert_same_event(cx: &Cx, what: &str, got: &EventEnvelope, want: &EventEnvelope) {
    macro_rules! same {
        ($($field:ident),*) => {$(
            assert_eq!(
                got.$field(),
                want.$field(),
                "{cx}: {what}: `{}` changed in transit",
                stringify!($field)
            );
        )*};
    }
    same!(
        id,
        event_type,
        data_bytes,
        content_type,
        headers,
        correlation_id,
        causation_id,
        source,
        subject,
        schema_version,
        stream_id,
        time
    );
}
