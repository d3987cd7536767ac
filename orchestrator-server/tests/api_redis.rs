//! The API against a live server on Redis (store, transport and dead-letter queue), under
//! a key prefix of its own, deleted at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use orchestrator::backends::redis::{RedisConfig, RedisEventStore, RedisTransport};
use orchestrator::core::testkit::services::{redis_url, unreachable};
use orchestrator::prelude::*;

/// A config under a prefix of its own, or `None` (after saying why) when Redis is down.
async fn config(prefix: &str) -> Option<RedisConfig> {
    let url = redis_url();
    let config = RedisConfig::new(&url)
        .unwrap()
        .with_prefix(prefix.to_owned())
        .with_retry_for(Duration::from_secs(2));
    match tokio::time::timeout(
        Duration::from_secs(10),
        RedisTransport::connect(config.clone()),
    )
    .await
    {
        Ok(Ok(_)) => Some(config),
        Ok(Err(error)) => {
            unreachable("Redis", &url, &error);
            None
        }
        Err(elapsed) => {
            unreachable("Redis", &url, &elapsed);
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_tells_the_story_of_a_redis_orchestrator() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("server-api-{nanos:x}-{}:", std::process::id());
    let Some(config) = config(&prefix).await else {
        return;
    };
    let store = Arc::new(RedisEventStore::connect(config.clone()).await.unwrap());
    let transport = Arc::new(RedisTransport::connect(config.clone()).await.unwrap());
    let orchestrator = EventOrchestrator::builder()
        .store(store.clone())
        .transport(transport.clone())
        .build()
        .await
        .unwrap();

    support::api_story(orchestrator.clone(), "redis").await;

    orchestrator.shutdown(Duration::from_secs(5)).await;
    transport.delete_all().await.unwrap();
    store.delete_all().await.unwrap();
}
