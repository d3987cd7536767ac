//! Workflows: branching, waits for events (completing, timing out, buffered, through a
//! transport, across a restart), and state queried while running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use common::*;
use orchestrator_bus::InProcessTransport;
use orchestrator_core::{EventEnvelope, EventStore, ManualClock, SubscribeOptions, Transport};
use orchestrator_saga::{
    Branch, EventRouting, Flow, SagaDefinition, SagaOrchestrator, SagaStatus, WaitForEvent,
};
use orchestrator_store::InMemoryEventStore;
use serde_json::json;

fn approval(calls: &Calls) -> SagaDefinition {
    SagaDefinition::builder("approval")
        .step(ok_step(calls, "receive"))
        .branch(
            Branch::new("route")
                .when(
                    "large",
                    |c| c["amount"].as_f64().unwrap_or(0.0) > 1000.0,
                    Flow::new()
                        .step(ok_step(calls, "manual_review"))
                        .step(ok_step(calls, "sign_off")),
                )
                .when("free", |c| c["amount"] == 0, ok_step(calls, "skip_payment"))
                .otherwise(ok_step(calls, "auto_approve")),
        )
        .step(ok_step(calls, "notify"))
        .build()
        .unwrap()
}

#[tokio::test]
async fn branching_picks_the_right_branch() {
    let store = Arc::new(InMemoryEventStore::new());
    let orch = SagaOrchestrator::new(store.clone());
    let calls = Calls::default();
    orch.define(approval(&calls)).unwrap();

    let cases = [
        (
            json!(5000),
            vec!["do:receive", "do:manual_review", "do:sign_off", "do:notify"],
            "large",
        ),
        (
            json!(0),
            vec!["do:receive", "do:skip_payment", "do:notify"],
            "free",
        ),
        (
            json!(10),
            vec!["do:receive", "do:auto_approve", "do:notify"],
            "otherwise",
        ),
    ];
    for (amount, expected, label) in cases {
        let before = calls.list().len();
        let outcome = orch
            .run("approval", json!({"amount": amount}))
            .await
            .unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed);
        assert_eq!(calls.list()[before..], expected);
        let log = store
            .read_stream(&outcome.id.stream(), 1, 100)
            .await
            .unwrap();
        let chosen = log
            .iter()
            .find(|e| e.event_type() == "saga.branch.chosen")
            .unwrap()
            .data::<serde_json::Value>()
            .unwrap();
        assert_eq!(chosen["label"], label);
    }
}

#[tokio::test]
async fn a_branch_with_no_matching_arm_runs_nothing() {
    let orch = SagaOrchestrator::new(Arc::new(InMemoryEventStore::new()));
    let calls = Calls::default();
    orch.define(
        SagaDefinition::builder("maybe")
            .branch(Branch::new("vip").when("vip", |c| c["vip"] == true, ok_step(&calls, "gift")))
            .step(ok_step(&calls, "done"))
            .build()
            .unwrap(),
    )
    .unwrap();
    orch.run("maybe", json!({"vip": false})).await.unwrap();
    orch.run("maybe", json!({"vip": true})).await.unwrap();
    assert_eq!(calls.list(), ["do:done", "do:gift", "do:done"]);
}

fn payment_flow(calls: &Calls) -> SagaDefinition {
    SagaDefinition::builder("checkout")
        .step(compensated(calls, ok_step(calls, "request_payment")))
        .wait_for_event(
            WaitForEvent::new("await_payment", "payment.confirmed")
                .correlate_on("order_id")
                .with_timeout(Duration::from_secs(60)),
        )
        .step(ok_step(calls, "ship"))
        .build()
        .unwrap()
}

fn confirmation(order: &str) -> EventEnvelope {
    EventEnvelope::new("payment.confirmed", &json!({"paid_cents": 9999}))
        .unwrap()
        .with_correlation_id(order)
}

