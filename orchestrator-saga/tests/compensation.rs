//! Compensation order, timeouts, parallel failures, retries and failing compensations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use orchestrator_core::{HandlerError, Jitter, ManualClock, RetryPolicy};
use orchestrator_saga::{Flow, SagaDefinition, SagaOrchestrator, SagaStatus, SagaStep, StepInfo};
use orchestrator_store::InMemoryEventStore;
use serde_json::{Value, json};
use tokio::sync::Notify;

fn orchestrator() -> (SagaOrchestrator, Arc<InMemoryEventStore>) {
    let store = Arc::new(InMemoryEventStore::new());
    (SagaOrchestrator::new(store.clone()), store)
}

#[tokio::test]
async fn completed_steps_are_compensated_in_reverse_order() {
    let (orch, store) = orchestrator();
    let calls = Calls::default();
    orch.define(
        SagaDefinition::new(
            "trip",
            vec![
                compensated(&calls, ok_step(&calls, "flight")),
                ok_step(&calls, "notify"), // no compensation: nothing to undo
                compensated(&calls, ok_step(&calls, "hotel")),
                compensated(&calls, ok_step(&calls, "car")),
                compensated(&calls, failing_step(&calls, "payment")),
                compensated(&calls, ok_step(&calls, "never")),
            ],
        )
        .unwrap(),
    )
    .unwrap();

    let outcome = orch.run("trip", json!({"who": "ada"})).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(
        calls.list(),
        [
            "do:flight",
            "do:notify",
            "do:hotel",
            "do:car",
            "do:payment",
            "undo:car",
            "undo:hotel",
            "undo:flight"
        ]
    );
    assert_eq!(outcome.compensated_steps, ["car", "hotel", "flight"]);
    let failure = outcome.failure.clone().unwrap();
    assert_eq!((failure.step.as_str(), failure.attempts), ("payment", 1));
    assert_eq!(failure.error, "payment refused");
    assert!(!failure.timed_out);
    assert_eq!(
        outcome.context,
        json!({"who": "ada", "flight": true, "notify": true, "hotel": true, "car": true})
    );
    assert_eq!(
        log_types(&*store, &outcome.id.stream()).await,
        [
            "saga.started",
            "saga.step.completed",
            "saga.step.completed",
            "saga.step.completed",
            "saga.step.completed",
            "saga.step.failed",
            "saga.compensation.completed",
            "saga.compensation.completed",
            "saga.compensation.completed",
            "saga.finished"
        ]
    );
}

