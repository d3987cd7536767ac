//! The bus's metrics, read back through a debugging recorder (its own test binary: the
//! recorder is process-global).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use orchestrator_bus::{EventBus, InProcessTransport, SubscriptionConfig, metrics as m};
use orchestrator_core::{EventEnvelope, HandlerError, Jitter, RetryPolicy};
use serde_json::json;

type Entry = (
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
);

struct Snapshot(Vec<Entry>);

fn value<'a>(
    snapshot: &'a Snapshot,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    snapshot.0.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let matches = key.name() == name
            && labels
                .iter()
                .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
        matches.then_some(value)
    })
}

fn counter(snapshotter: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    match value(snapshotter, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

#[tokio::test]
async fn published_delivered_retried_dead_lettered_and_durations_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let bus = EventBus::new(Arc::new(InProcessTransport::new()));
    let policy = RetryPolicy::exponential(3, Duration::from_millis(1)).with_jitter(Jitter::None);
    bus.subscribe_with(
        SubscriptionConfig::new("metric.#")
            .named("metered")
            .retry(policy)
            .filter(|e| e.event_type() != "metric.skip"),
        Arc::new(|e: EventEnvelope| async move {
            if e.event_type() == "metric.fail" {
                return Err(HandlerError::retryable("nope"));
            }
            Ok(())
        }),
    )
    .await
    .unwrap();
    for t in ["metric.ok", "metric.ok", "metric.fail", "metric.skip"] {
        bus.publish(EventEnvelope::new(t, &json!({})).unwrap())
            .await
            .unwrap();
    }
    let tools = bus.dead_letters();
    tokio::time::timeout(Duration::from_secs(10), async {
        while tools.count().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert!(bus.shutdown(Duration::from_secs(5)).await.is_clean());

    // Counters are drained by a snapshot: take one and read everything from it.
    let snapshot = Snapshot(snapshotter.snapshot().into_vec());
    let snapshotter = &snapshot;
    let ok = [("event_type", "metric.ok"), ("subscription", "metered")];
    let fail = [("event_type", "metric.fail"), ("subscription", "metered")];
    let skip = [("event_type", "metric.skip"), ("subscription", "metered")];
    assert_eq!(
        counter(snapshotter, m::PUBLISHED, &[("event_type", "metric.ok")]),
        2
    );
    assert_eq!(counter(snapshotter, m::DELIVERED, &ok), 2);
    assert_eq!(counter(snapshotter, m::DELIVERED, &fail), 3);
    assert_eq!(counter(snapshotter, m::HANDLER_ERRORS, &fail), 3);
    assert_eq!(counter(snapshotter, m::RETRIES, &fail), 2);
    assert_eq!(counter(snapshotter, m::DEAD_LETTERED, &fail), 1);
    assert_eq!(counter(snapshotter, m::FILTERED, &skip), 1);
    match value(snapshotter, m::HANDLER_DURATION, &ok) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 2),
        other => panic!("duration histogram: {other:?}"),
    }
    match value(snapshotter, m::IN_FLIGHT, &[("subscription", "metered")]) {
        Some(DebugValue::Gauge(v)) => assert_eq!(v.into_inner(), 0.0),
        other => panic!("in-flight gauge: {other:?}"),
    }
}
