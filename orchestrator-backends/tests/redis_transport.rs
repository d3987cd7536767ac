//! `RedisTransport` against the live Redis: the transport conformance suite, plus what only a
//! broker can get wrong — entries written by other clients, patterns over topics that do not
//! exist yet, dead letters reprocessed, nacks and deliveries that outlive their consumer.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrator_backends::redis::{RedisConfig, RedisTransport};
use orchestrator_core::testkit::transport::run_all;
use orchestrator_core::{
    DeadLetterQuery, Delivery, DeliveryStream, EventEnvelope, SubscribeOptions, Transport,
    cloudevents,
};
use redis_support::{Cleanup, config, random_prefix, raw, reachable};

const WAIT: Duration = Duration::from_secs(20);

async fn recv(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

async fn expect_quiet(stream: &mut Box<dyn DeliveryStream>, what: &str) {
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(1500), stream.next()).await {
        panic!(
            "{what}: expected nothing, got {:?}",
            got.map(|d| d.map(|d| d.event().id().clone()))
        );
    }
}

fn event(topic: &str, seq: usize) -> EventEnvelope {
    EventEnvelope::new(topic, &serde_json::json!({ "seq": seq })).unwrap()
}

fn suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_transport_conforms() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let case = AtomicUsize::new(0);
    let made = Mutex::new(Vec::new());
    run_all(|| {
        // Each case gets a transport of its own under a prefix of its own (the dead-letter
        // cases count letters, so they must not share a queue).
        let config = config(
            &url,
            &format!("{prefix}{}:", case.fetch_add(1, Ordering::Relaxed)),
        );
        let made = &made;
        async move {
            let transport = RedisTransport::connect(config).await.unwrap();
            made.lock().unwrap().push(transport.clone());
            transport
        }
    })
    .await;
    let made = std::mem::take(&mut *made.lock().unwrap());
    for transport in made {
        transport.close().await;
    }
}

/// Entries written by another client without an `event` field, or with one that is not JSON
/// or not a CloudEvent, are dead-lettered with the reason; the consumer goes on to the valid
/// event after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_are_dead_lettered_and_the_consumer_goes_on() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let transport = RedisTransport::connect(config(&url, &prefix))
        .await
        .unwrap();
    let topic = "sensor.read";
    let mut sub = transport
        .subscribe(SubscribeOptions::new("ingest", topic).unwrap())
        .await
        .unwrap();

    let key = format!("{prefix}topic:{topic}");
    let mut conn = raw(&url).await;
    let xadd = |fields: Vec<(&'static str, Vec<u8>)>| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd
    };
    let _: String = xadd(vec![
        ("type", b"sensor.read".to_vec()),
        ("payload", b"{}".to_vec()),
    ])
    .query_async(&mut conn)
    .await
    .unwrap();
    let _: String = xadd(vec![
        ("type", b"sensor.read".to_vec()),
        ("event", b"{not json".to_vec()),
    ])
    .query_async(&mut conn)
    .await
    .unwrap();
    let not_cloudevent = br#"{"specversion":"1.0","id":"x1","source":"s"}"#.to_vec();
    let _: String = xadd(vec![
        ("type", b"bad type".to_vec()),
        ("event", not_cloudevent),
    ])
    .query_async(&mut conn)
    .await
    .unwrap();
    let good = event(topic, 1);
    let _: String = xadd(vec![
        ("type", topic.as_bytes().to_vec()),
        ("event", cloudevents::encode(&good).unwrap()),
    ])
    .query_async(&mut conn)
    .await
    .unwrap();

    let delivery = recv(&mut sub, "the valid event after the bad ones").await;
    assert_eq!(delivery.event(), &good);
    assert_eq!(delivery.attempt(), 1);
    delivery.ack().await.unwrap();
    expect_quiet(&mut sub, "bad entries are not delivered").await;

    let dlq = transport.dead_letter_queue();
    let letters = dlq.list(&DeadLetterQuery::default()).await.unwrap();
    assert_eq!(letters.len(), 3, "{letters:#?}");
    assert!(
        letters[0].reason.contains("no `event` field"),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[1].reason.contains("not a JSON object"),
        "{}",
        letters[1].reason
    );
    assert!(
        letters[2].reason.contains("`type`"),
        "{}",
        letters[2].reason
    );
    assert_eq!(
        &letters[1].event.data_bytes()[..],
        b"{not json",
        "raw bytes are kept"
    );
    assert_eq!(letters[1].event.event_type(), "sensor.read");
    assert_eq!(letters[2].event.event_type(), "orchestrator.invalid");
    for letter in &letters {
        assert_eq!(letter.topic, topic);
        assert_eq!(letter.subscription, "ingest");
        assert!(letter.event.header("redisentryid").is_some());
    }
    // Dead-lettered entries are settled: nothing is left pending in the group.
    let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(&key)
        .arg("ingest")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "entries left pending");
    drop(sub);
    transport.close().await;
}

