//! The facade with its store on PostgreSQL: publish → handler with stored positions, a saga
//! logged in the store, and the relay's lease (a `PostgresLease` row) electing one relay
//! among processes that share the store, handed over when the holder shuts down or dies.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use pg_support::{DropSchema, config, schema};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orchestrator::RelayState;
use orchestrator::backends::postgres::PostgresEventStore;
use orchestrator::core::testkit::services::{postgres_url, unreachable};
use orchestrator::prelude::*;
use serde_json::{Value, json};

/// A store in a schema of this test's own, or `None` (after saying why) when PostgreSQL is
/// unreachable.
async fn store(schema: &str) -> Option<PostgresEventStore> {
    match PostgresEventStore::connect(config(schema)).await {
        Ok(store) => Some(store),
        Err(error) => {
            let url = postgres_url();
            unreachable("PostgreSQL", &orchestrator::connect::redact(&url), &error);
            None
        }
    }
}

/// An event type a handler saw, with the global position it saw.
type Handled = (String, Option<u64>);

async fn process(store: &PostgresEventStore) -> EventOrchestrator {
    EventOrchestrator::builder()
        .store(Arc::new(store.clone()))
        .build()
        .await
        .unwrap()
}

async fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Subscribes the named group `orders` to `order.*`, recording each event's type and global
/// position as handled.
async fn record_orders(orchestrator: &EventOrchestrator) -> Arc<Mutex<Vec<Handled>>> {
    let handled: Arc<Mutex<Vec<Handled>>> = Arc::default();
    let seen = Arc::clone(&handled);
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("order.*").named("orders"),
            move |event: EventEnvelope| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock()
                        .unwrap()
                        .push((event.event_type().to_owned(), event.global_position()));
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await
        .unwrap();
    handled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_are_stored_handled_and_sagas_logged() {
    let schema = schema("facade");
    let Some(store) = store(&schema).await else {
        return;
    };
    let _cleanup = DropSchema(schema.clone());
    let orchestrator = process(&store).await;
    let handled = record_orders(&orchestrator).await;
    for event_type in ["order.placed", "order.shipped"] {
        orchestrator
            .publish_event(event_type, json!({ "order_id": "o-1" }))
            .await
            .unwrap();
    }
    wait_until("both events handled", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 2
    })
    .await;
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled[0].0, "order.placed");
    assert!(
        handled.iter().all(|(_, position)| position.is_some()),
        "handlers see the stored positions: {handled:?}"
    );

    orchestrator
        .define_saga(
            "ship",
            vec![SagaStep::new("pack", |_: Value| async {
                Ok::<_, HandlerError>(json!({ "box": 1 }))
            })],
        )
        .unwrap();
    let saga = orchestrator
        .start_saga("ship", json!({ "order_id": "o-1" }))
        .await
        .unwrap();
    assert_eq!(saga.status.to_string(), "completed");
    assert!(
        store.head_position().await.unwrap() > 2,
        "the saga's log is in the store too"
    );
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_relays_and_a_standby_takes_over_when_it_dies() {
    let schema = schema("relay");
    let Some(store) = store(&schema).await else {
        return;
    };
    let _cleanup = DropSchema(schema.clone());
    // The holder runs on a runtime of its own, so that it can die at once: dropping that
    // runtime drops its tasks mid-flight, without releasing the lease (as SIGKILL would).
    let holder_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let holder = {
        let schema = schema.clone();
        holder_runtime
            .spawn(async move {
                let store = PostgresEventStore::connect(config(&schema)).await.unwrap();
                let holder = process(&store).await;
                // With the in-process transport the relay starts with the first publish;
                // started here, its task runs on this runtime.
                holder.start_relay();
                holder
            })
            .await
            .unwrap()
    };
    wait_until("the first process relays", Duration::from_secs(10), || {
        holder.relay_status().state == RelayState::Relaying
    })
    .await;
    let lease = holder.relay_status().lease.unwrap();
    assert!(lease.contains("postgres row"), "{lease}");
    let standby = process(&store).await;
    standby.start_relay();
    wait_until("the second stands by", Duration::from_secs(10), || {
        standby.relay_status().state == RelayState::Standby
    })
    .await;

    holder_runtime.shutdown_background();
    let died = Instant::now();
    wait_until(
        "the standby relays within the lease time (5 s) and its renewal period",
        Duration::from_secs(12),
        || standby.relay_status().state == RelayState::Relaying,
    )
    .await;
    eprintln!("took over {:?} after the holder died", died.elapsed());
    // It relays: an event published now reaches its subscribers.
    standby
        .publish_and_wait(EventEnvelope::new("relay.after", &json!({})).unwrap())
        .await
        .unwrap();
    standby.shutdown(Duration::from_secs(5)).await;
}

