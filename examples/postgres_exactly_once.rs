//! An exactly-once read model on PostgreSQL: order totals whose documents and position
//! commit in one transaction per event, so a restart resumes right after the last event
//! whose writes are there — no event counted twice, none missed.
//!
//! Needs a PostgreSQL at `ORCHESTRATOR_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). The run keeps its tables in a schema of its
//! own, dropped at the end. Run it with
//! `cargo run --example postgres_exactly_once --features postgres`.

use std::sync::Arc;

use orchestrator::backends::postgres::{PostgresConfig, PostgresEventStore};
use orchestrator::core::{
    EventEnvelope, EventStore, ExpectedVersion, HandlerError, ReadModelStore, ReadModelStoreExt,
};
use orchestrator::cqrs::{QueryBus, ReadModelDefinition};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The one document of the read model.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Totals {
    orders: u64,
    revenue: u64,
}

/// Adds an order to the totals. It reads, changes and writes back a document: run twice
/// for one event, it would count that order twice — which the transaction rules out.
async fn count_order(
    event: EventEnvelope,
    documents: Arc<dyn ReadModelStore>,
) -> Result<(), HandlerError> {
    let order: serde_json::Value = event.data()?;
    let mut totals: Totals = documents.get_as("totals").await?.unwrap_or_default();
    totals.orders += 1;
    totals.revenue += order["amount"].as_u64().unwrap_or(0);
    documents.put_as("totals", &totals).await?;
    Ok(())
}

/// The read model "order-totals", kept in the store's schema.
fn order_totals(store: &PostgresEventStore) -> orchestrator::core::Result<ReadModelDefinition> {
    let documents: Arc<dyn ReadModelStore> = Arc::new(store.read_model_store("order-totals")?);
    Ok(ReadModelDefinition::new("order-totals", count_order)
        .storage(documents)
        .event_types(["order.placed"]))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("ORCHESTRATOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("example_once{}", std::process::id());
    let store =
        PostgresEventStore::connect(PostgresConfig::new(&url)?.with_schema(schema)?).await?;
    let result = run(&store).await;
    store.drop_schema().await?;
    result
}

async fn run(store: &PostgresEventStore) -> Result<(), Box<dyn std::error::Error>> {
    let mut revenue = 0;
    for n in 1..=40_u64 {
        let amount = 10 * n;
        revenue += amount;
        let placed = EventEnvelope::new("order.placed", &json!({"order": n, "amount": amount}))?;
        store
            .append(
                &format!("order-{n}"),
                ExpectedVersion::NoStream,
                vec![placed],
            )
            .await?;
    }

    // A first process counts the first 25 orders and stops.
    let queries = QueryBus::new();
    let totals = queries
        .attach_read_model(Arc::new(store.clone()), order_totals(store)?)
        .await?;
    totals.wait_for_position(25).await?;
    totals.stop().await;
    let documents = totals.storage().clone();
    println!(
        "first run stopped at position {:?}",
        documents.position().await?
    );

    // A second process resumes from the position committed with the documents.
    let queries = QueryBus::new();
    let totals = queries
        .attach_read_model(Arc::new(store.clone()), order_totals(store)?)
        .await?;
    totals.wait_for_position(40).await?;
    let resumed = totals.stop().await.map(|status| status.applied);
    let counted: Totals = documents.get_as("totals").await?.unwrap_or_default();
    println!("second run applied {resumed:?} events; totals: {counted:?}");
    assert_eq!((counted.orders, counted.revenue), (40, revenue));
    Ok(())
}