/// Topic entries follow the wire contract, and an event any client `XADD`s in that form is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_entries_follow_the_wire_contract() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let transport = RedisTransport::connect(config(&url, &prefix))
        .await
        .unwrap();
    let topic = "user.created";
    let published = event(topic, 1).with_header("tenant", "acme").unwrap();
    transport.publish(topic, published.clone()).await.unwrap();

    let mut conn = raw(&url).await;
    let entries: redis_support::RawEntries = redis::cmd("XRANGE")
        .arg(format!("{prefix}topic:{topic}"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    let fields = &entries[0].1;
    assert_eq!(fields[0], ("type".to_owned(), topic.as_bytes().to_vec()));
    assert_eq!(fields[1].0, "event");
    let wire: serde_json::Value = serde_json::from_slice(&fields[1].1).unwrap();
    assert_eq!(wire["specversion"], "1.0");
    assert_eq!(wire["type"], topic);
    assert_eq!(wire["tenant"], "acme");
    assert_eq!(cloudevents::decode(&fields[1].1).unwrap(), published);
    transport.close().await;
}

/// A pattern subscription made before any of its topics exists receives the events of topics
/// created afterwards — also when another client (another transport) publishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_subscriptions_see_topics_created_later() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let cfg = config(&url, &prefix).with_discovery_interval(Duration::from_millis(200));
    let consumer = RedisTransport::connect(cfg.clone()).await.unwrap();
    let publisher = RedisTransport::connect(cfg).await.unwrap();
    let base = format!("t{}", suffix());
    let mut one = consumer
        .subscribe(SubscribeOptions::new("one", &format!("{base}.*")).unwrap())
        .await
        .unwrap();
    let mut any = consumer
        .subscribe(SubscribeOptions::new("any", &format!("{base}.#")).unwrap())
        .await
        .unwrap();

    // Published right away, before any consumer could have discovered the topics.
    let (a, ab) = (format!("{base}.a"), format!("{base}.a.b"));
    for (i, topic) in [&a, &ab, &a].into_iter().enumerate() {
        publisher.publish(topic, event(topic, i)).await.unwrap();
    }
    let mut got_one = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut one, "`base.*`").await;
        got_one.push(d.topic().to_owned());
        d.ack().await.unwrap();
    }
    assert_eq!(got_one, [a.clone(), a.clone()]);
    let mut got_any = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut any, "`base.#`").await;
        got_any.push(d.topic().to_owned());
        d.ack().await.unwrap();
    }
    got_any.sort();
    assert_eq!(got_any, [a.clone(), a.clone(), ab.clone()]);
    expect_quiet(&mut one, "`base.*` got `base.a.b`").await;

    // A topic created while the subscriptions run is found too.
    let c = format!("{base}.c");
    publisher.publish(&c, event(&c, 9)).await.unwrap();
    assert_eq!(recv(&mut one, "new topic").await.topic(), c);
    assert_eq!(recv(&mut any, "new topic").await.topic(), c);
    consumer.close().await;
    publisher.close().await;
}

/// A dead letter is reprocessed by redelivering its event to its subscription, then removing
/// it from the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_reprocessed_with_redeliver() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let transport = RedisTransport::connect(config(&url, &prefix))
        .await
        .unwrap();
    let topic = "invoice.sent";
    let mut billing = transport
        .subscribe(SubscribeOptions::new("billing", topic).unwrap())
        .await
        .unwrap();
    let mut audit = transport
        .subscribe(SubscribeOptions::new("audit", topic).unwrap())
        .await
        .unwrap();
    let original = event(topic, 42);
    transport.publish(topic, original.clone()).await.unwrap();
    recv(&mut audit, "audit's copy").await.ack().await.unwrap();
    let d = recv(&mut billing, "billing's copy").await;
    d.nack(Duration::ZERO, "flaky").await.unwrap();
    let d = recv(&mut billing, "billing's retry").await;
    assert_eq!((d.attempt(), d.last_error()), (2, Some("flaky")));
    d.dead_letter("broken for good").await.unwrap();

    let dlq = transport.dead_letter_queue();
    let [letter] = dlq
        .list(&DeadLetterQuery::default())
        .await
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(
        (
            letter.attempts,
            letter.reason.as_str(),
            letter.subscription.as_str()
        ),
        (2, "broken for good", "billing")
    );
    transport
        .redeliver(&letter.subscription, &letter.topic, letter.event.clone())
        .await
        .unwrap();
    assert!(dlq.remove(&letter.id).await.unwrap().is_some());

    let again = recv(&mut billing, "the reprocessed letter").await;
    assert_eq!(again.event(), &original);
    assert_eq!((again.attempt(), again.last_error()), (1, None));
    assert_eq!(again.topic(), topic);
    again.ack().await.unwrap();
    expect_quiet(&mut audit, "redeliver went to billing only").await;
    assert_eq!(dlq.len().await.unwrap(), 0);
    transport.close().await;
}

