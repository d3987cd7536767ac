//! One trace from a publish, through Kafka, to the handler.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use orchestrator::backends::kafka::{KafkaConfig, KafkaTransport};
use orchestrator::core::testkit::services::{kafka_brokers, unreachable};
use orchestrator::prelude::*;
use support::{assert_one_trace, record_traces, unique};

#[tokio::test]
async fn one_trace_from_publish_through_kafka_to_handler() {
    let brokers = kafka_brokers();
    let config = KafkaConfig::new(&brokers)
        .with_prefix(format!("{}.", unique("trace")))
        .unwrap();
    let transport = match KafkaTransport::connect(config).await {
        Ok(transport) => transport,
        Err(error) => return unreachable("Kafka", &brokers, &error),
    };
    let traces = record_traces();
    let orchestrator = EventOrchestrator::builder()
        .transport(Arc::new(transport.clone()))
        .build()
        .await
        .unwrap();
    assert_one_trace(&orchestrator, &traces, "trace.checked").await;
    orchestrator.shutdown(Duration::from_secs(5)).await;
    drop(orchestrator);
    transport.delete_all_topics().await.unwrap();
}
