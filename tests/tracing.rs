//! OpenTelemetry across the in-process transport: one trace from a publish to its handler,
//! and on into the sagas and commands the handler runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use orchestrator::prelude::*;
use serde_json::{Value, json};
use support::{assert_one_trace, record_traces};

#[tokio::test]
async fn one_trace_from_publish_to_handler() {
    let traces = record_traces();
    let orchestrator = EventOrchestrator::new();
    assert_one_trace(&orchestrator, &traces, "user.created").await;
}

#[tokio::test]
async fn publish_joins_the_callers_trace() {
    let traces = record_traces();
    let orchestrator = EventOrchestrator::new();
    let request = tracing::info_span!("http.request");
    let _entered = request.enter();
    orchestrator
        .publish_event("user.created", json!({}))
        .await
        .unwrap();
    drop(_entered);
    drop(request);
    let root = traces.wait_for("http.request", 1).await.remove(0);
    let publish = traces.wait_for("orchestrator.publish", 1).await.remove(0);
    assert_eq!(
        publish.span_context.trace_id(),
        root.span_context.trace_id()
    );
    assert_eq!(publish.parent_span_id, root.span_context.span_id());
}

#[tokio::test]
async fn the_trace_runs_on_into_sagas_and_commands() {
    let traces = record_traces();
    let orchestrator = EventOrchestrator::new();
    orchestrator
        .register_command_handler("charge", |_: Value| async {
            Ok::<_, HandlerError>(json!({"charged": true}))
        })
        .unwrap();
    let commands = orchestrator.clone();
    orchestrator
        .define_saga(
            "checkout",
            vec![SagaStep::new("charge", move |_: Value| {
                let commands = commands.clone();
                async move { commands.send_command("charge", json!({})).await }
            })],
        )
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sagas = orchestrator.clone();
    orchestrator
        .subscribe("order.placed", move |_event: EventEnvelope| {
            let (sagas, tx) = (sagas.clone(), tx.clone());
            async move {
                let outcome = sagas.start_saga("checkout", json!({})).await?;
                tx.send(outcome.status).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    orchestrator
        .publish_event("order.placed", json!({}))
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap();
    assert_eq!(status, Some(SagaStatus::Completed));

    let publish = traces.wait_for("orchestrator.publish", 1).await.remove(0);
    let handle = traces.wait_for("orchestrator.handle", 1).await.remove(0);
    let saga = traces.wait_for("saga", 1).await.remove(0);
    let steps = traces.wait_for("saga.step", 1).await;
    let command = traces.wait_for("cqrs.command", 1).await.remove(0);
    let trace_id = publish.span_context.trace_id();
    let traces_seen: HashSet<_> = [&handle, &saga, &command]
        .into_iter()
        .chain(&steps)
        .map(|s| s.span_context.trace_id())
        .collect();
    assert_eq!(
        traces_seen,
        HashSet::from([trace_id]),
        "one trace throughout"
    );
    assert_eq!(saga.parent_span_id, handle.span_context.span_id());
    assert!(
        steps
            .iter()
            .any(|s| s.span_context.span_id() == command.parent_span_id),
        "the command runs under a saga step"
    );
}

#[tokio::test]
async fn without_an_opentelemetry_layer_nothing_is_injected() {
    let orchestrator = EventOrchestrator::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    orchestrator
        .subscribe("user.created", move |event: EventEnvelope| {
            let tx = tx.clone();
            async move {
                tx.send(event).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    orchestrator
        .publish_event("user.created", json!({}))
        .await
        .unwrap();
    let event = rx.recv().await.unwrap();
    assert!(event.trace_context().is_none());
}
