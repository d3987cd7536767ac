//! The orchestrator on Redis Streams: events published through Redis, the event store and
//! the saga logs in Redis, dead letters in Redis.
//!
//! Needs a Redis at `ORCHESTRATOR_REDIS_URL` (default `redis://127.0.0.1:6379`; `cargo xtask
//! services up` starts one). Run it with
//! `cargo run --example redis_backend --features redis`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use orchestrator::backends::redis::{RedisConfig, RedisEventStore, RedisTransport};
use orchestrator::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("ORCHESTRATOR_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    // Every key of this run under its own prefix, deleted at the end.
    let config = RedisConfig::new(&url)?
        .with_prefix(format!("{}:", common::run_name()))
        .with_retry_for(Duration::from_secs(5));
    let store = RedisEventStore::connect(config.clone()).await?;
    let transport = RedisTransport::connect(config).await?;
    let orchestrator = EventOrchestrator::builder()
        .store(Arc::new(store.clone()))
        .transport(Arc::new(transport.clone()))
        .build()
        .await?;
    // Or, with default key names: .store_url("redis://…").transport_url("redis://…").

    let toured = common::tour(&orchestrator).await;
    transport.close().await;
    transport.delete_all().await?;
    store.delete_all().await?;
    toured
}
