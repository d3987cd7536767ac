//! Store-first delivery through the facade: `publish` appends, the outbox relay delivers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator::prelude::*;
use orchestrator::store::schema::SchemaVersion;
use orchestrator::{RelayOptions, RelayState};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

use support::collect;

async fn take(rx: &mut mpsc::UnboundedReceiver<EventEnvelope>, count: usize) -> Vec<EventEnvelope> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let event = timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} events delivered in time", got.len()))
            .expect("the subscription is open");
        got.push(event);
    }
    got
}

fn n(event: &EventEnvelope) -> u64 {
    event.data::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn published_events_reach_subscribers_in_order_with_their_positions() {
    let orchestrator = EventOrchestrator::new();
    let (_subscription, mut rx) = collect(&orchestrator, "order.#").await;
    for i in 1..=200u64 {
        orchestrator
            .publish_event("order.placed", json!({ "n": i }))
            .await
            .unwrap();
    }
    let last = EventEnvelope::new("order.placed", &json!({ "n": 201 })).unwrap();
    orchestrator.publish_and_wait(last).await.unwrap();
    let status = orchestrator.relay_status();
    assert_eq!(status.relayed_position, 201, "{status:?}");
    assert_eq!(status.state, RelayState::Relaying);

    let got = take(&mut rx, 201).await;
    let order: Vec<u64> = got.iter().map(n).collect();
    assert_eq!(
        order,
        (1..=201).collect::<Vec<_>>(),
        "delivered in publish order"
    );
    let positions: Vec<u64> = got.iter().map(|e| e.global_position().unwrap()).collect();
    assert_eq!(
        positions,
        (1..=201).collect::<Vec<_>>(),
        "each with its stored position"
    );
    assert_eq!(got[0].stream_id(), Some("order.placed"));
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

/// Before the relay, a handler publishing into its own subscription waited for room in its
/// own full queue, which only it could empty.
#[tokio::test]
async fn a_handler_publishing_into_its_own_pattern_cannot_deadlock() {
    const TOTAL: u64 = 10_000;
    let orchestrator = EventOrchestrator::new();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let publisher = orchestrator.clone();
    let seen = Arc::clone(&handled);
    let _subscription = orchestrator
        .subscribe_with(
            SubscriptionConfig::new("chain.#").concurrency(1),
            move |event: EventEnvelope| {
                let publisher = publisher.clone();
                let seen = Arc::clone(&seen);
                let done_tx = done_tx.clone();
                async move {
                    let i = n(&event);
                    seen.lock().unwrap().push(i);
                    if i == 0 {
                        // A burst far beyond the in-process queue's capacity (1,024), from
                        // inside the handler that alone drains that queue.
                        for k in 1..=TOTAL {
                            publisher
                                .publish_event("chain.step", json!({ "n": k }))
                                .await
                                .map_err(|e| HandlerError::permanent(e.to_string()))?;
                        }
                    }
                    if i == TOTAL {
                        done_tx.send(()).ok();
                    }
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await
        .unwrap();
    orchestrator
        .publish_event("chain.start", json!({ "n": 0 }))
        .await
        .unwrap();
    timeout(Duration::from_secs(120), done.recv())
        .await
        .expect("the last event is handled: no deadlock")
        .unwrap();
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled,
        (0..=TOTAL).collect::<Vec<_>>(),
        "every event, once, in order"
    );
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn events_appended_to_the_store_are_delivered_but_bookkeeping_streams_are_not() {
    let orchestrator = EventOrchestrator::new();
    let (_subscription, mut rx) = collect(&orchestrator, "#").await;
    let store = orchestrator.store();
    let event = |t: &str, i: u64| EventEnvelope::new(t, &json!({ "n": i })).unwrap();
    // What an aggregate repository does: append, without publishing.
    store
        .append(
            "order-1",
            ExpectedVersion::NoStream,
            vec![event("order.placed", 1)],
        )
        .await
        .unwrap();
    store
        .append(
            "$checkpoint-x",
            ExpectedVersion::Any,
            vec![event("checkpoint.saved", 2)],
        )
        .await
        .unwrap();
    store
        .append(
            "saga-0191",
            ExpectedVersion::Any,
            vec![event("saga.started", 3)],
        )
        .await
        .unwrap();
    orchestrator
        .publish_and_wait(event("order.shipped", 4))
        .await
        .unwrap();
    let got = take(&mut rx, 2).await;
    assert_eq!(got.iter().map(n).collect::<Vec<_>>(), [1, 4]);
    assert_eq!(got[0].stream_id(), Some("order-1"));
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "no bookkeeping event is delivered"
    );
    assert_eq!(orchestrator.relay_status().relayed_position, 4);
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn shutdown_delivers_what_is_stored_then_refuses_publishes() {
    let orchestrator = EventOrchestrator::new();
    let (_subscription, mut rx) = collect(&orchestrator, "burst.#").await;
    for i in 0..2_000u64 {
        orchestrator
            .publish_event("burst.event", json!({ "n": i }))
            .await
            .unwrap();
    }
    orchestrator.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        take(&mut rx, 2_000).await.len(),
        2_000,
        "all delivered before shutdown ended"
    );
    assert_eq!(orchestrator.relay_status().state, RelayState::Stopped);
    let refused = orchestrator
        .publish_event("burst.event", json!({ "n": 1 }))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("shut down"), "{refused}");
}

#[tokio::test]
async fn an_event_the_transport_refuses_is_dead_lettered_and_the_relay_goes_on() {
    // A store shared with a writer that does not validate (another tool, an older version
    // of the application), so only the relay's publish finds the event invalid.
    let raw = Arc::new(InMemoryEventStore::new());
    let orchestrator = EventOrchestrator::builder()
        .store(raw.clone())
        .build()
        .await
        .unwrap();
    let (_subscription, mut rx) = collect(&orchestrator, "#").await;
    orchestrator
        .schemas()
        .register(SchemaVersion::new(
            "user.created",
            1,
            json!({ "type": "object", "required": ["name"] }),
        ))
        .unwrap();
    let invalid = || EventEnvelope::new("user.created", &json!({ "n": 1 })).unwrap();
    let refused = orchestrator
        .store()
        .append("user-1", ExpectedVersion::Any, vec![invalid()])
        .await
        .unwrap_err();
    assert_eq!(
        refused.decode_field(),
        Some("/name"),
        "the facade's store validates"
    );
    raw.append("user-1", ExpectedVersion::Any, vec![invalid()])
        .await
        .unwrap();
    orchestrator
        .publish_and_wait(EventEnvelope::new("user.seen", &json!({ "n": 2 })).unwrap())
        .await
        .unwrap();
    let got = take(&mut rx, 1).await;
    assert_eq!(n(&got[0]), 2, "the next event is delivered");
    let letters = orchestrator
        .dead_letters()
        .list(&DeadLetterQuery::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].subscription, "relay:default");
    assert_eq!(letters[0].event.event_type(), "user.created");
    assert!(
        letters[0].reason.contains("could not publish"),
        "{}",
        letters[0].reason
    );
    assert_eq!(orchestrator.relay_status().dead_lettered, 1);
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

/// Stored events of an old version are read at the latest version on every read path of
/// the facade: its store, read models, replay, and deliveries.
#[tokio::test]
async fn every_read_path_sees_the_latest_version() {
    let raw = Arc::new(InMemoryEventStore::new());
    // Written by the application's previous release, before version 2 existed.
    raw.append(
        "user-1",
        ExpectedVersion::Any,
        vec![EventEnvelope::new("user.renamed", &json!({ "name": "Ada Lovelace" })).unwrap()],
    )
    .await
    .unwrap();
    let orchestrator = EventOrchestrator::builder()
        .store(raw.clone())
        .build()
        .await
        .unwrap();
    orchestrator
        .schemas()
        .register(SchemaVersion::new(
            "user.renamed",
            1,
            json!({ "type": "object", "required": ["name"] }),
        ))
        .unwrap();
    orchestrator
        .schemas()
        .register(
            SchemaVersion::new(
                "user.renamed",
                2,
                json!({ "type": "object", "required": ["first", "last"] }),
            )
            .upcast_from_previous(|mut data| {
                let name = data["name"].as_str().unwrap_or_default().to_owned();
                let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
                data = json!({ "first": first, "last": last });
                Ok(data)
            }),
        )
        .unwrap();
    let latest = |event: &EventEnvelope| {
        assert_eq!(event.schema_version(), 2, "{event:?}");
        event.data::<serde_json::Value>().unwrap()["first"].clone()
    };

    let store = orchestrator.store();
    let by_stream = store.read_stream("user-1", 1, 10).await.unwrap();
    assert_eq!(latest(&by_stream[0]), "Ada");
    let by_position = store.read_all(ReadAll::from(1, 10)).await.unwrap();
    assert_eq!(latest(&by_position[0]), "Ada");
    assert_eq!(
        raw.read_all(ReadAll::from(1, 10)).await.unwrap()[0].schema_version(),
        1
    );

    // Replay to a subscriber, and the relay's delivery.
    let (_subscription, mut rx) = collect(&orchestrator, "user.#").await;
    orchestrator
        .replay_events(ReplayFilter::all())
        .await
        .unwrap();
    assert_eq!(latest(&take(&mut rx, 1).await[0]), "Ada", "replayed");
    orchestrator.start_relay();
    assert_eq!(latest(&take(&mut rx, 1).await[0]), "Ada", "relayed");

    // A read model's projection.
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&names);
    let definition = orchestrator::cqrs::ReadModelDefinition::new(
        "names",
        move |event: EventEnvelope, _documents| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(event.schema_version());
                Ok::<_, HandlerError>(())
            }
        },
    );
    let model = orchestrator.attach_read_model(definition).await.unwrap();
    model.wait_for_position(1).await.unwrap();
    assert_eq!(*names.lock().unwrap(), [2], "projected at version 2");
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

/// The embedded durable default: what was stored and not delivered before a stop is
/// delivered after the restart, once; the checkpoint keeps it from coming back again.
#[tokio::test]
async fn the_file_store_relays_after_a_restart_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let open = |relay: RelayOptions| {
        let path = dir.path().to_owned();
        async move {
            EventOrchestrator::builder()
                .store(Arc::new(FileEventStore::open(path).unwrap()))
                .relay(relay)
                .build()
                .await
                .unwrap()
        }
    };

    // A process that stores and never relays (as if killed before its relay ran).
    let first = open(RelayOptions::disabled()).await;
    for i in 1..=50u64 {
        first
            .publish_event("parcel.sent", json!({ "n": i }))
            .await
            .unwrap();
    }
    let unrelayed = first
        .publish_and_wait(EventEnvelope::new("parcel.sent", &json!({ "n": 51 })).unwrap())
        .await
        .unwrap_err();
    assert!(unrelayed.to_string().contains("disabled"), "{unrelayed}");
    first.shutdown(Duration::from_secs(5)).await;
    drop(first);

    // Restart: subscribe, then start the relay; everything stored arrives.
    let second = open(RelayOptions::default()).await;
    let (_subscription, mut rx) = collect(&second, "parcel.#").await;
    assert_eq!(
        second.relay_status().state,
        RelayState::Idle,
        "waits for start_relay"
    );
    second.start_relay();
    let got = take(&mut rx, 51).await;
    assert_eq!(
        got.iter().map(n).collect::<Vec<_>>(),
        (1..=51).collect::<Vec<_>>()
    );
    second.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        second.relay_status().checkpoint,
        51,
        "checkpointed on shutdown"
    );
    drop(second);

    // And again: only what is new.
    let third = open(RelayOptions::default()).await;
    let (_subscription, mut rx) = collect(&third, "parcel.#").await;
    third.start_relay();
    third
        .publish_and_wait(EventEnvelope::new("parcel.sent", &json!({ "n": 52 })).unwrap())
        .await
        .unwrap();
    let got = take(&mut rx, 1).await;
    assert_eq!(n(&got[0]), 52);
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing relayed twice"
    );
    third.shutdown(Duration::from_secs(5)).await;
}

