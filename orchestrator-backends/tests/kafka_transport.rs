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

/// The offsets consumer group `group_id` has committed on the partitions of `kafka_topic`
/// (`Offset::Invalid` where it has none).
async fn committed(brokers: &str, group_id: &str, kafka_topic: &str) -> Vec<rdkafka::Offset> {
    use rdkafka::TopicPartitionList;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .create()
        .unwrap();
    let kafka_topic = kafka_topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let metadata = probe.fetch_metadata(Some(&kafka_topic), timeout).unwrap();
        let mut tpl = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            tpl.add_partition(&kafka_topic, partition.id());
        }
        probe
            .committed_offsets(tpl, timeout)
            .unwrap()
            .elements()
            .iter()
            .map(|e| e.offset())
            .collect()
    })
    .await
    .unwrap()
}

/// The topics of the cluster whose name starts with `prefix`.
async fn topics_under(brokers: &str, prefix: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let prefix = prefix.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = probe.fetch_metadata(None, Duration::from_secs(10)).unwrap();
        metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|t| t.starts_with(&prefix))
            .collect()
    })
    .await
    .unwrap()
}

/// An ephemeral group starts at the end of the topic (not its history), retries through the
/// retry topic ephemeral groups share (each getting only its own), and leaves nothing on the
/// broker: no retry topic of its own, no committed offset. A durable group, beside it,
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_groups_start_at_the_end_and_leave_nothing_behind() {
    let Some(live) = live().await else {
        return;
    };
    let Live {
        brokers,
        prefix,
        transport,
        ..
    } = &live;
    let topic = "tail.seen";
    for seq in 0..5 {
        transport.publish(topic, event(topic, seq)).await.unwrap();
    }
    let mut tail = transport
        .subscribe(SubscribeOptions::new("tail-1", topic).unwrap().ephemeral())
        .await
        .unwrap();
    let mut other = transport
        .subscribe(SubscribeOptions::new("tail-2", topic).unwrap().ephemeral())
        .await
        .unwrap();
    let mut durable = transport
        .subscribe(SubscribeOptions::new("keeper", topic).unwrap())
        .await
        .unwrap();
    let fresh = event(topic, 100);
    transport.publish(topic, fresh.clone()).await.unwrap();

    let first = recv(&mut tail, "the event published after subscribing").await;
    assert_eq!(first.event().id(), fresh.id(), "not the topic's history");
    first
        .nack(Duration::from_millis(10), "again")
        .await
        .unwrap();
    let again = recv(&mut tail, "the retry").await;
    assert_eq!((again.event().id(), again.attempt()), (fresh.id(), 2));
    again.ack().await.unwrap();
    let seen = recv(&mut other, "the other ephemeral group").await;
    assert_eq!((seen.event().id(), seen.attempt()), (fresh.id(), 1));
    seen.ack().await.unwrap();
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(1500), other.next()).await {
        panic!(
            "the other group got tail-1's retry: {:?}",
            got.map(|d| d.map(|d| (d.event().id().clone(), d.attempt())))
        );
    }
    // The durable group reads the history too, and commits.
    let mut seqs = Vec::new();
    for _ in 0..6 {
        let delivery = recv(&mut durable, "the durable group").await;
        let data: serde_json::Value = delivery.event().data().unwrap();
        seqs.push(data["seq"].as_u64().unwrap());
        delivery.ack().await.unwrap();
    }
    seqs.sort_unstable();
    assert_eq!(seqs, [0, 1, 2, 3, 4, 100]);
    drop((tail, other, durable));

    let kafka_topic = transport.kafka_topic(topic).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let offsets = committed(brokers, &format!("{prefix}keeper"), &kafka_topic).await;
        if offsets
            .iter()
            .any(|o| matches!(o, rdkafka::Offset::Offset(_)))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the durable group committed nothing: {offsets:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for group in ["tail-1", "tail-2"] {
        let offsets = committed(brokers, &format!("{prefix}{group}"), &kafka_topic).await;
        assert!(
            offsets.iter().all(|o| *o == rdkafka::Offset::Invalid),
            "{group} committed {offsets:?}"
        );
    }
    let topics = topics_under(brokers, prefix).await;
    assert!(
        topics.contains(&format!("{prefix}__orchestrator.retry.keeper")),
        "{topics:?}"
    );
    assert!(
        !topics.iter().any(|t| t.contains("retry.tail")),
        "an ephemeral group's own retry topic: {topics:?}"
    );
}
