//! `RabbitMqTransport` against the live broker (`ORCHESTRATOR_AMQP_URL`): the Transport
//! conformance suite, a message that is not a CloudEvent, and reprocessing a dead letter.
//!
//! Every test declares its own exchange and queues under a random prefix and deletes them
//! at the end; the queues also carry `x-expires`, so a failed test leaves nothing for long.
//! The broker-restart test lives alone in `rabbitmq_restart.rs`.
#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod rabbitmq_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use orchestrator_backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport, UNDECODABLE_EVENT_TYPE};
use orchestrator_core::testkit::{services, transport as suite};
use orchestrator_core::{
    DeadLetterQuery, DeliveryStream, Error, EventEnvelope, SubscribeOptions, Transport,
};
use rabbitmq_support::Cleanup;
use serde_json::json;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

fn config(tag: &str) -> RabbitMqConfig {
    let prefix = format!("test.{tag}.{}", uuid::Uuid::now_v7().simple());
    RabbitMqConfig::new(services::amqp_url())
        .with_exchange(format!("{prefix}.events"))
        .with_queue_prefix(prefix)
        .with_queue_expiry(Duration::from_secs(600))
        .with_connect_timeout(Duration::from_secs(5))
        .with_connection_name(format!("orchestrator-test-{tag}"))
}

/// A transport on `config`, or `None` (after reporting why) when the broker is unreachable.
async fn connect(config: RabbitMqConfig) -> Option<RabbitMqTransport> {
    let url = config.url().to_owned();
    match RabbitMqTransport::connect(config).await {
        Ok(transport) => Some(transport),
        Err(error) => {
            services::unreachable("RabbitMQ", &url, &error);
            None
        }
    }
}

/// A cleanup for what a transport on `config` declares beyond its group queues (which
/// expire on their own): the exchanges and the dead-letter queue.
fn cleanup(config: &RabbitMqConfig) -> Cleanup {
    let cleanup = Cleanup::default();
    cleanup
        .queues
        .lock()
        .unwrap()
        .push(config.dead_letter_queue());
    cleanup
        .exchanges
        .lock()
        .unwrap()
        .extend([config.exchange().to_owned(), config.dead_letter_exchange()]);
    cleanup
}

async fn next(stream: &mut Box<dyn DeliveryStream>) -> orchestrator_core::Delivery {
    timeout(WAIT, stream.next())
        .await
        .expect("a delivery in time")
        .expect("next() works")
        .expect("the subscription is open")
}

