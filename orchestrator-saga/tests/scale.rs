//! Many sagas at once, under a concurrency limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use orchestrator_core::HandlerError;
use orchestrator_saga::{SagaDefinition, SagaOrchestrator, SagaStatus, SagaStep};
use orchestrator_store::InMemoryEventStore;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_sagas_finish_with_the_right_outcomes() {
    const SAGAS: u64 = 10_000;
    let orch = SagaOrchestrator::builder(Arc::new(InMemoryEventStore::new()))
        .max_concurrent(1_000)
        .build();
    let refunds = Arc::new(AtomicUsize::new(0));
    let refunded = refunds.clone();
    orch.define(
        SagaDefinition::new(
            "order",
            vec![
                SagaStep::new("validate", |c: Value| async move {
                    Ok::<_, HandlerError>(json!({"valid": c["n"].as_u64().is_some()}))
                }),
                SagaStep::new("payment", |c: Value| async move {
                    tokio::task::yield_now().await;
                    Ok::<_, HandlerError>(json!({"txn": format!("TXN{}", c["n"])}))
                })
                .with_compensation(move |_: Value| {
                    let refunded = refunded.clone();
                    async move {
                        refunded.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, HandlerError>(())
                    }
                }),
                SagaStep::new("shipping", |c: Value| async move {
                    if c["n"].as_u64().unwrap().is_multiple_of(10) {
                        return Err(HandlerError::permanent("cannot ship"));
                    }
                    Ok(json!({"tracking": format!("TRACK{}", c["n"])}))
                }),
            ],
        )
        .unwrap(),
    )
    .unwrap();

    let mut handles = Vec::new();
    for n in 0..SAGAS {
        handles.push(orch.start("order", json!({"n": n})).await.unwrap());
    }
    let outcomes = within(futures::future::join_all(
        handles.iter().map(|h| h.outcome()),
    ))
    .await;

    let mut completed = 0;
    for (n, outcome) in (0..SAGAS).zip(outcomes) {
        let outcome = outcome.unwrap();
        if n.is_multiple_of(10) {
            assert_eq!(outcome.status, SagaStatus::Compensated, "saga {n}");
            assert_eq!(outcome.compensated_steps, ["payment"]);
        } else {
            assert_eq!(outcome.status, SagaStatus::Completed, "saga {n}");
            assert_eq!(outcome.context["tracking"], format!("TRACK{n}"));
            completed += 1;
        }
    }
    assert_eq!(completed, 9_000);
    assert_eq!(refunds.load(Ordering::Relaxed), 1_000);
    assert_eq!(orch.list(Some(SagaStatus::Completed)).len(), 9_000);
    assert_eq!(orch.list(Some(SagaStatus::Compensated)).len(), 1_000);
}

#[tokio::test]
async fn the_concurrency_limit_holds() {
    let orch = SagaOrchestrator::builder(Arc::new(InMemoryEventStore::new()))
        .max_concurrent(2)
        .build();
    let gate = Arc::new(Semaphore::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let (step_gate, step_inside) = (gate.clone(), inside.clone());
    orch.define(
        SagaDefinition::new(
            "gated",
            vec![SagaStep::new("enter", move |_: Value| {
                let (gate, inside) = (step_gate.clone(), step_inside.clone());
                async move {
                    inside.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.unwrap().forget();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(Value::Null)
                }
            })],
        )
        .unwrap(),
    )
    .unwrap();
    let mut handles = Vec::new();
    for _ in 0..5 {
        handles.push(orch.start("gated", json!({})).await.unwrap());
    }
    until("two sagas are inside", || {
        inside.load(Ordering::SeqCst) == 2
    })
    .await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        inside.load(Ordering::SeqCst),
        2,
        "no third saga gets a slot"
    );
    assert_eq!(orch.list(Some(SagaStatus::Running)).len(), 5);
    gate.add_permits(5);
    for handle in handles {
        assert!(within(handle.outcome()).await.unwrap().is_completed());
    }
}

#[tokio::test]
async fn finished_sagas_beyond_the_retention_are_forgotten_in_memory_only() {
    let orch = SagaOrchestrator::builder(Arc::new(InMemoryEventStore::new()))
        .retain_finished(3)
        .build();
    let calls = Calls::default();
    orch.define(SagaDefinition::new("s", vec![ok_step(&calls, "a")]).unwrap())
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(orch.run("s", json!({})).await.unwrap().id);
    }
    assert_eq!(orch.list(None).len(), 3);
    assert!(orch.get(ids[0]).is_none());
    assert!(orch.load(ids[0]).await.unwrap().status.is_finished());
}