/// A delayed nack is kept in Redis: when the consumer's whole process is gone before the
/// delay is over, a consumer started later still gets the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_nacks_survive_the_consumer() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let cfg = config(&url, &prefix).with_delayed_poll_interval(Duration::from_millis(100));
    let topic = "mail.queued";
    let original = event(topic, 1);
    {
        let transport = RedisTransport::connect(cfg.clone()).await.unwrap();
        let mut sub = transport
            .subscribe(SubscribeOptions::new("mailer", topic).unwrap())
            .await
            .unwrap();
        transport.publish(topic, original.clone()).await.unwrap();
        let d = recv(&mut sub, "first attempt").await;
        d.nack(Duration::from_millis(700), "smtp down")
            .await
            .unwrap();
        transport.close().await;
    }
    let nacked_at = Instant::now();
    let transport = RedisTransport::connect(cfg).await.unwrap();
    let mut sub = transport
        .subscribe(SubscribeOptions::new("mailer", topic).unwrap())
        .await
        .unwrap();
    let d = recv(&mut sub, "the retry, picked up by a new consumer").await;
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(500),
        "{:?}",
        nacked_at.elapsed()
    );
    assert_eq!(d.event(), &original);
    assert_eq!((d.attempt(), d.last_error()), (2, Some("smtp down")));
    d.ack().await.unwrap();
    transport.close().await;
}

/// Deliveries held by a consumer that died (neither settled nor dropped) are reclaimed by
/// another consumer of the group after the claim min-idle time, as the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_a_dead_consumer_are_reclaimed() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let cfg: RedisConfig = config(&url, &prefix).with_claim_min_idle(Duration::from_secs(1));
    let topic = "job.ready";
    let dying = RedisTransport::connect(cfg.clone()).await.unwrap();
    let mut doomed = dying
        .subscribe(SubscribeOptions::new("workers", topic).unwrap())
        .await
        .unwrap();
    dying.publish(topic, event(topic, 1)).await.unwrap();
    let held = recv(&mut doomed, "the doomed consumer's delivery").await;
    let id = held.event().id().clone();
    // A crash: the delivery is neither settled nor dropped, the consumer stops reading.
    std::mem::forget(held);
    dying.close().await;

    let survivor = RedisTransport::connect(cfg).await.unwrap();
    let mut sub = survivor
        .subscribe(SubscribeOptions::new("workers", topic).unwrap())
        .await
        .unwrap();
    let d = recv(&mut sub, "the reclaimed delivery").await;
    assert_eq!(d.event().id(), &id);
    assert_eq!(d.attempt(), 2);
    assert!(d.last_error().unwrap().contains("reclaimed"));
    d.ack().await.unwrap();
    expect_quiet(&mut sub, "after the reclaimed delivery was acked").await;
    survivor.close().await;
}

