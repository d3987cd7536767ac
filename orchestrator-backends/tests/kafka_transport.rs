//! `KafkaTransport` against the live broker: the transport conformance suite, plus what only a
//! broker can get wrong — messages written by other clients, redelivery to unknown groups.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kafka_support;

use std::time::Duration;

use kafka_support::{Cleanup, config, random_prefix, reachable};
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
    let prefix = random_prefix();
    let Some((brokers, _probe)) = reachable(&prefix).await else {
        return;
    };
    let _cleanup = Cleanup::new(&brokers, &prefix);
    let case = std::sync::atomic::AtomicUsize::new(0);
    run_all(|| {
        // Each case gets a dead-letter topic of its own (the dead-letter cases count letters).
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = config(&brokers, &format!("{prefix}c{n}."));
        async move { KafkaTransport::connect(config).await.unwrap() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_competing() {
    let prefix = random_prefix();
    let Some((brokers, t)) = reachable(&prefix).await else {
        return;
    };
    let _cleanup = Cleanup::new(&brokers, &prefix);
    orchestrator_core::testkit::transport::competing_consumers_share_a_group(&t).await;
}