#[tokio::test]
async fn compensations_see_the_context_and_their_own_step_info() {
    let (orch, _) = orchestrator();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen_in = seen.clone();
    orch.define(
        SagaDefinition::new(
            "pay",
            vec![
                SagaStep::new("charge", |_: Value| async {
                    Ok::<_, HandlerError>(json!({"transaction_id": "TXN1"}))
                })
                .with_compensation(move |context: Value| {
                    let seen = seen_in.clone();
                    async move {
                        *seen.lock().unwrap() = Some(context);
                        Ok::<_, HandlerError>(())
                    }
                }),
                SagaStep::new("ship", |_: Value| async {
                    Err::<Value, _>(HandlerError::permanent("no stock"))
                }),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let outcome = orch.run("pay", json!({"order": 7})).await.unwrap();
    let context = seen.lock().unwrap().take().unwrap();
    assert_eq!(context["transaction_id"], "TXN1");
    assert_eq!(context["order"], 7);
    let info = StepInfo::from_context(&context).unwrap();
    assert!(info.compensating);
    assert_eq!(info.step, "charge");
    assert_eq!(
        info.idempotency_key,
        format!("{}:charge:compensate:1", outcome.id)
    );
    assert!(
        outcome.context.get("_saga").is_none(),
        "step info never enters the context"
    );
}

#[tokio::test]
async fn a_timeout_triggers_compensation() {
    let clock = ManualClock::starting_at_epoch();
    let store = Arc::new(InMemoryEventStore::new());
    let orch = orchestrator_on(store, &clock);
    let calls = Calls::default();
    orch.define(
        SagaDefinition::new(
            "slow",
            vec![
                compensated(&calls, ok_step(&calls, "reserve")),
                stuck_step("call_partner").with_timeout(Duration::from_secs(30)),
                ok_step(&calls, "confirm"),
            ],
        )
        .unwrap(),
    )
    .unwrap();

    let saga = orch.start("slow", json!({})).await.unwrap();
    until_sleepers(&clock, 1).await;
    assert_eq!(saga.status(), SagaStatus::Running);
    assert_eq!(saga.snapshot().running_steps, ["call_partner"]);
    clock.advance(Duration::from_secs(29));
    tokio::task::yield_now().await;
    assert_eq!(
        saga.status(),
        SagaStatus::Running,
        "not timed out before 30 s"
    );
    clock.advance(Duration::from_secs(1));

    let outcome = within(saga.outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let failure = outcome.failure.unwrap();
    assert_eq!(failure.step, "call_partner");
    assert!(failure.timed_out);
    assert_eq!(failure.error, "timed out after 30s");
    assert_eq!(calls.list(), ["do:reserve", "undo:reserve"]);
}

#[tokio::test]
async fn a_failure_inside_a_parallel_group_compensates_the_members_that_completed() {
    let (orch, _) = orchestrator();
    let calls = Calls::default();
    let signal = Arc::new(Notify::new());
    let (slow_calls, slow_signal) = (calls.clone(), signal.clone());
    let slow = SagaStep::new("slow", move |context: Value| {
        let (calls, signal) = (slow_calls.clone(), slow_signal.clone());
        async move {
            calls.push("start:slow".into(), &context);
            signal.notified().await;
            calls.push("do:slow".into(), &context);
            Ok::<_, HandlerError>(json!({"slow": true}))
        }
    });
    let (fail_calls, fail_signal) = (calls.clone(), signal.clone());
    let fail = SagaStep::new("fail", move |context: Value| {
        let (calls, signal) = (fail_calls.clone(), fail_signal.clone());
        async move {
            calls.push("do:fail".into(), &context);
            signal.notify_one();
            Err::<Value, _>(HandlerError::permanent("card declined"))
        }
    });
    orch.define(
        SagaDefinition::builder("group")
            .step(compensated(&calls, ok_step(&calls, "first")))
            .parallel([
                Flow::new()
                    .step(compensated(&calls, slow))
                    .step(compensated(&calls, ok_step(&calls, "after_slow"))),
                compensated(&calls, ok_step(&calls, "quick")).into(),
                compensated(&calls, fail).into(),
            ])
            .step(ok_step(&calls, "last"))
            .build()
            .unwrap(),
    )
    .unwrap();

    let outcome = within(orch.run("group", json!({}))).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(outcome.failure.unwrap().step, "fail");
    assert_eq!(outcome.completed_steps, ["first", "quick", "slow"]);
    assert_eq!(outcome.compensated_steps, ["slow", "quick", "first"]);
    let list = calls.list();
    assert!(
        !list.contains(&"do:after_slow".to_owned()),
        "no new member starts after a failure"
    );
    assert!(!list.contains(&"do:last".to_owned()));
    assert!(
        !list.contains(&"undo:fail".to_owned()),
        "the failed step is not compensated"
    );
    assert_eq!(
        &list[list.len() - 3..],
        ["undo:slow", "undo:quick", "undo:first"]
    );
}

#[tokio::test]
async fn parallel_members_all_complete_and_join() {
    let (orch, _) = orchestrator();
    let calls = Calls::default();
    orch.define(
        SagaDefinition::builder("fan")
            .parallel([
                ok_step(&calls, "a"),
                ok_step(&calls, "b"),
                ok_step(&calls, "c"),
            ])
            .step(ok_step(&calls, "join"))
            .build()
            .unwrap(),
    )
    .unwrap();
    let outcome = orch.run("fan", json!({})).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(calls.list().last().unwrap(), "do:join");
    assert_eq!(
        outcome.context,
        json!({"a": true, "b": true, "c": true, "join": true})
    );
}

/// A step failing `failures` times with a retryable error, then succeeding; records the
/// attempt numbers it saw.
fn flaky(name: &str, failures: u32, attempts: Arc<std::sync::Mutex<Vec<u32>>>) -> SagaStep {
    let calls = Arc::new(AtomicU32::new(0));
    SagaStep::new(name, move |context: Value| {
        let (calls, attempts) = (calls.clone(), attempts.clone());
        async move {
            attempts
                .lock()
                .unwrap()
                .push(StepInfo::from_context(&context).unwrap().attempt);
            if calls.fetch_add(1, Ordering::SeqCst) < failures {
                return Err(HandlerError::retryable("try again"));
            }
            Ok(json!({"done": true}))
        }
    })
}

#[tokio::test]
async fn a_step_is_retried_with_backoff_on_the_clock_then_succeeds() {
    let clock = ManualClock::starting_at_epoch();
    let store = Arc::new(InMemoryEventStore::new());
    let orch = orchestrator_on(store.clone(), &clock);
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let policy = RetryPolicy::exponential(3, Duration::from_secs(1)).with_jitter(Jitter::None);
    orch.define(
        SagaDefinition::new(
            "retry",
            vec![flaky("flaky", 2, attempts.clone()).with_retry(policy)],
        )
        .unwrap(),
    )
    .unwrap();

    let saga = orch.start("retry", json!({})).await.unwrap();
    until_sleepers(&clock, 1).await;
    clock.advance(Duration::from_millis(999));
    tokio::task::yield_now().await;
    assert_eq!(*attempts.lock().unwrap(), [1], "the first backoff is 1 s");
    clock.advance(Duration::from_millis(1));
    until("the second attempt", || attempts.lock().unwrap().len() == 2).await;
    until_sleepers(&clock, 1).await;
    clock.advance(Duration::from_secs(2));

    let outcome = within(saga.outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    assert_eq!(
        log_types(&*store, &outcome.id.stream()).await,
        [
            "saga.started",
            "saga.step.retrying",
            "saga.step.retrying",
            "saga.step.completed",
            "saga.finished"
        ]
    );
}

#[tokio::test]
async fn permanent_errors_and_exhausted_retries_fail_the_step() {
    let (orch, _) = orchestrator();
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let policy = RetryPolicy::exponential(3, Duration::ZERO);
    orch.define(
        SagaDefinition::new(
            "exhausted",
            vec![flaky("flaky", 5, attempts.clone()).with_retry(policy)],
        )
        .unwrap(),
    )
    .unwrap();
    let calls = Calls::default();
    orch.define(
        SagaDefinition::new(
            "permanent",
            vec![failing_step(&calls, "refuse").with_retry(policy)],
        )
        .unwrap(),
    )
    .unwrap();

    let outcome = orch.run("exhausted", json!({})).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(outcome.failure.unwrap().attempts, 3);
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);

    let outcome = orch.run("permanent", json!({})).await.unwrap();
    assert_eq!(outcome.failure.unwrap().attempts, 1);
    assert_eq!(
        calls.count("do:refuse"),
        1,
        "permanent errors are not retried"
    );
}

#[tokio::test]
async fn a_failing_compensation_is_retried_then_reported() {
    let (orch, _) = orchestrator();
    let calls = Calls::default();
    let tries = Arc::new(AtomicU32::new(0));
    let (undo_calls, undo_tries) = (calls.clone(), tries.clone());
    let shaky_undo = ok_step(&calls, "shaky")
        .with_compensation(move |context: Value| {
            let (calls, tries) = (undo_calls.clone(), undo_tries.clone());
            async move {
                calls.push("undo:shaky".into(), &context);
                if tries.fetch_add(1, Ordering::SeqCst) < 1 {
                    return Err(HandlerError::retryable("refund service busy"));
                }
                Ok::<_, HandlerError>(())
            }
        })
        .with_compensation_retry(RetryPolicy::exponential(3, Duration::ZERO));
    let broken_undo = ok_step(&calls, "broken")
        .with_compensation(|_: Value| async {
            Err::<(), _>(HandlerError::retryable("ledger offline"))
        })
        .with_retry(RetryPolicy::exponential(2, Duration::ZERO));
    orch.define(
        SagaDefinition::new(
            "undo",
            vec![
                compensated(&calls, ok_step(&calls, "first")),
                shaky_undo,
                broken_undo,
                failing_step(&calls, "fail"),
            ],
        )
        .unwrap(),
    )
    .unwrap();

    let outcome = orch.run("undo", json!({})).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::CompensationFailed);
    assert_eq!(outcome.compensation_failures.len(), 1);
    let failure = &outcome.compensation_failures[0];
    assert_eq!(failure.step, "broken");
    assert_eq!(failure.attempts, 2);
    assert_eq!(failure.error, "ledger offline");
    assert_eq!(
        outcome.compensated_steps,
        ["shaky", "first"],
        "the others still run"
    );
    assert_eq!(calls.count("undo:shaky"), 2);
    let keys = calls.keys("undo:shaky");
    assert!(keys[0].ends_with(":shaky:compensate:1") && keys[1].ends_with(":shaky:compensate:2"));
}

#[tokio::test]
async fn a_panicking_step_fails_and_compensates() {
    let (orch, _) = orchestrator();
    let calls = Calls::default();
    orch.define(
        SagaDefinition::new(
            "panics",
            vec![
                compensated(&calls, ok_step(&calls, "a")),
                SagaStep::new("boom", |_: Value| async {
                    if true {
                        panic!("bug in step");
                    }
                    Ok::<_, HandlerError>(Value::Null)
                }),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let outcome = orch.run("panics", json!({})).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(outcome.failure.unwrap().error, "panicked: bug in step");
    assert_eq!(calls.list(), ["do:a", "undo:a"]);
}

#[tokio::test]
async fn outputs_merge_into_the_context_in_order() {
    let (orch, _) = orchestrator();
    orch.define(
        SagaDefinition::new(
            "merge",
            vec![
                SagaStep::new("a", |c: Value| async move {
                    Ok::<_, HandlerError>(
                        json!({"n": c["n"].as_i64().unwrap() + 1, "_saga": "ignored"}),
                    )
                }),
                SagaStep::new("b", |c: Value| async move {
                    Ok::<_, HandlerError>(json!(c["n"].as_i64().unwrap() * 10))
                }),
                SagaStep::new("c", |_: Value| async { Ok::<_, HandlerError>(Value::Null) }),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let outcome = orch.run("merge", json!({"n": 1})).await.unwrap();
    assert_eq!(outcome.context, json!({"n": 2, "b": 20}));
    assert!(outcome.is_completed());
}
