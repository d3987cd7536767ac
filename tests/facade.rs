//! The `EventOrchestrator` facade on the embedded default.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use orchestrator::core::Error as CoreError;
use orchestrator::prelude::*;
use orchestrator::saga::Error as SagaError;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Subscribes a handler that forwards every event it gets.
async fn collect(
    orchestrator: &EventOrchestrator,
    pattern: &str,
) -> mpsc::UnboundedReceiver<EventEnvelope> {
    support::collect(orchestrator, pattern).await.1
}

async fn next(rx: &mut mpsc::UnboundedReceiver<EventEnvelope>) -> EventEnvelope {
    timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an event in time")
        .unwrap()
}

#[tokio::test]
async fn published_events_reach_subscribers_and_the_store() {
    let orchestrator = EventOrchestrator::new();
    let mut rx = collect(&orchestrator, "user.*").await;
    let id = orchestrator
        .publish_event(
            "user.created",
            json!({"user_id": "123", "username": "john_doe"}),
        )
        .await
        .unwrap();

    let got = next(&mut rx).await;
    assert_eq!(*got.id(), id);
    assert_eq!(got.event_type(), "user.created");
    assert_eq!(got.data::<Value>().unwrap()["username"], "john_doe");
    assert_eq!(
        got.global_position(),
        Some(1),
        "subscribers see the stored position"
    );

    let stored = orchestrator
        .store()
        .read_all(ReadAll::from(0, 10))
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(*stored[0].id(), id);
    assert_eq!(stored[0].stream_id(), Some("user.created"));
}

