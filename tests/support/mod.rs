//! Shared by the integration tests: an in-memory OpenTelemetry pipeline, and the check that
//! one trace runs from a publish to its handler.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use orchestrator::opentelemetry;
use orchestrator::prelude::*;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt as _;

/// Spans recorded by an OpenTelemetry layer on this thread, until the guard is dropped.
pub(crate) struct Traces {
    pub(crate) exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

/// Records every span of the current thread (use a current-thread runtime, so that the
/// bus's tasks run on it too).
pub(crate) fn record_traces() -> Traces {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("orchestrator-tests");
    let subscriber = tracing_subscriber::registry()
        .with(orchestrator::tracing_opentelemetry::layer().with_tracer(tracer));
    let guard = tracing::subscriber::set_default(subscriber);
    Traces {
        exporter,
        _provider: provider,
        _guard: guard,
    }
}

impl Traces {
    /// The finished spans named `name`.
    pub(crate) fn named(&self, name: &str) -> Vec<SpanData> {
        self.exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// Waits until `count` spans named `name` have finished.
    pub(crate) async fn wait_for(&self, name: &str, count: usize) -> Vec<SpanData> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let spans = self.named(name);
                if spans.len() >= count {
                    return spans;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {count} `{name}` spans within 30 s"))
    }
}

/// A name no other test run uses.
pub(crate) fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{}x{nanos}", std::process::id())
}

/// Subscribes a handler to `pattern` that forwards every event it gets to the receiver.
pub(crate) async fn collect(
    orchestrator: &EventOrchestrator,
    pattern: &str,
) -> (
    Subscription,
    tokio::sync::mpsc::UnboundedReceiver<EventEnvelope>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let subscription = orchestrator
        .subscribe(pattern, move |event: EventEnvelope| {
            let tx = tx.clone();
            async move {
                tx.send(event).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    (subscription, rx)
}

/// Publishes one event of `event_type` through `orchestrator` and checks that the handler
/// span is a child of the publish span, in one trace, and that the handler saw the
/// `traceparent`.
pub(crate) async fn assert_one_trace(
    orchestrator: &EventOrchestrator,
    traces: &Traces,
    event_type: &str,
) {
    let (_subscription, mut rx) = collect(orchestrator, event_type).await;
    let id = orchestrator
        .publish_event(event_type, json!({"n": 1}))
        .await
        .unwrap();
    let received = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the handler got the event in time")
        .unwrap();
    assert_eq!(*received.id(), id);
    let traceparent = &received
        .trace_context()
        .expect("the event carries a trace context")
        .traceparent;

    let publish = traces.wait_for("orchestrator.publish", 1).await.remove(0);
    let handle = traces.wait_for("orchestrator.handle", 1).await.remove(0);
    let trace_id = publish.span_context.trace_id();
    assert_eq!(handle.span_context.trace_id(), trace_id, "one trace id");
    assert_eq!(
        handle.parent_span_id,
        publish.span_context.span_id(),
        "the handler span is a child of the publish span"
    );
    assert!(handle.parent_span_is_remote);
    assert!(
        traceparent.contains(&trace_id.to_string()),
        "{traceparent} names trace {trace_id}"
    );
}
