//! Recovery after a crash at every step boundary, resumed retries and branches, and two
//! runners on one saga.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use orchestrator_core::{
    EventFilter, EventStore, HandlerError, Jitter, ManualClock, ReadAll, RetryPolicy,
};
use orchestrator_saga::{
    Branch, Error, SagaDefinition, SagaId, SagaOrchestrator, SagaStatus, SagaStep,
};
use orchestrator_store::{FileEventStore, InMemoryEventStore};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// Three compensable steps; with `fail`, a fourth that fails.
fn trip(calls: &Calls, fail: bool) -> SagaDefinition {
    let mut steps = vec![
        compensated(calls, ok_step(calls, "a")),
        compensated(calls, ok_step(calls, "b")),
        compensated(calls, ok_step(calls, "c")),
    ];
    if fail {
        steps.push(compensated(calls, failing_step(calls, "d")));
    }
    SagaDefinition::new("trip", steps).unwrap()
}

async fn saga_ids(store: &dyn EventStore) -> Vec<SagaId> {
    let started = EventFilter::all().event_type("saga.started");
    store
        .read_all(ReadAll::from(0, 100).filter(started))
        .await
        .unwrap()
        .iter()
        .map(|e| SagaId::from_stream(e.stream_id().unwrap()).unwrap())
        .collect()
}

/// Crashes at `point`, recovers on a fresh orchestrator, and checks every count.
///
/// `records` lists, in log order, what each append after `saga.started` records (`do:x`
/// for a step's completion or failure, `undo:x` for a compensation) and `None` for the
/// final record. A call whose record is at append `r` ran before the crash iff `r <= k`
/// (the crash is at append `k`), and runs again after recovery iff the saga was durable
/// but that record was not.
async fn crash_and_recover(fail: bool, point: CrashPoint, records: &[Option<&str>]) {
    let inner = InMemoryEventStore::new();
    let calls = Calls::default();
    let crashing = CrashingStore::new(inner.clone(), point);
    let first = SagaOrchestrator::new(crashing.clone());
    first.define(trip(&calls, fail)).unwrap();
    let starter = {
        let first = first.clone();
        tokio::spawn(async move { first.start("trip", json!({"trip": 1})).await })
    };
    crashing.crashed().await;
    first.shutdown();
    starter.abort();

    let second = SagaOrchestrator::new(Arc::new(inner.clone()));
    second.define(trip(&calls, fail)).unwrap();
    let recovery = second.recover().await.unwrap();
    assert!(
        recovery.failed.is_empty(),
        "{point:?}: {:?}",
        recovery.failed
    );

    let (k, durable_through) = match point {
        CrashPoint::Before(k) => (k, k - 1),
        CrashPoint::After(k) => (k, k),
    };
    let saga_durable = durable_through >= 1;
    let finished_durable = durable_through > records.len();
    let expect_resumed = usize::from(saga_durable && !finished_durable);
    assert_eq!(recovery.resumed.len(), expect_resumed, "{point:?}");

    if let Some(saga) = recovery.resumed.first() {
        let outcome = within(saga.outcome()).await.unwrap();
        let expected = if fail {
            SagaStatus::Compensated
        } else {
            SagaStatus::Completed
        };
        assert_eq!(outcome.status, expected, "{point:?}");
        let compensations = if fail { vec!["c", "b", "a"] } else { vec![] };
        assert_eq!(outcome.compensated_steps, compensations, "{point:?}");
    }
    if finished_durable {
        let id = saga_ids(&inner).await[0];
        assert!(second.load(id).await.unwrap().status.is_finished());
    }
    if !saga_durable {
        assert!(saga_ids(&inner).await.is_empty(), "{point:?}");
    }

    for (i, call) in records.iter().enumerate() {
        let Some(call) = call else { continue };
        let r = i + 2; // append 1 is saga.started
        let expected = usize::from(r <= k) + usize::from(saga_durable && r > durable_through);
        assert_eq!(
            calls.count(call),
            expected,
            "{point:?}: {call} ran {:?}",
            calls.list()
        );
        let keys = calls.keys(call);
        assert!(
            keys.windows(2).all(|w| w[0] == w[1]),
            "{point:?}: {call} re-ran with another idempotency key: {keys:?}"
        );
    }
}

#[tokio::test]
async fn recovery_after_a_crash_at_every_boundary_of_a_completing_saga() {
    let records = [Some("do:a"), Some("do:b"), Some("do:c"), None];
    for k in 1..=records.len() + 1 {
        crash_and_recover(false, CrashPoint::Before(k), &records).await;
        crash_and_recover(false, CrashPoint::After(k), &records).await;
    }
}

#[tokio::test]
async fn recovery_after_a_crash_at_every_boundary_of_a_compensating_saga() {
    let records = [
        Some("do:a"),
        Some("do:b"),
        Some("do:c"),
        Some("do:d"),
        Some("undo:c"),
        Some("undo:b"),
        Some("undo:a"),
        None,
    ];
    for k in 1..=records.len() + 1 {
        crash_and_recover(true, CrashPoint::Before(k), &records).await;
        crash_and_recover(true, CrashPoint::After(k), &records).await;
    }
}