/// On the in-process transport the checkpoint waits until handlers settled what was
/// published: a checkpoint past queued events would lose them in a crash.
#[tokio::test]
async fn the_in_process_checkpoint_waits_for_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let orchestrator = EventOrchestrator::builder()
        .store(Arc::new(FileEventStore::open(dir.path()).unwrap()))
        .relay(RelayOptions::default().checkpoint_interval(Duration::from_millis(20)))
        .build()
        .await
        .unwrap();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let _subscription = orchestrator
        .subscribe("slow.#", move |_event: EventEnvelope| {
            let mut release = release.clone();
            async move {
                release.wait_for(|go| *go).await.ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    for i in 1..=5u64 {
        orchestrator
            .publish_and_wait(EventEnvelope::new("slow.event", &json!({ "n": i })).unwrap())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        orchestrator.relay_status().checkpoint,
        0,
        "handlers still busy"
    );
    release_tx.send_replace(true);
    timeout(WAIT, async {
        while orchestrator.relay_status().checkpoint < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("checkpointed once the handlers finished");
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

/// A client that sends a command again with the same id (after a timeout, say) gets the
/// events of the first run back instead of a second copy: their ids derive from the
/// command's, and the store's appends are idempotent.
#[tokio::test]
async fn a_retried_command_writes_its_events_once() {
    use orchestrator::cqrs::CommandRequest;
    let orchestrator = EventOrchestrator::new();
    let publisher = orchestrator.clone();
    orchestrator
        .register_command_handler("ship", move |order: serde_json::Value| {
            let publisher = publisher.clone();
            async move {
                publisher
                    .publish_event("order.packed", order.clone())
                    .await
                    .map_err(|e| HandlerError::permanent(e.to_string()))?;
                let id = publisher
                    .publish_event("order.shipped", order)
                    .await
                    .map_err(|e| HandlerError::permanent(e.to_string()))?;
                Ok::<_, HandlerError>(json!({ "shipped": id.to_string() }))
            }
        })
        .unwrap();
    let send = || {
        orchestrator.send_command_with(
            CommandRequest::new("ship", json!({ "order": "o-1" })).with_id("cmd-42"),
        )
    };
    let first = send().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(first.value["shipped"], "cmd-42/2");
    assert_eq!(again.value, first.value);
    assert_eq!(again.position, first.position, "the original positions");
    let stored = orchestrator
        .store()
        .read_all(ReadAll::from(1, 100))
        .await
        .unwrap();
    let ids: Vec<String> = stored.iter().map(|e| e.id().to_string()).collect();
    assert_eq!(ids, ["cmd-42/1", "cmd-42/2"], "written once");

    // Without an id, each send is a new command.
    orchestrator
        .send_command("ship", json!({ "order": "o-2" }))
        .await
        .unwrap();
    orchestrator
        .send_command("ship", json!({ "order": "o-2" }))
        .await
        .unwrap();
    assert_eq!(orchestrator.store().head_position().await.unwrap(), 6);
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

/// A saga step's events get ids derived from the step's idempotency key, so the same
/// invocation run again (after a crash, recovery re-runs it with the same attempt and key)
/// writes nothing twice; its compensation derives its own.
#[tokio::test]
async fn a_saga_steps_events_are_named_by_its_idempotency_key() {
    use orchestrator::core::derived_id::derive_ids;
    use orchestrator::saga::StepInfo;
    let orchestrator = EventOrchestrator::new();
    let (publisher, undo) = (orchestrator.clone(), orchestrator.clone());
    orchestrator
        .define_saga(
            "order",
            vec![
                SagaStep::new("reserve", move |context: serde_json::Value| {
                    let publisher = publisher.clone();
                    async move {
                        publisher.publish_event("stock.reserved", json!({})).await?;
                        publisher.publish_event("stock.counted", json!({})).await?;
                        let info = StepInfo::from_context(&context).expect("called by the saga");
                        Ok::<_, Error>(json!({ "key": info.idempotency_key }))
                    }
                })
                .with_compensation(move |_: serde_json::Value| {
                    let undo = undo.clone();
                    async move {
                        undo.publish_event("stock.released", json!({})).await?;
                        Ok::<_, Error>(())
                    }
                }),
                SagaStep::new("charge", |_: serde_json::Value| async {
                    Err::<serde_json::Value, _>(HandlerError::permanent("card declined"))
                }),
            ],
        )
        .unwrap();
    let outcome = orchestrator.start_saga("order", json!({})).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let key = outcome.context["key"].as_str().unwrap().to_owned();
    assert_eq!(key, format!("{}:reserve:1", outcome.id));

    let events = |orchestrator: EventOrchestrator| async move {
        orchestrator
            .store()
            .read_all(ReadAll::from(1, 100))
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type().starts_with("stock."))
            .map(|e| (e.event_type().to_owned(), e.id().to_string()))
            .collect::<Vec<_>>()
    };
    let written = events(orchestrator.clone()).await;
    assert_eq!(
        written,
        [
            ("stock.reserved".to_owned(), format!("{key}/1")),
            ("stock.counted".to_owned(), format!("{key}/2")),
            (
                "stock.released".to_owned(),
                format!("{}:reserve:compensate:1/1", outcome.id)
            ),
        ]
    );

    // The same invocation again, as recovery runs it after a crash: nothing new is stored.
    derive_ids(key.as_str(), async {
        orchestrator
            .publish_event("stock.reserved", json!({}))
            .await?;
        orchestrator.publish_event("stock.counted", json!({})).await
    })
    .await
    .unwrap();
    assert_eq!(events(orchestrator.clone()).await, written, "written once");
    orchestrator.shutdown(Duration::from_secs(5)).await;
}

/// With an application name, unnamed subscriptions get stable names (their consumer
/// groups), derived from the application and the patterns, in the order they are made.
#[tokio::test]
async fn unnamed_subscriptions_are_named_after_the_application() {
    let orchestrator = EventOrchestrator::builder()
        .application("billing")
        .build()
        .await
        .unwrap();
    let (first, _) = collect(&orchestrator, "order.#").await;
    let (second, _) = collect(&orchestrator, "order.#").await;
    let (users, _) = collect(&orchestrator, "user.*").await;
    let named = orchestrator
        .subscribe_with(
            SubscriptionConfig::new("order.#").named("audit"),
            |_e: EventEnvelope| async { Ok::<_, HandlerError>(()) },
        )
        .await
        .unwrap();
    assert_eq!(first.name(), "billing:order.all");
    assert_eq!(second.name(), "billing:order.all-2");
    assert_eq!(users.name(), "billing:user.any");
    assert_eq!(named.name(), "audit", "a given name is kept");

    let anonymous = EventOrchestrator::new();
    let (unnamed, _) = collect(&anonymous, "order.#").await;
    assert!(unnamed.name().starts_with("sub-"), "{}", unnamed.name());
}