#[tokio::test]
async fn a_wait_completes_when_its_event_arrives_and_is_visible_while_running() {
    let clock = ManualClock::starting_at_epoch();
    let orch = orchestrator_on(Arc::new(InMemoryEventStore::new()), &clock);
    let calls = Calls::default();
    orch.define(payment_flow(&calls)).unwrap();

    let saga = orch
        .start("checkout", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    until("the wait started", || {
        !saga.snapshot().waiting_for.is_empty()
    })
    .await;
    let snapshot = saga.snapshot();
    assert_eq!(snapshot.status, SagaStatus::Running);
    assert_eq!(snapshot.completed_steps, ["request_payment"]);
    assert_eq!(snapshot.context["request_payment"], true);
    let wait = &snapshot.waiting_for[0];
    assert_eq!(
        (wait.step.as_str(), wait.correlation_id.as_str()),
        ("await_payment", "o-1")
    );
    assert_eq!(
        wait.deadline,
        Some(DateTime::UNIX_EPOCH + chrono::Duration::seconds(60))
    );
    assert_eq!(orch.list(Some(SagaStatus::Running)).len(), 1);
    assert_eq!(orch.status(saga.id()), Some(SagaStatus::Running));

    assert_eq!(
        orch.deliver_event(confirmation("o-2")),
        EventRouting::Buffered
    );
    assert_eq!(
        orch.deliver_event(confirmation("o-1")),
        EventRouting::Delivered { waits: 1 }
    );
    let outcome = within(saga.outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.context["paid_cents"], 9999);
    assert_eq!(calls.list(), ["do:request_payment", "do:ship"]);
    assert_eq!(orch.list(Some(SagaStatus::Completed)).len(), 1);
    assert!(orch.list(Some(SagaStatus::Running)).is_empty());
}

#[tokio::test]
async fn a_wait_times_out_and_the_saga_compensates() {
    let clock = ManualClock::starting_at_epoch();
    let orch = orchestrator_on(Arc::new(InMemoryEventStore::new()), &clock);
    let calls = Calls::default();
    orch.define(payment_flow(&calls)).unwrap();

    let saga = orch
        .start("checkout", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    until_sleepers(&clock, 1).await;
    clock.advance(Duration::from_secs(60));

    let outcome = within(saga.outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let failure = outcome.failure.unwrap();
    assert_eq!(failure.step, "await_payment");
    assert!(failure.timed_out);
    assert!(
        failure.error.contains("payment.confirmed"),
        "{}",
        failure.error
    );
    assert_eq!(calls.list(), ["do:request_payment", "undo:request_payment"]);
}

#[tokio::test]
async fn an_event_that_overtakes_its_wait_is_buffered_for_it() {
    let orch = SagaOrchestrator::new(Arc::new(InMemoryEventStore::new()));
    orch.define(
        SagaDefinition::builder("reply")
            .wait_for_event(WaitForEvent::new("answer", "quote.ready"))
            .build()
            .unwrap(),
    )
    .unwrap();
    let early = EventEnvelope::new("quote.ready", &json!(42)).unwrap();
    let saga = orch.start("reply", json!({})).await.unwrap();
    // Correlated on the saga id by default.
    let event = early.with_correlation_id(saga.id().to_string());
    let routing = orch.deliver_event(event);
    assert!(matches!(
        routing,
        EventRouting::Buffered | EventRouting::Delivered { .. }
    ));
    let outcome = within(saga.outcome()).await.unwrap();
    assert_eq!(
        outcome.context["answer"], 42,
        "a non-object payload lands under the wait's name"
    );
    assert_eq!(orch.buffered_events(), 0);
    assert_eq!(
        orch.deliver_event(EventEnvelope::new("quote.ready", &1).unwrap()),
        EventRouting::NoCorrelationId
    );
}

#[tokio::test]
async fn a_wait_missing_its_correlation_field_fails_the_saga() {
    let orch = SagaOrchestrator::new(Arc::new(InMemoryEventStore::new()));
    let calls = Calls::default();
    orch.define(payment_flow(&calls)).unwrap();
    let outcome = orch
        .run("checkout", json!({"no_order_id": 1}))
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(outcome.failure.unwrap().error.contains("order_id"));
}

#[tokio::test]
async fn events_arrive_through_a_transport_subscription() {
    let orch = SagaOrchestrator::new(Arc::new(InMemoryEventStore::new()));
    let calls = Calls::default();
    orch.define(payment_flow(&calls)).unwrap();
    let transport = InProcessTransport::new();
    let listener = orch
        .listen(
            &transport,
            SubscribeOptions::new("sagas", "payment.*").unwrap(),
        )
        .await
        .unwrap();

    let saga = orch
        .start("checkout", json!({"order_id": "o-9"}))
        .await
        .unwrap();
    until("the wait started", || {
        !saga.snapshot().waiting_for.is_empty()
    })
    .await;
    transport
        .publish("payment.confirmed", confirmation("o-9"))
        .await
        .unwrap();

    let outcome = within(saga.outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(calls.list(), ["do:request_payment", "do:ship"]);
    transport.close();
    within(listener.join()).await.unwrap();
}

#[tokio::test]
async fn a_recovered_wait_keeps_its_deadline() {
    let clock = ManualClock::starting_at_epoch();
    let store = InMemoryEventStore::new();
    let calls = Calls::default();
    let first = orchestrator_on(Arc::new(store.clone()), &clock);
    first.define(payment_flow(&calls)).unwrap();
    let saga = first
        .start("checkout", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    until_sleepers(&clock, 1).await;
    first.shutdown();
    clock.advance(Duration::from_secs(40));

    let second = orchestrator_on(Arc::new(store), &clock);
    second.define(payment_flow(&calls)).unwrap();
    let resumed = second.recover().await.unwrap().resumed.remove(0);
    assert_eq!(resumed.id(), saga.id());
    // The stopped runner's sleeper is still registered with the clock, hence 2.
    until_sleepers(&clock, 2).await;
    clock.advance(Duration::from_secs(20));

    let outcome = within(resumed.outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(outcome.failure.unwrap().timed_out);
    assert_eq!(calls.count("do:request_payment"), 1);
}

#[tokio::test]
async fn sagas_are_queryable_by_id_and_status_and_from_the_store() {
    let store = Arc::new(InMemoryEventStore::new());
    let orch = SagaOrchestrator::new(store.clone());
    let calls = Calls::default();
    orch.define(SagaDefinition::new("quick", vec![ok_step(&calls, "a")]).unwrap())
        .unwrap();
    orch.define(
        SagaDefinition::new("stuck", vec![ok_step(&calls, "b"), stuck_step("forever")]).unwrap(),
    )
    .unwrap();
    let done = orch.run("quick", json!({})).await.unwrap();
    let running = orch.start("stuck", json!({"x": 1})).await.unwrap();
    until("b completed", || {
        running.snapshot().completed_steps == ["b"]
    })
    .await;

    assert_eq!(orch.status(done.id), Some(SagaStatus::Completed));
    assert_eq!(orch.get(running.id()).unwrap().saga(), "stuck");
    let listed: Vec<_> = orch
        .list(Some(SagaStatus::Running))
        .iter()
        .map(|h| h.id())
        .collect();
    assert_eq!(listed, [running.id()]);
    assert_eq!(orch.list(None).len(), 2);
    assert!(running.try_outcome().is_none());

    let elsewhere = SagaOrchestrator::new(store);
    let loaded = elsewhere.load(running.id()).await.unwrap();
    assert_eq!(loaded.status, SagaStatus::Running);
    assert_eq!(loaded.context, json!({"x": 1, "b": true}));
    assert_eq!(
        elsewhere.load(done.id).await.unwrap().outcome().unwrap(),
        done
    );
    assert!(elsewhere.get(done.id).is_none());
    let stored = elsewhere.list_stored().await.unwrap();
    let summary: Vec<_> = stored
        .iter()
        .map(|s| (s.id, s.saga.as_str(), s.finished))
        .collect();
    assert_eq!(
        summary,
        [
            (done.id, "quick", Some(SagaStatus::Completed)),
            (running.id(), "stuck", None)
        ]
    );
    orch.shutdown();
}

/// The awaited event is acknowledged only once the saga logged it: a process that dies
/// between receiving and logging leaves it with the transport, which delivers it again to
/// the process that recovers the saga.
#[tokio::test]
async fn an_event_received_but_not_logged_is_delivered_again_after_a_crash() {
    let store = InMemoryEventStore::new();
    let calls = Calls::default();
    // Appends: started, request_payment completed, wait started; the fourth (the wait's
    // completion) never happens: the process "dies" there.
    let crashing = CrashingStore::new(store.clone(), CrashPoint::Before(4));
    let first = SagaOrchestrator::new(crashing.clone());
    first.define(payment_flow(&calls)).unwrap();
    let transport = InProcessTransport::new();
    let group = || SubscribeOptions::new("sagas", "payment.*").unwrap();
    let first_listener = first.listen(&transport, group()).await.unwrap();
    let saga = first
        .start("checkout", json!({"order_id": "o-7"}))
        .await
        .unwrap();
    until("the wait started", || {
        !saga.snapshot().waiting_for.is_empty()
    })
    .await;
    transport
        .publish("payment.confirmed", confirmation("o-7"))
        .await
        .unwrap();
    crashing.crashed().await;
    assert!(
        !transport.is_idle(),
        "received but not logged: the delivery is not acknowledged"
    );
    first.shutdown();
    first_listener.stop();

    let second = SagaOrchestrator::new(Arc::new(store));
    second.define(payment_flow(&calls)).unwrap();
    let second_listener = second.listen(&transport, group()).await.unwrap();
    let resumed = second.recover().await.unwrap().resumed.remove(0);
    assert_eq!(resumed.id(), saga.id());
    let outcome = within(resumed.outcome()).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed, "the event came back");
    assert_eq!(calls.list(), ["do:request_payment", "do:ship"]);
    until("the delivery is acknowledged", || transport.is_idle()).await;
    second_listener.stop();
}
