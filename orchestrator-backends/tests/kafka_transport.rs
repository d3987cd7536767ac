//! `KafkaTransport` against the live broker: the transport conformance suite, plus what only a
//! broker can get wrong — messages written by other clients, redelivery to unknown groups.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kafka_support;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use kafka_support::{Live, config, live};
use orchestrator_backends::kafka::{KafkaTransport, UNDECODABLE_EVENT_TYPE};
use orchestrator_core::testkit::transport::run_all;
use orchestrator_core::{
    DeadLetterQuery, Delivery, DeliveryStream, Error, EventEnvelope, SubscribeOptions, Transport,
};

const WAIT: Duration = Duration::from_secs(20);

async fn recv(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

fn event(topic: &str, seq: usize) -> EventEnvelope {
    EventEnvelope::new(topic, &serde_json::json!({ "seq": seq })).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_transport_conforms() {
    let Some(live) = live().await else {
        return;
    };
    let Live {
        brokers, prefix, ..
    } = &live;
    let case = std::sync::atomic::AtomicUsize::new(0);
    run_all(|| {
        // Each case gets a dead-letter topic of its own (the dead-letter cases count letters).
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = config(brokers, &format!("{prefix}c{n}."));
        async move { KafkaTransport::connect(config).await.unwrap() }
    })
    .await;
}

/// A message another client wrote that is not a CloudEvent is dead-lettered with the reason,
/// its bytes kept, and the consumer carries on with the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_garbage_is_dead_lettered_and_the_consumer_goes_on() {
    let Some(live) = live().await else {
        return;
    };
    let Live {
        brokers,
        prefix,
        transport,
        ..
    } = &live;
    let topic = "sensor.reading";
    let mut sub = transport
        .subscribe(SubscribeOptions::new("readers", topic).unwrap())
        .await
        .unwrap();
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers.as_str())
        .create()
        .unwrap();
    let kafka_topic = transport.kafka_topic(topic).unwrap();
    assert_eq!(kafka_topic, format!("{prefix}sensor.reading"));
    for (key, value) in [
        ("k1", &b"definitely not json"[..]),
        ("k1", br#"{"specversion":"1.0","id":"x"}"#),
    ] {
        raw.send(
            FutureRecord::to(&kafka_topic).key(key).payload(value),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    // A tombstone (no value) is not an event either.
    raw.send(
        FutureRecord::<str, [u8]>::to(&kafka_topic).key("k1"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let good = event(topic, 1);
    transport.publish(topic, good.clone()).await.unwrap();

    let d = recv(&mut sub, "the good event after the garbage").await;
    assert_eq!(d.event().id(), good.id());
    d.ack().await.unwrap();

    let dlq = transport.dead_letter_queue();
    let query = DeadLetterQuery {
        subscription: Some("readers".into()),
        ..DeadLetterQuery::default()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let letters = loop {
        let letters = dlq.list(&query).await.unwrap();
        if letters.len() >= 3 || tokio::time::Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 3, "{letters:#?}");
    // Dead-lettered concurrently: find each by its bytes.
    let by_bytes = |bytes: &[u8]| {
        letters
            .iter()
            .find(|l| l.event.data_bytes().as_ref() == bytes)
            .unwrap_or_else(|| {
                panic!(
                    "no letter with {:?}: {letters:#?}",
                    String::from_utf8_lossy(bytes)
                )
            })
    };
    let first = by_bytes(b"definitely not json");
    assert_eq!(first.event.event_type(), UNDECODABLE_EVENT_TYPE);
    assert_eq!(first.event.header("kafkatopic"), Some(kafka_topic.as_str()));
    assert!(first.event.header("kafkaoffset").is_some());
    assert_eq!(first.topic, topic);
    assert_eq!(first.subscription, "readers");
    for l in &letters {
        assert!(l.reason.contains("not a CloudEvent"), "{}", l.reason);
        assert_eq!(l.event.event_type(), UNDECODABLE_EVENT_TYPE);
    }
    assert!(
        by_bytes(br#"{"specversion":"1.0","id":"x"}"#)
            .reason
            .contains("source")
    );
    assert!(by_bytes(b"").reason.contains("no value"));
    for l in &letters {
        assert_eq!(dlq.remove(&l.id).await.unwrap().as_ref(), Some(l));
    }
    assert!(dlq.list(&query).await.unwrap().is_empty());
    // Removal is durable: a fresh view of the dead-letter topic agrees.
    let fresh = KafkaTransport::connect(config(brokers, prefix))
        .await
        .unwrap();
    assert!(
        fresh
            .dead_letter_queue()
            .list(&query)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(fresh.dead_letter_queue().is_empty().await.unwrap());
}

/// Redelivering to a group that never subscribed is `NotFound`; once it has, it works, for
/// that group only, even from another transport instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_knows_its_groups() {
    let Some(live) = live().await else {
        return;
    };
    let Live {
        brokers,
        prefix,
        transport,
        ..
    } = &live;
    let topic = "invoice.sent";
    let result = transport.redeliver("nobody", topic, event(topic, 0)).await;
    assert!(matches!(result, Err(Error::NotFound { .. })), "{result:?}");

    let mut sub = transport
        .subscribe(SubscribeOptions::new("mailer", topic).unwrap())
        .await
        .unwrap();
    let other = KafkaTransport::connect(config(brokers, prefix))
        .await
        .unwrap();
    let e = event(topic, 7);
    other.redeliver("mailer", topic, e.clone()).await.unwrap();
    let d = recv(&mut sub, "the redelivered event").await;
    assert_eq!(d.event().id(), e.id());
    assert_eq!((d.attempt(), d.topic(), d.group()), (1, topic, "mailer"));
    d.ack().await.unwrap();
}