#[tokio::test]
async fn failing_handlers_end_in_the_dead_letter_queue() {
    let orchestrator = EventOrchestrator::builder()
        .retry_policy(RetryPolicy::exponential(2, Duration::from_millis(1)))
        .build()
        .await
        .unwrap();
    orchestrator
        .subscribe("payment.requested", |_event: EventEnvelope| async {
            Err::<(), _>(HandlerError::retryable("gateway down"))
        })
        .await
        .unwrap();
    orchestrator
        .publish_event("payment.requested", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    let dead = orchestrator.dead_letters();
    timeout(Duration::from_secs(5), async {
        while dead.count().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let letter = dead
        .list(&DeadLetterQuery::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(letter.attempts, 2);
    assert_eq!(letter.reason, "gateway down");
}

#[tokio::test]
async fn bad_event_types_and_patterns_are_typed_errors() {
    let orchestrator = EventOrchestrator::new();
    assert!(matches!(
        orchestrator.publish_event("", json!({})).await,
        Err(Error::Core(CoreError::InvalidInput { .. }))
    ));
    assert!(matches!(
        orchestrator
            .subscribe("order.#.x", |_e: EventEnvelope| async {
                Ok::<_, HandlerError>(())
            })
            .await,
        Err(Error::Core(CoreError::InvalidInput { .. }))
    ));
}

#[tokio::test]
async fn the_order_saga_completes_or_compensates() {
    let orchestrator = EventOrchestrator::new();
    let refunds = Arc::new(AtomicU32::new(0));
    let refunded = refunds.clone();
    orchestrator
        .define_saga(
            "order_processing",
            vec![
                SagaStep::new("validate", |_: Value| async {
                    Ok::<_, HandlerError>(json!({"valid": true}))
                }),
                SagaStep::new("payment", |_: Value| async {
                    Ok::<_, HandlerError>(json!({"transaction_id": "TXN123"}))
                })
                .with_compensation(move |context: Value| {
                    let refunded = refunded.clone();
                    async move {
                        assert_eq!(context["transaction_id"], "TXN123");
                        refunded.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, HandlerError>(())
                    }
                }),
                // Any std error type works as a step's error.
                SagaStep::new("shipping", |context: Value| async move {
                    if context["address"].is_null() {
                        return Err(std::io::Error::other("no address to ship to"));
                    }
                    Ok(json!({"tracking_number": "TRACK123"}))
                }),
            ],
        )
        .unwrap();

    let done = orchestrator
        .start_saga(
            "order_processing",
            json!({"order_id": "ORDER123", "amount": 99.99, "address": "Main St"}),
        )
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(done.context["tracking_number"], "TRACK123");
    assert_eq!(done.context["order_id"], "ORDER123");

    let undone = orchestrator
        .start_saga("order_processing", json!({"order_id": "ORDER124"}))
        .await
        .unwrap();
    assert_eq!(undone.status, SagaStatus::Compensated);
    assert_eq!(undone.compensated_steps, ["payment"]);
    assert_eq!(undone.failure.as_ref().unwrap().step, "shipping");
    assert_eq!(undone.failure.unwrap().error, "no address to ship to");
    assert_eq!(refunds.load(Ordering::SeqCst), 1);
    assert_eq!(orchestrator.sagas().list_stored().await.unwrap().len(), 2);
}

#[tokio::test]
async fn bad_saga_definitions_and_undefined_sagas_are_errors() {
    let orchestrator = EventOrchestrator::new();
    let step =
        |name: &str| SagaStep::new(name, |_: Value| async { Ok::<_, HandlerError>(json!({})) });
    assert!(matches!(
        orchestrator.define_saga("empty", vec![]),
        Err(Error::Saga(SagaError::EmptySaga { .. }))
    ));
    assert!(matches!(
        orchestrator.define_saga("twice", vec![step("a"), step("a")]),
        Err(Error::Saga(SagaError::DuplicateStep { .. }))
    ));
    orchestrator.define_saga("once", vec![step("a")]).unwrap();
    assert!(matches!(
        orchestrator.define_saga("once", vec![step("a")]),
        Err(Error::Saga(SagaError::AlreadyDefined { .. }))
    ));
    let undefined = orchestrator
        .start_saga("never", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(undefined, Error::UndefinedSaga { ref saga } if saga == "never"));
    assert!(undefined.to_string().contains("define_saga"));
}

#[tokio::test]
async fn commands_and_cached_queries() {
    let orchestrator = EventOrchestrator::new();
    orchestrator
        .register_command_handler("create_user", |data: Value| async move {
            if data["name"].is_null() {
                return Err(std::fmt::Error);
            }
            Ok(json!({"user_id": "USER123", "created": true}))
        })
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    orchestrator
        .register_query_handler("get_user", move |params: Value| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(json!({"user_id": params["user_id"], "name": "John"}))
            }
        })
        .unwrap();

    let result = orchestrator
        .send_command("create_user", json!({"name": "John"}))
        .await
        .unwrap();
    assert_eq!(result["user_id"], "USER123");
    for _ in 0..2 {
        let user = orchestrator
            .execute_query("get_user", json!({"user_id": result["user_id"]}))
            .await
            .unwrap();
        assert_eq!(user, json!({"user_id": "USER123", "name": "John"}));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the second answer came from the cache"
    );

    assert!(matches!(
        orchestrator.send_command("create_user", json!({})).await,
        Err(Error::Cqrs(_))
    ));
    assert!(matches!(
        orchestrator.send_command("delete_user", json!({})).await,
        Err(Error::UnknownCommand { ref name }) if name == "delete_user"
    ));
    assert!(matches!(
        orchestrator.execute_query("list_users", json!({})).await,
        Err(Error::UnknownQuery { ref name }) if name == "list_users"
    ));
    assert!(
        orchestrator
            .register_command_handler(
                "create_user",
                |v: Value| async move { Ok::<_, HandlerError>(v) }
            )
            .is_err()
    );
}

#[tokio::test]
async fn replay_redelivers_stored_events_to_current_subscribers() {
    let orchestrator = EventOrchestrator::new();
    let before = SystemTime::now() - Duration::from_secs(1);
    for n in 0..3 {
        orchestrator
            .publish_event("order.completed", json!({"n": n}))
            .await
            .unwrap();
    }
    orchestrator
        .publish_event("user.created", json!({}))
        .await
        .unwrap();
    orchestrator
        .define_saga(
            "noop",
            vec![SagaStep::new("a", |_: Value| async {
                Ok::<_, HandlerError>(json!({}))
            })],
        )
        .unwrap();
    orchestrator.start_saga("noop", json!({})).await.unwrap();

    // Subscribed after the events were published: only a replay reaches it.
    let mut orders = collect(&orchestrator, "order.completed").await;
    let mut everything = collect(&orchestrator, "#").await;
    let replayed = orchestrator
        .replay_events(ReplayFilter::event_type("order.completed").from_time(before))
        .await
        .unwrap();
    assert_eq!(replayed, 3);
    for n in 0..3 {
        assert_eq!(next(&mut orders).await.data::<Value>().unwrap()["n"], n);
    }
    assert_eq!(
        orchestrator
            .replay_events(
                ReplayFilter::event_type("order.completed")
                    .from_time(SystemTime::now() + Duration::from_secs(60))
            )
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        orchestrator
            .replay_events(ReplayFilter::event_type("order.completed").to_time(before))
            .await
            .unwrap(),
        0
    );

    // Everything but the saga's log.
    while everything.try_recv().is_ok() {}
    let all = orchestrator
        .replay_events(ReplayFilter::all())
        .await
        .unwrap();
    assert_eq!(all, 4);
    let seen: Vec<String> = {
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(next(&mut everything).await.event_type().to_owned());
        }
        seen
    };
    assert!(seen.iter().all(|t| !t.starts_with("saga.")), "{seen:?}");

    let progress = Arc::new(AtomicU32::new(0));
    let reports = progress.clone();
    let count = orchestrator
        .replay_events_with_progress("user.created", move |p| {
            reports.fetch_add(1, Ordering::SeqCst);
            assert!(p.processed <= 1);
        })
        .await
        .unwrap();
    assert_eq!(count, 1);
    assert!(progress.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn events_failing_their_schema_are_neither_stored_nor_published() {
    let orchestrator = EventOrchestrator::new();
    orchestrator
        .schemas()
        .register(orchestrator::store::schema::SchemaVersion::new(
            "order.placed",
            1,
            json!({"type": "object", "required": ["order_id"]}),
        ))
        .unwrap();
    let mut rx = collect(&orchestrator, "order.placed").await;
    let err = orchestrator
        .publish_event("order.placed", json!({"amount": 1}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Core(ref e) if e.decode_field() == Some("/order_id")),
        "{err}"
    );
    assert_eq!(orchestrator.store().head_position().await.unwrap(), 0);
    orchestrator
        .publish_event("order.placed", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    assert_eq!(
        next(&mut rx).await.data::<Value>().unwrap()["order_id"],
        "o-1"
    );
}

#[tokio::test]
async fn a_file_store_keeps_events_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let first = EventOrchestrator::builder()
        .store_url(&url)
        .build()
        .await
        .unwrap();
    let id = first
        .publish_event("user.created", json!({"user_id": "1"}))
        .await
        .unwrap();
    first.shutdown(Duration::from_secs(1)).await;
    drop(first);

    let second = EventOrchestrator::builder()
        .store_url(&url)
        .build()
        .await
        .unwrap();
    assert!(second.store().capabilities().durable);
    let stored = second
        .store()
        .read_stream("user.created", 1, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(*stored[0].id(), id);
}

#[tokio::test]
async fn builder_errors_say_what_to_fix() {
    let err = EventOrchestrator::builder()
        .store_url("ftp://example.com")
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("file://DIR"), "{err}");
    if !cfg!(feature = "kafka") {
        let err = EventOrchestrator::builder()
            .transport_url("kafka://127.0.0.1:9092")
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::FeatureDisabled {
                    feature: "kafka",
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = EventOrchestrator::builder()
        .transport(Arc::new(InProcessTransport::new()))
        .dead_letter_queue(Arc::new(orchestrator::bus::InMemoryDeadLetterQueue::new()))
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("dead-letter queue"), "{err}");
    // `memory:` is the in-process transport, which takes the given queue.
    let queue = Arc::new(orchestrator::bus::InMemoryDeadLetterQueue::new());
    let orchestrator = EventOrchestrator::builder()
        .transport_url("memory:")
        .dead_letter_queue(queue)
        .build()
        .await
        .unwrap();
    assert_eq!(orchestrator.transport().name(), "in-process");
}

#[tokio::test]
async fn events_published_by_a_handler_are_caused_by_its_event() {
    let orchestrator = EventOrchestrator::new();
    let publisher = orchestrator.clone();
    orchestrator
        .subscribe("order.placed", move |event: EventEnvelope| {
            let publisher = publisher.clone();
            async move {
                let order: Value = event.data()?;
                publisher.publish_event("order.paid", order).await?;
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    let mut paid = collect(&orchestrator, "order.paid").await;
    let placed = EventEnvelope::new("order.placed", &json!({"order_id": "o-1"}))
        .unwrap()
        .with_correlation_id("checkout-42");
    let placed_id = orchestrator.publish(placed).await.unwrap();
    let effect = next(&mut paid).await;
    assert_eq!(effect.correlation_id(), Some("checkout-42"));
    assert_eq!(effect.causation_id(), Some(placed_id.as_str()));
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
}

impl Event for OrderPlaced {
    const EVENT_TYPE: &'static str = "order.placed";
}

#[tokio::test]
async fn typed_events() {
    let orchestrator = EventOrchestrator::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    orchestrator
        .subscribe_typed(move |placed: OrderPlaced| {
            let tx = tx.clone();
            async move {
                tx.send(placed).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    orchestrator
        .publish_typed(&OrderPlaced {
            order_id: "o-1".into(),
        })
        .await
        .unwrap();
    let got = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        OrderPlaced {
            order_id: "o-1".into()
        }
    );
}

/// `event.data()?` on a payload that does not decode fails the handler for good: the event
/// is dead-lettered after one attempt, with the decode error, as with `subscribe_typed`.
#[tokio::test]
async fn a_payload_that_does_not_decode_is_dead_lettered_at_once() {
    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        quantity: u64,
    }
    let orchestrator = EventOrchestrator::new();
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&attempts);
    let _subscription = orchestrator
        .subscribe("order.placed", move |event: EventEnvelope| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let _order: Order = event.data()?;
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    orchestrator
        .publish_event("order.placed", json!({ "quantity": "three" }))
        .await
        .unwrap();
    let dead = orchestrator.dead_letters();
    timeout(Duration::from_secs(10), async {
        while dead.count().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the event is dead-lettered");
    let letter = dead
        .list(&DeadLetterQuery::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(letter.attempts, 1, "{letter:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(letter.reason.contains("decode"), "{}", letter.reason);
}