#[tokio::test]
async fn a_step_blocked_in_a_parallel_group_resumes_without_rerunning_its_siblings() {
    let store = InMemoryEventStore::new();
    let calls = Calls::default();
    let blocked = Arc::new(AtomicBool::new(true));
    let definition = |calls: &Calls, blocked: Arc<AtomicBool>| {
        let slow_calls = calls.clone();
        let slow = SagaStep::new("slow", move |context: Value| {
            let (calls, blocked) = (slow_calls.clone(), blocked.clone());
            async move {
                calls.push("do:slow".into(), &context);
                if blocked.load(Ordering::SeqCst) {
                    futures::future::pending::<()>().await;
                }
                Ok::<_, HandlerError>(json!({"slow": true}))
            }
        });
        SagaDefinition::builder("group")
            .step(ok_step(calls, "before"))
            .parallel([slow, ok_step(calls, "fast")])
            .step(ok_step(calls, "after"))
            .build()
            .unwrap()
    };
    let first = SagaOrchestrator::new(Arc::new(store.clone()));
    first.define(definition(&calls, blocked.clone())).unwrap();
    let saga = first.start("group", json!({})).await.unwrap();
    until("fast completed", || {
        saga.snapshot().completed_steps.len() == 2
    })
    .await;
    assert_eq!(saga.snapshot().running_steps, ["slow"]);
    first.shutdown();
    assert!(matches!(
        within(saga.outcome()).await,
        Err(Error::Interrupted { .. })
    ));

    blocked.store(false, Ordering::SeqCst);
    let second = SagaOrchestrator::new(Arc::new(store));
    second.define(definition(&calls, blocked)).unwrap();
    let recovery = second.recover().await.unwrap();
    let outcome = within(recovery.resumed[0].outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.completed_steps, ["before", "fast", "slow", "after"]);
    assert_eq!(
        (
            calls.count("do:before"),
            calls.count("do:fast"),
            calls.count("do:slow"),
            calls.count("do:after")
        ),
        (1, 1, 2, 1)
    );
    assert_eq!(calls.keys("do:slow")[0], calls.keys("do:slow")[1]);
}

#[tokio::test]
async fn a_recovered_saga_continues_its_retries_and_keeps_its_branch() {
    let clock = ManualClock::starting_at_epoch();
    let store = InMemoryEventStore::new();
    let calls = Calls::default();
    let prefer_express = Arc::new(AtomicBool::new(true));
    let definition = |calls: &Calls, prefer: Arc<AtomicBool>, recovering: bool| {
        let flaky = SagaStep::new("book", |_: Value| async {
            Err::<Value, _>(HandlerError::retryable("carrier busy"))
        })
        .with_retry(RetryPolicy::exponential(5, Duration::from_secs(60)).with_jitter(Jitter::None));
        let keys = calls.clone();
        let recorder = SagaStep::new("book", move |context: Value| {
            let keys = keys.clone();
            async move {
                keys.push("do:book".into(), &context);
                Ok::<_, HandlerError>(json!({"booked": true}))
            }
        });
        SagaDefinition::builder("ship")
            .branch(
                Branch::new("route")
                    .when(
                        "express",
                        move |_| prefer.load(Ordering::SeqCst),
                        ok_step(calls, "express"),
                    )
                    .otherwise(ok_step(calls, "standard")),
            )
            .step(if recovering { recorder } else { flaky })
            .build()
            .unwrap()
    };
    let first = orchestrator_on(Arc::new(store.clone()), &clock);
    first
        .define(definition(&calls, prefer_express.clone(), false))
        .unwrap();
    let saga = first.start("ship", json!({})).await.unwrap();
    until_sleepers(&clock, 1).await; // in the backoff after attempt 1
    first.shutdown();

    prefer_express.store(false, Ordering::SeqCst);
    let second = orchestrator_on(Arc::new(store), &clock);
    second
        .define(definition(&calls, prefer_express, true))
        .unwrap();
    let recovery = second.recover().await.unwrap();
    let outcome = within(recovery.resumed[0].outcome()).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(calls.count("do:express"), 1, "the recorded arm is kept");
    assert_eq!(calls.count("do:standard"), 0);
    let key = &calls.keys("do:book")[0];
    assert_eq!(
        *key,
        format!("{}:book:2", saga.id()),
        "attempt numbers continue"
    );
}