/// A live consumer that holds deliveries longer than the claim min-idle time — a slow
/// handler, or deliveries read ahead — keeps them: neither it nor another consumer of the
/// group reclaims them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_deliveries_are_not_reclaimed_from_a_live_consumer() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let cfg = config(&url, &prefix).with_claim_min_idle(Duration::from_millis(600));
    let transport = RedisTransport::connect(cfg).await.unwrap();
    let topic = "report.requested";
    let options = SubscribeOptions::new("reports", topic).unwrap().prefetch(4);
    let mut slow = transport.subscribe(options.clone()).await.unwrap();
    for i in 0..3 {
        transport.publish(topic, event(topic, i)).await.unwrap();
    }
    // One in hand, the others read ahead behind it: all three pending with the slow consumer
    // before the other one arrives.
    let first = recv(&mut slow, "the slow consumer's first delivery").await;
    let mut conn = raw(&url).await;
    let started = Instant::now();
    loop {
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(format!("{prefix}topic:{topic}"))
            .arg("reports")
            .query_async(&mut conn)
            .await
            .unwrap();
        if pending.0 == 3 {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the slow consumer did not read ahead"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut other = transport.subscribe(options).await.unwrap();
    // Several claim rounds pass while the slow consumer works.
    expect_quiet(&mut other, "another consumer reclaimed a held delivery").await;
    assert_eq!(first.attempt(), 1);
    first.ack().await.unwrap();
    for _ in 0..2 {
        let d = recv(&mut slow, "the deliveries read ahead").await;
        assert_eq!(d.attempt(), 1, "a held delivery was delivered again");
        d.ack().await.unwrap();
    }
    expect_quiet(&mut slow, "after every delivery was acked").await;
    transport.close().await;
}

/// What Redis keeps for `group` under `prefix`: its consumer group on `topic`'s stream, its
/// patterns, its retry stream, its membership of the ephemeral set.
async fn group_traces(url: &str, prefix: &str, topic: &str, group: &str) -> Vec<String> {
    let mut conn = raw(url).await;
    let mut traces = Vec::new();
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(format!("{prefix}topic:{topic}"))
        .query_async(&mut conn)
        .await
        .unwrap_or(redis::Value::Nil);
    if format!("{groups:?}").contains(group) {
        traces.push(format!("consumer group on topic `{topic}`"));
    }
    let patterns: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{prefix}patterns"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if patterns.iter().any(|p| p.starts_with(&format!("{group} "))) {
        traces.push("pattern".to_owned());
    }
    let retry: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}retry:{group}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if retry {
        traces.push("retry stream".to_owned());
    }
    let member: bool = redis::cmd("SISMEMBER")
        .arg(format!("{prefix}ephemeral"))
        .arg(group)
        .query_async(&mut conn)
        .await
        .unwrap();
    if member {
        traces.push("ephemeral set".to_owned());
    }
    traces
}

/// Waits until Redis keeps nothing for `group` (panics with what is left after `WAIT`).
async fn wait_until_gone(url: &str, prefix: &str, topic: &str, group: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let traces = group_traces(url, prefix, topic, group).await;
        if traces.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "group `{group}` left behind: {traces:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An ephemeral group lives as long as its consumer: it gets what is published while it is
/// subscribed; once its stream is dropped, its consumer group, pattern and retry stream are
/// gone. The group of a consumer whose process died (its runtime dropped, so it removed
/// nothing) is removed by the next subscription once its alive key has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_groups_leave_nothing_behind() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let config = config(&url, &prefix).with_ephemeral_timeout(Duration::from_millis(500));
    let transport = RedisTransport::connect(config.clone()).await.unwrap();
    let topic = "tail.seen";

    let group = format!("tail-{}", suffix());
    let options = SubscribeOptions::new(&group, "tail.#").unwrap().ephemeral();
    let mut stream = transport.subscribe(options).await.unwrap();
    transport.publish(topic, event(topic, 1)).await.unwrap();
    let delivery = recv(&mut stream, "ephemeral group").await;
    // A retry puts the event on the group's retry stream: that goes too.
    delivery
        .nack(Duration::from_millis(10), "again")
        .await
        .unwrap();
    let again = recv(&mut stream, "the retry").await;
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    assert!(!group_traces(&url, &prefix, topic, &group).await.is_empty());
    drop(stream);
    wait_until_gone(&url, &prefix, topic, &group).await;

    // A consumer whose process dies removes nothing itself.
    let crashed = format!("crashed-{}", suffix());
    let (crash_config, crash_group) = (config.clone(), crashed.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let transport = RedisTransport::connect(crash_config).await.unwrap();
            let options = SubscribeOptions::new(&crash_group, "tail.#")
                .unwrap()
                .ephemeral();
            let stream = transport.subscribe(options).await.unwrap();
            std::mem::forget(stream);
        });
        drop(runtime);
    })
    .join()
    .unwrap();
    assert!(
        group_traces(&url, &prefix, topic, &crashed)
            .await
            .contains(&"ephemeral set".to_owned()),
        "the crashed consumer's group is there until swept"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let next = format!("next-{}", suffix());
    let options = SubscribeOptions::new(&next, "tail.#").unwrap().ephemeral();
    let stream = transport.subscribe(options).await.unwrap();
    assert_eq!(
        group_traces(&url, &prefix, topic, &crashed).await,
        Vec::<String>::new(),
        "swept by the next subscription"
    );
    drop(stream);
    wait_until_gone(&url, &prefix, topic, &next).await;

    // A durable group stays.
    let durable = format!("durable-{}", suffix());
    let stream = transport
        .subscribe(SubscribeOptions::new(&durable, "tail.#").unwrap())
        .await
        .unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !group_traces(&url, &prefix, topic, &durable)
            .await
            .is_empty()
    );
}
