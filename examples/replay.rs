//! Event replay: events kept by the embedded durable store survive a restart, and a
//! subscriber added later catches up by replaying them — all of a type, or those of the
//! last hour.
//!
//! Run it with `cargo run --example replay`.

use std::time::{Duration, SystemTime};

use orchestrator::prelude::*;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store_url = format!("file://{}", dir.path().display());

    // A first run records some orders: two completed yesterday, three in the last minutes.
    {
        let orchestrator = EventOrchestrator::builder()
            .store_url(&store_url)
            .build()
            .await?;
        let yesterday = chrono::Utc::now() - chrono::Duration::days(1);
        for n in 1..=5 {
            let mut completed = EventEnvelope::new(
                "order.completed",
                &json!({ "order_id": format!("ORDER{n}") }),
            )?;
            if n <= 2 {
                completed = completed.with_time(yesterday);
            }
            orchestrator.publish(completed).await?;
            orchestrator
                .publish_event("user.created", json!({ "user_id": n }))
                .await?;
        }
        println!("first run: published 5 orders and 5 users to {store_url}");
        orchestrator.shutdown(Duration::from_secs(1)).await;
    }

    // After a restart, a new report subscribes: it missed everything, so it replays.
    let orchestrator = EventOrchestrator::builder()
        .store_url(&store_url)
        .build()
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    orchestrator
        .subscribe("order.completed", move |event: EventEnvelope| {
            let tx = tx.clone();
            async move {
                let order: serde_json::Value = event.data()?;
                println!(
                    "  report: {} completed at {} (position {:?})",
                    order["order_id"],
                    event.time().format("%Y-%m-%d %H:%M"),
                    event.global_position()
                );
                tx.send(()).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await?;

    println!("replaying the orders of the last hour:");
    let recent = orchestrator
        .replay_events(
            ReplayFilter::event_type("order.completed")
                .from_time(SystemTime::now() - Duration::from_secs(3600)),
        )
        .await?;
    for _ in 0..recent {
        rx.recv().await;
    }
    println!("  -> {recent} replayed");

    println!("replaying every order, with progress:");
    let all = orchestrator
        .replay_events_with_progress("order.completed", move |progress| {
            if progress.done {
                println!(
                    "  progress: {} delivered, position {}/{}",
                    progress.processed, progress.position, progress.end_position
                );
            }
        })
        .await?;
    for _ in 0..all {
        rx.recv().await;
    }
    println!("  -> {all} replayed");
    assert_eq!((recent, all), (3, 5));
    Ok(())
}