#[tokio::test]
async fn a_second_runner_on_the_same_saga_is_detected() {
    let store = InMemoryEventStore::new();
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let first = SagaOrchestrator::new(Arc::new(store.clone()));
    first
        .define(
            SagaDefinition::new(
                "race",
                vec![SagaStep::new("step", move |_: Value| {
                    let gate = gate.clone();
                    async move {
                        gate.notified().await;
                        Ok::<_, HandlerError>(json!({"by": "first"}))
                    }
                })],
            )
            .unwrap(),
        )
        .unwrap();
    let saga = first.start("race", json!({})).await.unwrap();
    until("the first runner is in its step", || {
        !saga.snapshot().running_steps.is_empty()
    })
    .await;

    let second = SagaOrchestrator::new(Arc::new(store.clone()));
    second
        .define(
            SagaDefinition::new(
                "race",
                vec![SagaStep::new("step", |_: Value| async {
                    Ok::<_, HandlerError>(json!({"by": "second"}))
                })],
            )
            .unwrap(),
        )
        .unwrap();
    let recovery = second.recover().await.unwrap();
    let outcome = within(recovery.resumed[0].outcome()).await.unwrap();
    assert_eq!(outcome.context["by"], "second");

    release.notify_one();
    let err = within(saga.outcome()).await.unwrap_err();
    let Error::Interrupted { source, .. } = err else {
        panic!("{err}")
    };
    assert!(matches!(*source, Error::Conflict { .. }), "{source}");
    assert_eq!(
        second.load(saga.id()).await.unwrap().status,
        SagaStatus::Completed
    );
}

#[tokio::test]
async fn recovery_reports_sagas_it_cannot_resume() {
    let store = InMemoryEventStore::new();
    let first = SagaOrchestrator::new(Arc::new(store.clone()));
    first
        .define(SagaDefinition::new("lost", vec![stuck_step("wait")]).unwrap())
        .unwrap();
    let saga = first.start("lost", json!({})).await.unwrap();
    first.shutdown();

    let undefined = SagaOrchestrator::new(Arc::new(store.clone()));
    let recovery = undefined.recover().await.unwrap();
    assert!(recovery.resumed.is_empty());
    assert!(matches!(
        &recovery.failed[..],
        [(id, Error::UndefinedSaga { saga: name })] if *id == saga.id() && name == "lost"
    ));

    let changed = SagaOrchestrator::new(Arc::new(store));
    changed
        .define(SagaDefinition::new("lost", vec![stuck_step("renamed")]).unwrap())
        .unwrap();
    let handle = changed.resume(saga.id()).await.unwrap();
    assert_eq!(
        handle.status(),
        SagaStatus::Running,
        "nothing recorded for the old step yet"
    );
    assert!(matches!(
        changed.resume(SagaId::new()).await,
        Err(Error::NotFound { .. })
    ));
    changed.shutdown();
}

#[tokio::test]
async fn a_log_naming_an_unknown_step_is_refused() {
    let store = InMemoryEventStore::new();
    let calls = Calls::default();
    let first = SagaOrchestrator::new(Arc::new(store.clone()));
    first
        .define(
            SagaDefinition::new("evolving", vec![ok_step(&calls, "old"), stuck_step("wait")])
                .unwrap(),
        )
        .unwrap();
    let saga = first.start("evolving", json!({})).await.unwrap();
    until("old completed", || {
        saga.snapshot().completed_steps.len() == 1
    })
    .await;
    first.shutdown();

    let second = SagaOrchestrator::new(Arc::new(store));
    second
        .define(SagaDefinition::new("evolving", vec![ok_step(&calls, "new")]).unwrap())
        .unwrap();
    let recovery = second.recover().await.unwrap();
    assert!(matches!(recovery.failed[0].1, Error::CorruptLog { .. }));
}

#[tokio::test]
async fn a_saga_survives_a_restart_on_the_embedded_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Calls::default();
    let definition = |calls: &Calls, blocked: bool| {
        let slow_calls = calls.clone();
        let slow = SagaStep::new("b", move |context: Value| {
            let calls = slow_calls.clone();
            async move {
                calls.push("do:b".into(), &context);
                if blocked {
                    futures::future::pending::<()>().await;
                }
                Ok::<_, HandlerError>(json!({"b": true}))
            }
        });
        SagaDefinition::new(
            "durable",
            vec![ok_step(calls, "a"), slow, ok_step(calls, "c")],
        )
        .unwrap()
    };

    let store = Arc::new(FileEventStore::open(dir.path()).unwrap());
    let first = SagaOrchestrator::new(store.clone());
    first.define(definition(&calls, true)).unwrap();
    let saga = first.start("durable", json!({"order": 1})).await.unwrap();
    until("b is running", || saga.snapshot().running_steps == ["b"]).await;
    first.shutdown();
    drop(first);
    // The stopped runner lets go of the store when its task is dropped.
    until("the store is released", || Arc::strong_count(&store) == 1).await;
    drop(store);

    let reopened = Arc::new(FileEventStore::open(dir.path()).unwrap());
    let second = SagaOrchestrator::new(reopened);
    second.define(definition(&calls, false)).unwrap();
    let recovery = second.recover().await.unwrap();
    assert_eq!(recovery.resumed.len(), 1);
    let outcome = within(recovery.resumed[0].outcome()).await.unwrap();
    assert_eq!(outcome.id, saga.id());
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(
        outcome.context,
        json!({"order": 1, "a": true, "b": true, "c": true})
    );
    assert_eq!(calls.list(), ["do:a", "do:b", "do:b", "do:c"]);
}
