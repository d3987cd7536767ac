//! The orchestrator on Kafka: events published to Kafka topics, the event store on a log
//! topic, dead letters on a compacted topic. Sagas are refused on this store (it cannot
//! check exact versions), and the tour says so; keep saga logs in the file or Redis store.
//!
//! Needs a Kafka-protocol broker at `ORCHESTRATOR_KAFKA_BROKERS` (default `127.0.0.1:9092`;
//! `cargo xtask services up` starts tansu). Run it with
//! `cargo run --example kafka_backend --features kafka`.

mod common;

use std::sync::Arc;

use orchestrator::backends::kafka::{KafkaConfig, KafkaEventStore, KafkaTransport};
use orchestrator::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers =
        std::env::var("ORCHESTRATOR_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    // This run's own topics, deleted at the end.
    let config = KafkaConfig::new(brokers).with_prefix(format!("{}.", common::run_name()))?;
    let store = KafkaEventStore::connect(config.clone()).await?;
    let transport = KafkaTransport::connect(config).await?;
    let orchestrator = EventOrchestrator::builder()
        .store(Arc::new(store.clone()))
        .transport(Arc::new(transport.clone()))
        .build()
        .await?;
    // Or, without a prefix: .store_url("kafka://host:9092").transport_url("kafka://host:9092").

    let toured = common::tour(&orchestrator).await;
    drop(orchestrator);
    transport.delete_all_topics().await?;
    store.delete_topic().await?;
    toured
}
