//! The metrics orchestrator records, exposed with `metrics-exporter-prometheus`: events
//! published and handled (one retried, then dead-lettered), a saga, commands and cached
//! queries — then the Prometheus text exposition, printed to stdout.
//!
//! A service would serve it on `/metrics` instead (the exporter's `http-listener` feature,
//! or `PrometheusHandle::render` from its own HTTP server).
//!
//! Run it with `cargo run --example prometheus_metrics`.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use orchestrator::prelude::*;
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    orchestrator::metrics::describe();

    let orchestrator = EventOrchestrator::builder()
        .retry_policy(RetryPolicy::exponential(2, Duration::from_millis(5)))
        .build()
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("order.#").named("orders"),
            move |_event: EventEnvelope| {
                let tx = tx.clone();
                async move {
                    tx.send(()).ok();
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await?;
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("payment.requested").named("payments"),
            |_event: EventEnvelope| async { Err::<(), _>(HandlerError::retryable("gateway down")) },
        )
        .await?;
    for n in 0..3 {
        orchestrator
            .publish_event("order.placed", json!({ "order_id": n }))
            .await?;
    }
    orchestrator
        .publish_event("payment.requested", json!({ "order_id": 0 }))
        .await?;
    for _ in 0..3 {
        rx.recv().await;
    }
    let dead_letters = orchestrator.dead_letters();
    while dead_letters.count().await? == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    orchestrator.define_saga(
        "checkout",
        vec![SagaStep::new("reserve", |_: Value| async {
            Ok::<_, HandlerError>(json!({ "reserved": true }))
        })],
    )?;
    orchestrator.start_saga("checkout", json!({})).await?;

    orchestrator.register_command_handler("create_user", |_: Value| async {
        Ok::<_, HandlerError>(json!({ "user_id": "USER123" }))
    })?;
    orchestrator.register_query_handler("get_user", |params: Value| async move {
        Ok::<_, HandlerError>(json!({ "user_id": params["user_id"], "name": "John" }))
    })?;
    orchestrator
        .send_command("create_user", json!({ "name": "John" }))
        .await?;
    for _ in 0..3 {
        orchestrator
            .execute_query("get_user", json!({ "user_id": "USER123" }))
            .await?;
    }

    // The orchestrator's series (summaries by their count and sum, not their quantiles).
    for line in prometheus.render().lines() {
        if line.starts_with("orchestrator_") && !line.contains("quantile=") {
            println!("{line}");
        }
    }
    Ok(())
}
