//! One trace from a publish, through Redis Streams, to the handler.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use orchestrator::backends::redis::{RedisConfig, RedisTransport};
use orchestrator::core::testkit::services::{redis_url, unreachable};
use orchestrator::prelude::*;
use support::{assert_one_trace, record_traces, unique};

#[tokio::test]
async fn one_trace_from_publish_through_redis_to_handler() {
    let url = redis_url();
    let config = RedisConfig::new(&url)
        .unwrap()
        .with_prefix(format!("{}:", unique("trace")))
        .with_retry_for(Duration::from_secs(2));
    let transport = match tokio::time::timeout(
        Duration::from_secs(10),
        RedisTransport::connect(config),
    )
    .await
    {
        Ok(Ok(transport)) => transport,
        Ok(Err(error)) => return unreachable("Redis", &url, &error),
        Err(elapsed) => return unreachable("Redis", &url, &elapsed),
    };
    let traces = record_traces();
    let orchestrator = EventOrchestrator::builder()
        .transport(Arc::new(transport.clone()))
        .build()
        .await
        .unwrap();
    assert_one_trace(&orchestrator, &traces, "trace.checked").await;
    orchestrator.shutdown(Duration::from_secs(5)).await;
    transport.close().await;
    transport.delete_all().await.unwrap();
}
