//! Publish a few events on the embedded default and watch handlers run, retry and
//! dead-letter.
//!
//! Run it with `cargo run --example quickstart`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use orchestrator::prelude::*;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The embedded default (in-process transport, in-memory store), with quick retries.
    let orchestrator = EventOrchestrator::builder()
        .retry_policy(RetryPolicy::exponential(3, Duration::from_millis(20)))
        .build()
        .await?;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<String>(16);

    // A handler for one event type.
    let done = done_tx.clone();
    orchestrator
        .subscribe("user.created", move |event: EventEnvelope| {
            let done = done.clone();
            async move {
                let user: serde_json::Value = event.data()?;
                println!("user created: {} ({})", user["username"], event.id());
                done.send("user.created".into()).await.ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await?;

    // A handler for every order event, by pattern.
    let done = done_tx.clone();
    orchestrator
        .subscribe("order.#", move |event: EventEnvelope| {
            let done = done.clone();
            async move {
                println!(
                    "order event {}: {}",
                    event.event_type(),
                    event.data::<serde_json::Value>()?
                );
                done.send(event.event_type().to_owned()).await.ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await?;

    // A handler that fails: it is retried with backoff, then dead-lettered.
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = attempts.clone();
    orchestrator
        .subscribe("payment.requested", move |_event: EventEnvelope| {
            let seen = seen.clone();
            async move {
                let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                println!("payment handler: attempt {n} fails");
                Err::<(), _>(HandlerError::retryable("payment gateway unreachable"))
            }
        })
        .await?;

    orchestrator
        .publish_event(
            "user.created",
            json!({"user_id": "123", "username": "john_doe"}),
        )
        .await?;
    orchestrator
        .publish_event(
            "order.placed",
            json!({"order_id": "ORDER123", "amount": 99.99}),
        )
        .await?;
    orchestrator
        .publish_event(
            "order.shipped",
            json!({"order_id": "ORDER123", "tracking": "TRACK123"}),
        )
        .await?;
    orchestrator
        .publish_event("payment.requested", json!({"order_id": "ORDER123"}))
        .await?;

    for _ in 0..3 {
        done_rx.recv().await;
    }
    // Wait until the failing event reaches the dead-letter queue.
    let dlq = orchestrator.dead_letters();
    while dlq.count().await? == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for letter in dlq.list(&DeadLetterQuery::default()).await? {
        println!(
            "dead letter: {} after {} attempts: {}",
            letter.event.event_type(),
            letter.attempts,
            letter.reason
        );
    }

    let stored = orchestrator.store().read_all(ReadAll::from(0, 100)).await?;
    println!("event store holds {} events", stored.len());
    Ok(())
}
