//! A RabbitMQ restart in the middle of a 10,000-event run loses nothing.
//!
//! The broker is the machine's shared one, restarted with `rabbitmqctl stop_app` /
//! `start_app` (the Erlang node stays up). A guard runs `start_app` and waits for the broker
//! however the test ends, panics included. This file holds this one test only, so that no
//! other RabbitMQ test runs while the broker is down (cargo runs test binaries one after
//! another).
//!
//! Also checked on the way: a publish while the broker is down fails, after its publish
//! timeout, with a temporary `Error::Backend` (it does not vanish), and a retry scheduled
//! with a nack before the restart is delivered after it (the retry queue is durable).
#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrator_backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use orchestrator_core::testkit::services;
use orchestrator_core::{Error, EventEnvelope, EventId, SubscribeOptions, Transport};
use serde_json::json;
use tokio::time::timeout;

const EVENTS: usize = 10_000;
const BATCH: usize = 100;

/// Restarts the broker's app; its `Drop` makes sure `start_app` ran and the broker answers.
struct BrokerRestart {
    stopped: bool,
}

impl BrokerRestart {
    fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
        let out = Command::new("rabbitmqctl")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
        Self::rabbitmqctl(&["stop_app"]).unwrap();
    }

    fn start(&mut self) {
        Self::rabbitmqctl(&["start_app"]).unwrap();
        Self::rabbitmqctl(&["await_startup", "--timeout", "120"]).unwrap();
        self.stopped = false;
    }
}

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        if self.stopped {
            // Whatever happened, leave the shared broker running.
            for _ in 0..3 {
                if Self::rabbitmqctl(&["start_app"]).is_ok()
                    && Self::rabbitmqctl(&["await_startup", "--timeout", "120"]).is_ok()
                {
                    return;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            eprintln!("could not restart RabbitMQ: run `rabbitmqctl start_app`");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_nothing() {
    let prefix = format!("test.restart.{}", uuid::Uuid::now_v7().simple());
    let config = RabbitMqConfig::new(services::amqp_url())
        .with_exchange(format!("{prefix}.events"))
        .with_queue_prefix(&prefix)
        .with_queue_expiry(Duration::from_secs(600))
        .with_connect_timeout(Duration::from_secs(60))
        .with_publish_timeout(Duration::from_secs(90))
        .with_reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let transport = match RabbitMqTransport::connect(config.clone()).await {
        Ok(transport) => transport,
        Err(error) => {
            services::unreachable("RabbitMQ", config.url(), &error);
            return;
        }
    };
    if let Err(why) = BrokerRestart::rabbitmqctl(&["status"]) {
        services::unreachable("rabbitmqctl", "the local node", &why);
        return;
    }
    // A second transport whose publishes give up after half a second.
    let impatient = RabbitMqTransport::connect(
        config
            .clone()
            .with_publish_timeout(Duration::from_millis(500))
            .with_reconnect_backoff(Duration::from_millis(50), Duration::from_millis(100)),
    )
    .await
    .unwrap();

    let topic = format!("t{}.work.item", uuid::Uuid::now_v7().simple());
    let group = format!("g{}", uuid::Uuid::now_v7().simple());
    let delayed_group = format!("d{}", uuid::Uuid::now_v7().simple());
    let delayed_topic = format!("t{}.delayed", uuid::Uuid::now_v7().simple());
    let mut sub = transport
        .subscribe(SubscribeOptions::new(&group, &topic).unwrap().prefetch(500))
        .await
        .unwrap();
    let mut delayed = transport
        .subscribe(SubscribeOptions::new(&delayed_group, &delayed_topic).unwrap())
        .await
        .unwrap();

    let events: Vec<EventEnvelope> = (0..EVENTS)
        .map(|i| EventEnvelope::new(&topic, &json!({ "seq": i })).unwrap())
        .collect();
    let want: Vec<EventId> = events.iter().map(|e| e.id().clone()).collect();

    let received = Arc::new(AtomicUsize::new(0));
    let consumer = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<EventId, u32> = HashMap::new();
            let (mut flagged, mut ack_errors) = (0_usize, 0_usize);
            while seen.len() < EVENTS {
                let delivery = sub.next().await.unwrap().unwrap();
                if delivery.attempt() > 1 {
                    flagged += 1;
                }
                *seen.entry(delivery.event().id().clone()).or_default() += 1;
                received.store(seen.len(), Ordering::SeqCst);
                if delivery.ack().await.is_err() {
                    ack_errors += 1;
                }
            }
            (seen, flagged, ack_errors)
        })
    };
    let publisher = {
        let transport = transport.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for batch in events.chunks(BATCH) {
                // A failed batch is published again: nothing may be lost.
                loop {
                    match transport.publish_batch(&topic, batch.to_vec()).await {
                        Ok(()) => break,
                        Err(error) => {
                            assert!(error.is_temporary(), "{error}");
                            errors.push(error.to_string());
                        }
                    }
                }
            }
            errors
        })
    };

    // A retry scheduled before the restart, due while the broker is down or after.
    let delayed_event = EventEnvelope::new(&delayed_topic, &json!({"retry": true})).unwrap();
    transport
        .publish(&delayed_topic, delayed_event.clone())
        .await
        .unwrap();
    let first = timeout(Duration::from_secs(20), delayed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    first
        .nack(Duration::from_secs(4), "retry after the restart")
        .await
        .unwrap();
    // No consumer of the group until the broker is back: the retry must wait in the broker's
    // durable queues across the restart. (A consumer left open would be handed the retry as
    // soon as it is due — before the restart, on a loaded machine — and the broker would take
    // it back unsettled when the connection drops, so it would come again flagged as
    // redelivered: attempt 3.)
    drop(delayed);

    let mut broker = BrokerRestart { stopped: false };
    let started = Instant::now();
    while received.load(Ordering::SeqCst) < EVENTS / 4 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run did not get going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_stop = received.load(Ordering::SeqCst);
    let stopper = tokio::task::spawn_blocking(move || {
        broker.stop();
        broker
    });
    let mut broker = stopper.await.unwrap();

    let down = impatient
        .publish(
            &topic,
            EventEnvelope::new(&topic, &json!({"down": true})).unwrap(),
        )
        .await;
    assert!(
        matches!(
            down,
            Err(Error::Backend {
                backend: "rabbitmq",
                temporary: true,
                ..
            })
        ),
        "a publish while the broker is down: {down:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker_restart = tokio::task::spawn_blocking(move || {
        broker.start();
        broker
    });
    let broker = broker_restart.await.unwrap();
    let downtime = started.elapsed();

    let publish_errors = timeout(Duration::from_secs(180), publisher)
        .await
        .expect("every batch published in time")
        .unwrap();
    let Ok(joined) = timeout(Duration::from_secs(180), consumer).await else {
        panic!(
            "only {} of {EVENTS} events received within 180 s of the restart",
            received.load(Ordering::SeqCst)
        );
    };
    let (seen, flagged, ack_errors) = joined.unwrap();
    let missing = want.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "restart run: {EVENTS} events, {at_stop} received before stop_app, run took {:?} \
         (broker back after {downtime:?}); {missing} missing, {duplicates} duplicate deliveries \
         ({flagged} flagged as redeliveries), {ack_errors} acks lost to the restart, {} \
         publish errors retried: {:?}; {} messages republished by the transport",
        started.elapsed(),
        publish_errors.len(),
        publish_errors.first(),
        transport.republished_messages()
    );
    assert_eq!(missing, 0, "events lost in the restart");
    assert_eq!(seen.len(), EVENTS);
    // Duplicates come only from acks lost with the connection (the broker redelivers) or
    // from messages published again after an unconfirmed publish: by this test after an
    // error, or by the transport itself when a connection dropped before the confirms came.
    let republished = transport.republished_messages() as usize;
    assert!(
        (duplicates as usize) <= ack_errors + flagged + publish_errors.len() * BATCH + republished,
        "{duplicates} duplicates unexplained ({republished} republished by the transport)"
    );

    let mut delayed = transport
        .subscribe(SubscribeOptions::new(&delayed_group, &delayed_topic).unwrap())
        .await
        .unwrap();
    let retried = timeout(Duration::from_secs(30), delayed.next())
        .await
        .expect("the retry scheduled before the restart arrives")
        .unwrap()
        .unwrap();
    assert_eq!(retried.event().id(), delayed_event.id());
    assert_eq!(retried.attempt(), 2);
    assert_eq!(retried.last_error(), Some("retry after the restart"));
    retried.ack().await.unwrap();

    drop(delayed);
    drop(broker);
    transport.delete_topology().await.unwrap();
    transport.close().await;
    impatient.close().await;
}