/// Store and transport both on PostgreSQL, chosen by URL (`postgres://…?schema=…` for each):
/// published events are stored, carried through the transport's queue table to the handler
/// with their stored positions, and acked (the queue is empty afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_transport_on_postgres() {
    let schema = schema("transport");
    let Some(store) = store(&schema).await else {
        return;
    };
    let _cleanup = DropSchema(schema.clone());
    let base = postgres_url();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}schema={schema}");
    let orchestrator = EventOrchestrator::builder()
        .store_url(&url)
        .transport_url(&url)
        .build()
        .await
        .unwrap();
    let handled = record_orders(&orchestrator).await;
    for event_type in ["order.placed", "order.shipped", "order.delivered"] {
        orchestrator
            .publish_event(event_type, json!({ "order_id": "o-1" }))
            .await
            .unwrap();
    }
    wait_until("three events handled", Duration::from_secs(20), || {
        handled.lock().unwrap().len() == 3
    })
    .await;
    let mut handled = handled.lock().unwrap().clone();
    handled.sort_by_key(|(_, position)| *position);
    let types: Vec<&str> = handled.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, ["order.placed", "order.shipped", "order.delivered"]);
    assert!(
        handled.iter().all(|(_, position)| position.is_some()),
        "handlers see the stored positions: {handled:?}"
    );
    // The events went through the transport's table, and every delivery was acked.
    let conn = store.pool().get().await.unwrap();
    let mut left = i64::MAX;
    for _ in 0..100 {
        left = conn
            .query_one(
                &format!("SELECT count(*) FROM \"{schema}\".transport_queue"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "every delivery acked");
    let subscribed: i64 = conn
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".transport_subscriptions"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(subscribed > 0, "the subscription went through PostgreSQL");
    drop(conn);
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

/// A row of the log that is no event (written by hand) does not stop delivery: the relay
/// dead-letters a record of it, naming where it was, and goes on with the events after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_dead_lettered_by_the_relay_and_delivery_goes_on() {
    let schema = schema("unreadable");
    let Some(store) = store(&schema).await else {
        return;
    };
    let _cleanup = DropSchema(schema.clone());
    let orchestrator = process(&store).await;
    let handled = record_orders(&orchestrator).await;
    orchestrator
        .publish_event("order.placed", json!({ "order_id": "o-1" }))
        .await
        .unwrap();
    wait_until("the first event handled", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 1
    })
    .await;

    // Written as the PostgreSQL module docs tell a tool to: under the append lock, at the
    // next position; valid JSON, but no CloudEvent.
    let (mut client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock(1330791233, hashtext($1))",
        &[&schema],
    )
    .await
    .unwrap();
    tx.execute(
        &format!(
            "INSERT INTO \"{schema}\".events \
             (position, stream_id, stream_version, event_id, event_type, event_time, event) \
             VALUES (2, 'by-hand', 1, 'x-1', 'order.placed', now(), '{{\"specversion\":\"1.0\"}}')"
        ),
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    orchestrator
        .publish_event("order.shipped", json!({ "order_id": "o-1" }))
        .await
        .unwrap();
    wait_until(
        "the event after the bad row handled",
        Duration::from_secs(10),
        || handled.lock().unwrap().len() == 2,
    )
    .await;
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled,
        [
            ("order.placed".to_owned(), Some(1)),
            ("order.shipped".to_owned(), Some(3))
        ]
    );
    let letters = orchestrator
        .dead_letters()
        .list(&orchestrator::core::DeadLetterQuery::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.event.event_type(), "orchestrator.undecodable");
    assert_eq!(letter.subscription, "relay:default");
    assert!(
        letter.reason.contains("after position 1"),
        "{}",
        letter.reason
    );
    let record: Value = letter.event.data().unwrap();
    assert_eq!(record["store"], "postgres");
    assert_eq!(record["after_position"], 1);
    assert_eq!(orchestrator.relay_status().dead_lettered, 1);
    orchestrator.shutdown(Duration::from_secs(5)).await;
}
