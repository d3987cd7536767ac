//! The event bus (`orchestrator_bus::EventBus`) running on `RedisTransport`: handlers,
//! retries with backoff, dead letters and their reprocessing behave as in process.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bus_story;
mod redis_support;

use std::sync::Arc;

use orchestrator_backends::redis::RedisTransport;
use redis_support::{Cleanup, config, random_prefix, reachable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_bus_runs_on_redis() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let transport = RedisTransport::connect(config(&url, &prefix))
        .await
        .unwrap();
    bus_story::billing(Arc::new(transport.clone())).await;
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_bus_conformance_cases_pass_on_redis() {
    let Some(url) = reachable().await else { return };
    let prefix = random_prefix();
    let _cleanup = Cleanup::new(&url, &prefix);
    let transport = RedisTransport::connect(config(&url, &prefix))
        .await
        .unwrap();
    orchestrator_bus::testkit::run_all(Arc::new(transport.clone())).await;
    transport.close().await;
}
