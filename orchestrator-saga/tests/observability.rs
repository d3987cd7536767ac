//! Metrics through the `metrics` facade and tracing spans per saga and per step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use orchestrator_core::HandlerError;
use orchestrator_saga::telemetry::{
    SAGAS_COMPENSATED, SAGAS_COMPLETED, SAGAS_FAILED, SAGAS_STARTED, STEP_DURATION,
    describe_metrics,
};
use orchestrator_saga::{SagaDefinition, SagaOrchestrator, SagaStatus, SagaStep};
use orchestrator_store::InMemoryEventStore;
use serde_json::{Value, json};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Collects every span's name and its `step` field.
#[derive(Default)]
struct Spans {
    spans: Mutex<Vec<(String, Option<String>)>>,
    next: AtomicU64,
}

struct StepField(Option<String>);

impl Visit for StepField {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "step" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl Subscriber for Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        let mut step = StepField(None);
        attributes.record(&mut step);
        self.spans
            .lock()
            .unwrap()
            .push((attributes.metadata().name().to_owned(), step.0));
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[derive(Clone)]
struct SharedSpans(Arc<Spans>);

impl Subscriber for SharedSpans {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.0.enabled(m)
    }
    fn new_span(&self, a: &Attributes<'_>) -> Id {
        self.0.new_span(a)
    }
    fn record(&self, i: &Id, r: &Record<'_>) {
        self.0.record(i, r)
    }
    fn record_follows_from(&self, i: &Id, f: &Id) {
        self.0.record_follows_from(i, f)
    }
    fn event(&self, e: &Event<'_>) {
        self.0.event(e)
    }
    fn enter(&self, i: &Id) {
        self.0.enter(i)
    }
    fn exit(&self, i: &Id) {
        self.0.exit(i)
    }
}

#[test]
fn sagas_record_metrics_and_spans() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let spans = Arc::new(Spans::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    metrics::with_local_recorder(&recorder, || {
        tracing::subscriber::with_default(SharedSpans(spans.clone()), || {
            describe_metrics();
            runtime.block_on(async {
                let orch = SagaOrchestrator::new(Arc::new(InMemoryEventStore::new()));
                let calls = Calls::default();
                orch.define(
                    SagaDefinition::new(
                        "order",
                        vec![
                            compensated(&calls, ok_step(&calls, "pay")),
                            SagaStep::new("ship", |c: Value| async move {
                                match c["mode"].as_str() {
                                    Some("ok") => Ok(json!({})),
                                    _ => Err(HandlerError::permanent("no")),
                                }
                            }),
                        ],
                    )
                    .unwrap(),
                )
                .unwrap();
                orch.define(
                    SagaDefinition::new(
                        "stuck",
                        vec![
                            ok_step(&calls, "a").with_compensation(|_: Value| async {
                                Err::<(), _>(HandlerError::permanent("cannot undo"))
                            }),
                            failing_step(&calls, "b"),
                        ],
                    )
                    .unwrap(),
                )
                .unwrap();
                let done = orch.run("order", json!({"mode": "ok"})).await.unwrap();
                assert_eq!(done.status, SagaStatus::Completed);
                let undone = orch.run("order", json!({"mode": "fail"})).await.unwrap();
                assert_eq!(undone.status, SagaStatus::Compensated);
                let failed = orch.run("stuck", json!({})).await.unwrap();
                assert_eq!(failed.status, SagaStatus::CompensationFailed);
            });
        });
    });

    let mut counters = std::collections::HashMap::new();
    let mut step_samples = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let saga = key
            .labels()
            .find(|l| l.key() == "saga")
            .map(|l| l.value().to_owned())
            .unwrap();
        match value {
            DebugValue::Counter(n) => {
                *counters.entry((key.name().to_owned(), saga)).or_insert(0) += n;
            }
            DebugValue::Histogram(samples) if key.name() == STEP_DURATION => {
                assert!(key.labels().any(|l| l.key() == "step"));
                step_samples += samples.len();
            }
            _ => {}
        }
    }
    let count = |name: &str, saga: &str| counters.get(&(name.to_owned(), saga.to_owned())).copied();
    assert_eq!(count(SAGAS_STARTED, "order"), Some(2));
    assert_eq!(count(SAGAS_COMPLETED, "order"), Some(1));
    assert_eq!(count(SAGAS_COMPENSATED, "order"), Some(1));
    assert_eq!(count(SAGAS_STARTED, "stuck"), Some(1));
    assert_eq!(count(SAGAS_FAILED, "stuck"), Some(1));
    // order: pay, ship / pay, ship, undo pay; stuck: a, b, undo a.
    assert_eq!(step_samples, 8);

    let spans = spans.spans.lock().unwrap();
    assert_eq!(spans.iter().filter(|(name, _)| name == "saga").count(), 3);
    let steps: Vec<_> = spans
        .iter()
        .filter(|(name, _)| name == "saga.step")
        .filter_map(|(_, step)| step.clone())
        .collect();
    assert_eq!(steps.len(), 8);
    assert!(steps.contains(&"pay".to_owned()) && steps.contains(&"ship".to_owned()));
}
