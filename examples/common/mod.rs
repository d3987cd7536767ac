//! The tour each backend example takes, whatever carries and keeps the events.

use std::time::Duration;

use orchestrator::prelude::*;
use serde_json::{Value, json};

/// Waits at most this long for a broker round trip.
const PATIENCE: Duration = Duration::from_secs(30);

/// Publishes and handles events, runs a saga, dead-letters an event: on `orchestrator`'s
/// transport and store.
pub(crate) async fn tour(
    orchestrator: &EventOrchestrator,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = orchestrator.store();
    let caps = store.capabilities();
    println!(
        "transport {}, store {} (durable: {}, exact expected versions: {}, atomic batches: {})",
        orchestrator.transport().name(),
        store.name(),
        caps.durable,
        caps.expected_version,
        caps.atomic_batch
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("order.*").named("example-orders"),
            move |event: EventEnvelope| {
                let tx = tx.clone();
                async move {
                    println!(
                        "  handled {} {} (stored at position {:?})",
                        event.event_type(),
                        event.data::<Value>()?,
                        event.global_position()
                    );
                    tx.send(()).ok();
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await?;
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("payment.declined").named("example-payments"),
            |_event: EventEnvelope| async {
                Err::<(), _>(HandlerError::permanent("card declined"))
            },
        )
        .await?;

    orchestrator
        .publish_event("order.placed", json!({ "order_id": "ORDER123" }))
        .await?;
    orchestrator
        .publish_event("order.shipped", json!({ "order_id": "ORDER123" }))
        .await?;
    for _ in 0..2 {
        tokio::time::timeout(PATIENCE, rx.recv()).await?;
    }

    let defined = orchestrator.define_saga(
        "order_processing",
        vec![
            SagaStep::new("payment", |_: Value| async {
                Ok::<_, HandlerError>(json!({ "transaction_id": "TXN123" }))
            })
            .with_compensation(|_: Value| async { Ok::<_, HandlerError>(()) }),
            SagaStep::new("shipping", |_: Value| async {
                Ok::<_, HandlerError>(json!({ "tracking_number": "TRACK123" }))
            }),
        ],
    );
    match defined {
        Ok(()) => {
            let saga = orchestrator
                .start_saga("order_processing", json!({ "order_id": "ORDER123" }))
                .await?;
            println!("  saga {} {}: {}", saga.saga, saga.id, saga.status);
        }
        // Sagas log at exact versions, which this store cannot check: it says so up front.
        Err(refused) if !caps.expected_version => println!("  no sagas on this store: {refused}"),
        Err(other) => return Err(other.into()),
    }

    orchestrator
        .publish_event("payment.declined", json!({ "order_id": "ORDER123" }))
        .await?;
    let dead_letters = orchestrator.dead_letters();
    tokio::time::timeout(PATIENCE, async {
        while dead_letters
            .list(&DeadLetterQuery {
                subscription: Some("example-payments".into()),
                ..DeadLetterQuery::default()
            })
            .await
            .map_or(true, |l| l.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    for letter in dead_letters
        .list(&DeadLetterQuery {
            subscription: Some("example-payments".into()),
            ..DeadLetterQuery::default()
        })
        .await?
    {
        println!(
            "  dead letter {}: {} ({})",
            letter.id,
            letter.event.event_type(),
            letter.reason
        );
        dead_letters.discard(&letter.id).await?;
    }

    println!(
        "  the store holds {} events (events, saga log, relay checkpoints)",
        store.head_position().await?
    );
    orchestrator.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// A name of this run, for keys, queues and topics.
pub(crate) fn run_name() -> String {
    format!("example{}", std::process::id())
}