fn topic(rest: &str) -> String {
    format!("t{}.{rest}", uuid::Uuid::now_v7().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_conformance() {
    let config = config("conformance");
    let Some(first) = connect(config.clone()).await else {
        return;
    };
    let _cleanup = cleanup(&config);
    // Each case gets a fresh transport (fresh connections) on the same exchange and
    // prefix; the handles are kept to delete the topology at the end.
    let made = Arc::new(Mutex::new(vec![first.clone()]));
    suite::run_all(|| {
        let (config, made) = (config.clone(), made.clone());
        async move {
            let transport = RabbitMqTransport::connect(config).await.unwrap();
            made.lock().unwrap().push(transport.clone());
            transport
        }
    })
    .await;
    let made: Vec<_> = made.lock().unwrap().drain(..).collect();
    for transport in &made {
        transport.delete_topology().await.unwrap();
        transport.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_a_cloudevent_is_dead_lettered_and_the_consumer_goes_on() {
    let config = config("bad-message");
    let _cleanup = cleanup(&config);
    let Some(transport) = connect(config).await else {
        return;
    };
    let topic = topic("order.placed");
    let group = format!("g{}", uuid::Uuid::now_v7().simple());
    let mut sub = transport
        .subscribe(SubscribeOptions::new(&group, &topic).unwrap())
        .await
        .unwrap();

    // Another client publishes something that is not a CloudEvent, then a valid one.
    let raw = Connection::connect(&services::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = raw.create_channel().await.unwrap();
    channel
        .basic_publish(
            transport.config().exchange().into(),
            topic.as_str().into(),
            BasicPublishOptions::default(),
            b"this is not json",
            BasicProperties::default().with_content_type("text/plain".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let valid = EventEnvelope::new(&topic, &json!({"order_id": "o-1"})).unwrap();
    transport.publish(&topic, valid.clone()).await.unwrap();

    let delivery = next(&mut sub).await;
    assert_eq!(
        delivery.event().id(),
        valid.id(),
        "the valid event still arrives"
    );
    delivery.ack().await.unwrap();

    let dlq = transport.dead_letter_queue();
    let query = DeadLetterQuery {
        subscription: Some(group.clone()),
        ..DeadLetterQuery::default()
    };
    // The letter is published by a task of the consumer; give it a moment, and keep the
    // consumer reading meanwhile (a message whose parking failed comes back to be parked
    // again; nothing else may arrive).
    let mut letters = Vec::new();
    for _ in 0..50 {
        letters = dlq.list(&query).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        if let Ok(delivery) = timeout(Duration::from_millis(100), sub.next()).await {
            panic!("unexpected delivery: {delivery:?}");
        }
    }
    let [letter] = letters.as_slice() else {
        panic!("expected one dead letter, got {letters:?}");
    };
    assert!(
        letter.reason.contains("not a CloudEvent"),
        "reason: {}",
        letter.reason
    );
    assert_eq!(letter.topic, topic);
    assert_eq!(letter.subscription, group);
    assert_eq!(letter.event.event_type(), UNDECODABLE_EVENT_TYPE);
    assert_eq!(letter.event.data_bytes().as_ref(), b"this is not json");
    assert!(dlq.remove(&letter.id).await.unwrap().is_some());

    drop(sub);
    raw.close(200, "done".into()).await.unwrap();
    transport.delete_topology().await.unwrap();
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_reprocessed_through_redeliver() {
    let config = config("reprocess");
    let _cleanup = cleanup(&config);
    let Some(transport) = connect(config).await else {
        return;
    };
    let topic = topic("invoice.issued");
    let (group, bystander) = (
        format!("g{}", uuid::Uuid::now_v7().simple()),
        format!("b{}", uuid::Uuid::now_v7().simple()),
    );
    let mut sub = transport
        .subscribe(SubscribeOptions::new(&group, &topic).unwrap())
        .await
        .unwrap();
    let mut other = transport
        .subscribe(SubscribeOptions::new(&bystander, &topic).unwrap())
        .await
        .unwrap();
    let event = EventEnvelope::new(&topic, &json!({"invoice": 7}))
        .unwrap()
        .with_correlation_id("c-7");
    transport.publish(&topic, event.clone()).await.unwrap();
    next(&mut other).await.ack().await.unwrap();

    let first = next(&mut sub).await;
    first.nack(Duration::ZERO, "flaky").await.unwrap();
    let second = next(&mut sub).await;
    assert_eq!(second.attempt(), 2);
    second.dead_letter("poison").await.unwrap();

    let dlq = transport.dead_letter_queue();
    let query = DeadLetterQuery {
        subscription: Some(group.clone()),
        ..DeadLetterQuery::default()
    };
    let letters = dlq.list(&query).await.unwrap();
    let [letter] = letters.as_slice() else {
        panic!("expected one dead letter, got {letters:?}");
    };
    assert_eq!((letter.reason.as_str(), letter.attempts), ("poison", 2));

    // Reprocess: take it out of the queue and hand it to its group again.
    let letter = dlq.remove(&letter.id).await.unwrap().unwrap();
    transport
        .redeliver(&letter.subscription, &letter.topic, letter.event.clone())
        .await
        .unwrap();
    let again = next(&mut sub).await;
    assert_eq!(again.event(), &event);
    assert_eq!(again.attempt(), 1, "a reprocessed letter starts over");
    assert_eq!(again.topic(), topic);
    again.ack().await.unwrap();
    assert_eq!(dlq.len().await.unwrap(), 0);
    // The other group does not see the reprocessed event.
    assert!(timeout(Duration::from_secs(1), other.next()).await.is_err());

    drop((sub, other));
    transport.delete_topology().await.unwrap();
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_too_long_for_amqp_are_invalid_input() {
    let config = config("names");
    let _cleanup = cleanup(&config);
    let Some(transport) = connect(config).await else {
        return;
    };
    let long_topic = format!("a.{}", "b".repeat(300));
    let event = EventEnvelope::new("a.b", &1).unwrap();
    assert!(matches!(
        transport.publish(&long_topic, event.clone()).await,
        Err(Error::InvalidInput { .. })
    ));
    let long_group = "g".repeat(300);
    assert!(matches!(
        transport.redeliver(&long_group, "a.b", event).await,
        Err(Error::InvalidInput { .. })
    ));
    transport.delete_topology().await.unwrap();
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_temporary_backend_error() {
    // Port 1 on loopback: nothing listens there.
    let config = RabbitMqConfig::new("amqp://guest:guest@127.0.0.1:1/%2f")
        .with_connect_timeout(Duration::from_millis(500))
        .with_reconnect_backoff(Duration::from_millis(50), Duration::from_millis(100));
    let error = RabbitMqTransport::connect(config).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Backend {
                backend: "rabbitmq",
                temporary: true,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("unreachable"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_bus_conformance_cases_pass_on_rabbitmq() {
    let config = config("bus");
    let Some(transport) = connect(config.clone()).await else {
        return;
    };
    let _cleanup = cleanup(&config);
    orchestrator_bus::testkit::run_all(Arc::new(transport.clone())).await;
    transport.delete_topology().await.unwrap();
    transport.close().await;
}

/// Whether the broker has queue `name` (a passive declare, on a channel of its own: a
/// missing queue closes the channel).
async fn queue_exists(connection: &Connection, name: &str) -> bool {
    let channel = connection.create_channel().await.unwrap();
    let found = channel
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    if found {
        let _ = channel.close(200, "checked".into()).await;
    }
    found
}

/// Waits until the broker has none of `queues` (panics with those left after `WAIT`).
async fn wait_until_deleted(connection: &Connection, queues: &[String]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut left = Vec::new();
        for queue in queues {
            if queue_exists(connection, queue).await {
                left.push(queue.clone());
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An ephemeral group lives as long as its consumer: its work queue and retry queue are
/// deleted when its stream is dropped, and expire (`x-expires`) when its consumer went away
/// without deleting them (its process died); a durable group's queue stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_groups_leave_no_queue_behind() {
    let config = config("ephemeral").with_ephemeral_expiry(Duration::from_millis(1500));
    let cleanup = cleanup(&config);
    let Some(transport) = connect(config.clone()).await else {
        return;
    };
    let connection = Connection::connect(&services::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let topic = topic("tail.seen");
    let group = format!("tail{}", uuid::Uuid::now_v7().simple());
    let work = config.group_queue(&group);
    let retry = config.retry_queue(&group, 32);
    cleanup
        .queues
        .lock()
        .unwrap()
        .extend([work.clone(), retry.clone()]);
    let mut stream = transport
        .subscribe(SubscribeOptions::new(&group, &topic).unwrap().ephemeral())
        .await
        .unwrap();
    transport
        .publish(&topic, EventEnvelope::new(&topic, &json!({})).unwrap())
        .await
        .unwrap();
    next(&mut stream)
        .await
        .nack(Duration::from_millis(20), "again")
        .await
        .unwrap();
    let again = next(&mut stream).await;
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    assert!(queue_exists(&connection, &work).await);
    assert!(queue_exists(&connection, &retry).await, "{retry}");
    drop(stream);
    wait_until_deleted(&connection, &[work, retry]).await;

    // A consumer that goes away without deleting its queue (the process died): the broker
    // deletes it once it has been unused for the expiry.
    let crashed = format!("crashed{}", uuid::Uuid::now_v7().simple());
    let crashed_queue = config.group_queue(&crashed);
    cleanup.queues.lock().unwrap().push(crashed_queue.clone());
    let dying = connect(config.clone()).await.unwrap();
    let stream = dying
        .subscribe(SubscribeOptions::new(&crashed, &topic).unwrap().ephemeral())
        .await
        .unwrap();
    std::mem::forget(stream);
    dying.close().await;
    // Not polled meanwhile: a passive declare counts as a use, which restarts the expiry.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(
        !queue_exists(&connection, &crashed_queue).await,
        "{crashed_queue} expired"
    );

    // A durable group's queue stays while its consumer is away.
    let durable = format!("durable{}", uuid::Uuid::now_v7().simple());
    let durable_queue = config.group_queue(&durable);
    cleanup.queues.lock().unwrap().push(durable_queue.clone());
    let stream = transport
        .subscribe(SubscribeOptions::new(&durable, &topic).unwrap())
        .await
        .unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(queue_exists(&connection, &durable_queue).await);
}
