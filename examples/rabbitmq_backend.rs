//! The orchestrator on RabbitMQ: events published through a topic exchange, the event store
//! on a stream queue, dead letters in a queue. Sagas are refused on this store (it cannot
//! check exact versions), and the tour says so; keep saga logs in the file or Redis store.
//!
//! Needs a RabbitMQ at `ORCHESTRATOR_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; `cargo xtask services up` starts one). Run it with
//! `cargo run --example rabbitmq_backend --features rabbitmq`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use orchestrator::backends::rabbitmq::{
    RabbitMqConfig, RabbitMqEventStore, RabbitMqStoreConfig, RabbitMqTransport,
};
use orchestrator::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("ORCHESTRATOR_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    // This run's own exchange, queues and stream, deleted at the end.
    let name = common::run_name();
    let store = RabbitMqEventStore::connect(
        RabbitMqStoreConfig::new(&url)
            .with_stream(format!("{name}.event-log"))
            .with_connect_timeout(Duration::from_secs(5)),
    )
    .await?;
    let transport = RabbitMqTransport::connect(
        RabbitMqConfig::new(&url)
            .with_exchange(format!("{name}.events"))
            .with_queue_prefix(&name)
            .with_connect_timeout(Duration::from_secs(5)),
    )
    .await?;
    let orchestrator = EventOrchestrator::builder()
        .store(Arc::new(store.clone()))
        .transport(Arc::new(transport.clone()))
        .build()
        .await?;
    // Or, with default names: .store_url("amqp://…").transport_url("amqp://…").

    let toured = common::tour(&orchestrator).await;
    transport.delete_topology().await?;
    transport.close().await;
    store.delete_log().await?;
    store.close().await;
    toured
}
