//! One trace from a publish, through RabbitMQ, to the handler.
#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use orchestrator::backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use orchestrator::core::testkit::services::{amqp_url, unreachable};
use orchestrator::prelude::*;
use support::{assert_one_trace, record_traces, unique};

#[tokio::test]
async fn one_trace_from_publish_through_rabbitmq_to_handler() {
    let url = amqp_url();
    let name = unique("trace");
    let config = RabbitMqConfig::new(&url)
        .with_exchange(format!("{name}.events"))
        .with_queue_prefix(&name)
        .with_connect_timeout(Duration::from_secs(5));
    let transport = match RabbitMqTransport::connect(config).await {
        Ok(transport) => transport,
        Err(error) => return unreachable("RabbitMQ", &url, &error),
    };
    let traces = record_traces();
    let orchestrator = EventOrchestrator::builder()
        .transport(Arc::new(transport.clone()))
        .build()
        .await
        .unwrap();
    assert_one_trace(&orchestrator, &traces, "trace.checked").await;
    orchestrator.shutdown(Duration::from_secs(5)).await;
    transport.delete_topology().await.unwrap();
    transport.close().await;
}
