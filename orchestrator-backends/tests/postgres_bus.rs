//! The event bus (`orchestrator_bus::EventBus`) running on `PostgresTransport`: handlers,
//! retries with backoff, dead letters and their reprocessing behave as in process.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bus_story;
mod postgres_support;

use std::sync::Arc;

use orchestrator_backends::postgres::PostgresTransport;
use postgres_support::{Cleanup, config, random_schema, reachable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_bus_runs_on_postgres() {
    let Some(url) = reachable().await else { return };
    let prefix = random_schema();
    let _cleanup = Cleanup::new(&url, &prefix);
    let transport = PostgresTransport::connect(config(&url, &prefix))
        .await
        .unwrap();
    bus_story::billing(Arc::new(transport.clone())).await;
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_bus_conformance_cases_pass_on_postgres() {
    let Some(url) = reachable().await else { return };
    let prefix = random_schema();
    let _cleanup = Cleanup::new(&url, &prefix);
    let transport = PostgresTransport::connect(config(&url, &prefix))
        .await
        .unwrap();
    orchestrator_bus::testkit::run_all(Arc::new(transport.clone())).await;
    transport.close().await;
}
