//! The original design's order processing saga: validate, payment (with a refund as its
//! compensation), shipping. One order goes through; the next fails at shipping, and the
//! payment is refunded.
//!
//! Run it with `cargo run --example order_saga`.

use orchestrator::prelude::*;
use serde_json::{Value, json};

/// What went wrong shipping an order.
#[derive(Debug)]
struct ShippingError(String);

impl std::fmt::Display for ShippingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShippingError {}

async fn validate_order(context: Value) -> Result<Value, HandlerError> {
    println!(
        "  [validate] order {} for {}",
        context["order_id"], context["amount"]
    );
    if context["amount"]
        .as_f64()
        .is_none_or(|amount| amount <= 0.0)
    {
        return Err(HandlerError::permanent("the amount must be positive"));
    }
    Ok(json!({ "valid": true }))
}

async fn process_payment(context: Value) -> Result<Value, HandlerError> {
    let transaction = format!("TXN-{}", context["order_id"].as_str().unwrap_or("?"));
    println!("  [payment] charged {} -> {transaction}", context["amount"]);
    Ok(json!({ "transaction_id": transaction }))
}

async fn refund_payment(context: Value) -> Result<(), HandlerError> {
    println!(
        "  [payment: compensate] refunded {}",
        context["transaction_id"]
    );
    Ok(())
}

// Any error type works: here a domain error of our own.
async fn ship_order(context: Value) -> Result<Value, ShippingError> {
    let country = context["country"].as_str().unwrap_or("?");
    if country != "NL" {
        println!("  [shipping] cannot ship to {country}");
        return Err(ShippingError(format!("no carrier delivers to {country}")));
    }
    println!("  [shipping] handed to the carrier");
    Ok(json!({ "tracking_number": "TRACK123" }))
}

fn report(outcome: &SagaOutcome) {
    println!("  => {}", outcome.status);
    println!("     completed steps: {:?}", outcome.completed_steps);
    if let Some(failure) = &outcome.failure {
        println!("     failed at `{}`: {}", failure.step, failure.error);
        println!("     compensated: {:?}", outcome.compensated_steps);
    }
    println!("     final context: {}", outcome.context);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orchestrator = EventOrchestrator::new();
    orchestrator.define_saga(
        "order_processing",
        vec![
            SagaStep::new("validate", validate_order),
            SagaStep::new("payment", process_payment).with_compensation(refund_payment),
            SagaStep::new("shipping", ship_order),
        ],
    )?;

    println!("order ORDER123, shipped to NL:");
    let shipped = orchestrator
        .start_saga(
            "order_processing",
            json!({ "order_id": "ORDER123", "amount": 99.99, "country": "NL" }),
        )
        .await?;
    report(&shipped);
    assert_eq!(shipped.status, SagaStatus::Completed);

    println!("\norder ORDER124, shipped to Atlantis:");
    let refunded = orchestrator
        .start_saga(
            "order_processing",
            json!({ "order_id": "ORDER124", "amount": 25.0, "country": "Atlantis" }),
        )
        .await?;
    report(&refunded);
    assert_eq!(refunded.status, SagaStatus::Compensated);

    // Every transition was logged to the store before the saga moved on.
    println!(
        "\nthe saga log of ORDER124 (stream {}):",
        refunded.id.stream()
    );
    for record in orchestrator
        .store()
        .read_stream(&refunded.id.stream(), 1, 100)
        .await?
    {
        println!(
            "  {} {}",
            record.time().format("%H:%M:%S%.3f"),
            record.event_type()
        );
    }
    Ok(())
}
