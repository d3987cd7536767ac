//! The query bus: cache hits, TTL, invalidation by projections, read-your-writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::shared;
use futures::FutureExt;
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, HandlerError, ManualClock};
use orchestrator_cqrs::{
    Error, FieldError, HandlerKind, Query, QueryBus, QueryCacheConfig, QueryOptions, QueryRequest,
    ReadModelDefinition, ReadModelStore, ReadModelStoreExt,
};
use orchestrator_store::InMemoryEventStore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// A handler that counts its runs and echoes its parameters with the run number.
fn counting(
    runs: &Arc<AtomicU32>,
) -> impl Fn(Value) -> futures::future::Ready<Result<Value, HandlerError>> + Send + Sync + 'static {
    let runs = runs.clone();
    move |params: Value| {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        futures::future::ready(Ok(json!({ "params": params, "run": run })))
    }
}

async fn append(store: &Arc<dyn EventStore>, stream: &str, kind: &str, data: Value) -> u64 {
    let event = EventEnvelope::new(kind, &data).unwrap();
    store
        .append(stream, ExpectedVersion::Any, vec![event])
        .await
        .unwrap()
        .last_position
}

/// The users read model: one document per user id.
fn users() -> ReadModelDefinition {
    let project = |event: EventEnvelope, docs: Arc<dyn ReadModelStore>| async move {
        let user: Value = event.data()?;
        let id = user["user_id"].as_str().unwrap_or_default().to_owned();
        docs.put(&id, user).await?;
        Ok::<_, HandlerError>(())
    };
    ReadModelDefinition::new("users", project).event_types(["user.created", "user.renamed"])
}

#[tokio::test]
async fn a_repeated_query_is_answered_from_the_cache() {
    let bus = QueryBus::new();
    let runs = Arc::new(AtomicU32::new(0));
    bus.register("get_user", counting(&runs)).unwrap();

    let first = bus
        .execute("get_user", json!({ "user_id": "1", "full": true }))
        .await
        .unwrap();
    // Key order does not matter: the parameters are compared in canonical form.
    let params: Value = serde_json::from_str(r#"{"full":true,"user_id":"1"}"#).unwrap();
    let second = bus.execute("get_user", params).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    bus.execute("get_user", json!({ "user_id": "2" }))
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "other parameters, other entry"
    );
    let fresh = bus
        .execute_request(QueryRequest::new("get_user", json!({ "user_id": "2" })).bypass_cache())
        .await
        .unwrap();
    assert_eq!(fresh["run"], 3);
    assert_eq!(bus.cached_results().await, 2);
    bus.clear_cache();
    bus.execute("get_user", json!({ "user_id": "2" }))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn cached_results_expire_after_the_ttl() {
    let clock = ManualClock::starting_at_epoch();
    let bus = QueryBus::builder()
        .cache(QueryCacheConfig::new(100, Duration::from_secs(60)))
        .clock(Arc::new(clock.clone()))
        .build();
    let runs = Arc::new(AtomicU32::new(0));
    bus.register("stats", counting(&runs)).unwrap();

    bus.execute("stats", json!({})).await.unwrap();
    clock.advance(Duration::from_secs(59));
    bus.execute("stats", json!({})).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "still fresh at 59 s");
    clock.advance(Duration::from_secs(1));
    let after = bus.execute("stats", json!({})).await.unwrap();
    assert_eq!(
        (after["run"].as_u64(), runs.load(Ordering::SeqCst)),
        (Some(2), 2)
    );
}

#[tokio::test]
async fn the_cache_holds_at_most_its_capacity() {
    let bus = QueryBus::builder()
        .cache(QueryCacheConfig::new(3, Duration::from_secs(60)))
        .build();
    let runs = Arc::new(AtomicU32::new(0));
    bus.register("q", counting(&runs)).unwrap();
    for i in 0..50 {
        bus.execute("q", json!({ "i": i })).await.unwrap();
    }
    assert!(bus.cached_results().await <= 3);
}

#[tokio::test]
async fn projections_invalidate_only_the_entries_their_events_affect() {
    let store = shared(InMemoryEventStore::new());
    let bus = QueryBus::new();
    let users = bus.attach_read_model(store.clone(), users()).await.unwrap();

    let runs = Arc::new(AtomicU32::new(0));
    let (docs, counter) = (users.storage().clone(), runs.clone());
    let options = QueryOptions::new()
        .reads("users")
        .invalidated_by(["user.renamed"])
        .keyed_by_stream(|params| Some(format!("user-{}", params["user_id"].as_str()?)));
    bus.register_with("get_user", options, move |params: Value| {
        let (docs, counter) = (docs.clone(), counter.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let id = params["user_id"].as_str().unwrap_or_default();
            Ok::<_, HandlerError>(docs.get(id).await?.unwrap_or(Value::Null))
        }
    })
    .unwrap();
    // Depends on every event of the read model (the default).
    let count_runs = Arc::new(AtomicU32::new(0));
    let (docs, counter) = (users.storage().clone(), count_runs.clone());
    bus.register_with(
        "count_users",
        QueryOptions::new().reads("users"),
        move |_: Value| {
            let (docs, counter) = (docs.clone(), counter.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(json!(docs.list().await?.len()))
            }
        },
    )
    .unwrap();

    append(
        &store,
        "user-1",
        "user.created",
        json!({ "user_id": "1", "name": "Ann" }),
    )
    .await;
    let p = append(
        &store,
        "user-2",
        "user.created",
        json!({ "user_id": "2", "name": "Bob" }),
    )
    .await;
    let get = |id: &str| QueryRequest::new("get_user", json!({ "user_id": id }));
    let count = || QueryRequest::new("count_users", json!({}));
    assert_eq!(
        bus.execute_request(get("1").at_least(p)).await.unwrap()["name"],
        "Ann"
    );
    assert_eq!(bus.execute_request(get("2")).await.unwrap()["name"], "Bob");
    assert_eq!(bus.execute_request(count()).await.unwrap(), 2);
    for _ in 0..3 {
        bus.execute_request(get("1")).await.unwrap();
        bus.execute_request(get("2")).await.unwrap();
        bus.execute_request(count()).await.unwrap();
    }
    assert_eq!(
        (
            runs.load(Ordering::SeqCst),
            count_runs.load(Ordering::SeqCst)
        ),
        (2, 1)
    );

    let p = append(
        &store,
        "user-1",
        "user.renamed",
        json!({ "user_id": "1", "name": "Anna" }),
    )
    .await;
    users.wait_for_position(p).await.unwrap();
    assert_eq!(
        bus.execute_request(get("1")).await.unwrap()["name"],
        "Anna",
        "invalidated"
    );
    assert_eq!(bus.execute_request(get("2")).await.unwrap()["name"], "Bob");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "user 2's entry was not affected"
    );
    bus.execute_request(count()).await.unwrap();
    assert_eq!(
        count_runs.load(Ordering::SeqCst),
        2,
        "any event of the read model invalidates"
    );

    // Events the read model does not apply invalidate nothing.
    let p = append(&store, "order-1", "order.placed", json!({})).await;
    users.wait_for_position(p).await.unwrap();
    assert_eq!(users.position(), p);
    bus.execute_request(count()).await.unwrap();
    assert_eq!(count_runs.load(Ordering::SeqCst), 2);
    bus.shutdown().await;
    assert!(users.status().is_none());
}

/// A users read model that applies one event per permit.
fn gated_users(gate: &Arc<Semaphore>) -> ReadModelDefinition {
    let gate = gate.clone();
    let project = move |event: EventEnvelope, docs: Arc<dyn ReadModelStore>| {
        let gate = gate.clone();
        async move {
            gate.acquire().await?.forget();
            let user: Value = event.data()?;
            let id = user["user_id"].as_str().unwrap_or_default().to_owned();
            docs.put(&id, user).await?;
            Ok::<_, HandlerError>(())
        }
    };
    ReadModelDefinition::new("users", project).event_types(["user.created"])
}

fn register_get_user(bus: &QueryBus, docs: Arc<dyn ReadModelStore>) {
    bus.register_with(
        "get_user",
        QueryOptions::new().reads("users"),
        move |params: Value| {
            let docs = docs.clone();
            async move {
                let id = params["user_id"].as_str().unwrap_or_default();
                Ok::<_, HandlerError>(docs.get(id).await?.unwrap_or(Value::Null))
            }
        },
    )
    .unwrap();
}

#[tokio::test]
async fn read_your_writes_waits_for_the_projection() {
    let store = shared(InMemoryEventStore::new());
    let gate = Arc::new(Semaphore::new(0));
    let bus = QueryBus::new();
    let users = bus
        .attach_read_model(store.clone(), gated_users(&gate))
        .await
        .unwrap();
    register_get_user(&bus, users.storage().clone());

    let written = append(
        &store,
        "user-1",
        "user.created",
        json!({ "user_id": "1", "name": "Ann" }),
    )
    .await;
    let get = || QueryRequest::new("get_user", json!({ "user_id": "1" }));
    // Without asking, the stale answer (and it is not cached past the projection's event).
    assert_eq!(
        bus.execute_request(get().bypass_cache()).await.unwrap(),
        Value::Null
    );

    let mut waiting = Box::pin(bus.execute_request(get().at_least(written)));
    for _ in 0..10 {
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "must wait for the projection"
        );
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    let user = waiting.await.unwrap();
    assert_eq!(user["name"], "Ann");
    assert_eq!(users.position(), written);
    // The stale `null` cached earlier is gone too.
    assert_eq!(bus.execute_request(get()).await.unwrap()["name"], "Ann");
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_read_model_that_does_not_catch_up_in_time_is_an_error() {
    let store = shared(InMemoryEventStore::new());
    let gate = Arc::new(Semaphore::new(0));
    let bus = QueryBus::builder()
        .wait_timeout(Duration::from_secs(5))
        .build();
    let users = bus
        .attach_read_model(store.clone(), gated_users(&gate))
        .await
        .unwrap();
    register_get_user(&bus, users.storage().clone());
    let written = append(&store, "user-1", "user.created", json!({ "user_id": "1" })).await;

    let err = bus
        .execute_request(QueryRequest::new("get_user", json!({ "user_id": "1" })).at_least(written))
        .await
        .unwrap_err();
    match &err {
        Error::NotCaughtUp {
            read_model,
            reached,
            wanted,
            ..
        } => {
            assert_eq!(
                (read_model.as_str(), *reached, *wanted),
                ("users", 0, written)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_temporary());
    gate.add_permits(1);
    users.wait_for_position(written).await.unwrap();
    bus.shutdown().await;
}

#[tokio::test]
async fn a_parked_read_model_fails_read_your_writes_at_once() {
    let store = shared(InMemoryEventStore::new());
    // The clock never moves: only the projection parking can end the wait.
    let bus = QueryBus::builder()
        .clock(Arc::new(ManualClock::starting_at_epoch()))
        .build();
    let broken = |_: EventEnvelope, _: Arc<dyn ReadModelStore>| async {
        Err::<(), _>(HandlerError::permanent("cannot read this event"))
    };
    bus.attach_read_model(store.clone(), ReadModelDefinition::new("broken", broken))
        .await
        .unwrap();
    bus.register("q", |_: Value| async { Ok::<_, HandlerError>(Value::Null) })
        .unwrap();
    let written = append(&store, "s-1", "thing.happened", json!({})).await;
    let err = bus
        .execute_request(QueryRequest::new("q", json!({})).at_least(written))
        .await
        .unwrap_err();
    let Error::NotCaughtUp {
        state: Some(state), ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(
        state.contains("parked") && state.contains("cannot read this event"),
        "{state}"
    );
}

#[derive(Serialize, Deserialize)]
struct GetBalance {
    account_id: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Balance {
    account_id: String,
    balance: i64,
}

impl Query for GetBalance {
    const NAME: &'static str = "get_balance";
    type Output = Option<Balance>;
}

#[tokio::test]
async fn typed_queries_read_typed_documents() {
    let store = shared(InMemoryEventStore::new());
    let bus = QueryBus::new();
    let project = |event: EventEnvelope, docs: Arc<dyn ReadModelStore>| async move {
        let account = event.stream_id().unwrap_or_default().to_owned();
        let amount: i64 = event.data()?;
        let mut balance = docs.get_as::<Balance>(&account).await?.unwrap_or(Balance {
            account_id: account.clone(),
            balance: 0,
        });
        balance.balance += amount;
        docs.put_as(&account, &balance).await?;
        Ok::<_, HandlerError>(())
    };
    let balances = bus
        .attach_read_model(store.clone(), ReadModelDefinition::new("balances", project))
        .await
        .unwrap();
    let docs = balances.storage().clone();
    bus.register_query(QueryOptions::new(), move |q: GetBalance| {
        let docs = docs.clone();
        async move { Ok::<_, HandlerError>(docs.get_as::<Balance>(&q.account_id).await?) }
    })
    .unwrap();
    append(&store, "acc-1", "money.moved", json!(30)).await;
    let written = append(&store, "acc-1", "money.moved", json!(-10)).await;

    let balance = bus
        .query_after(
            GetBalance {
                account_id: "acc-1".into(),
            },
            written,
        )
        .await
        .unwrap();
    assert_eq!(
        balance,
        Some(Balance {
            account_id: "acc-1".into(),
            balance: 20
        })
    );
    let none = bus
        .query(GetBalance {
            account_id: "acc-2".into(),
        })
        .await
        .unwrap();
    assert_eq!(none, None);
    // Typed queries are reachable by name too.
    let dynamic = bus
        .execute("get_balance", json!({ "account_id": "acc-1" }))
        .await
        .unwrap();
    assert_eq!(dynamic["balance"], 20);
    let err = bus.execute("get_balance", json!({})).await.unwrap_err();
    assert_eq!(err.field_errors().unwrap()[0].field, "/account_id");
    bus.shutdown().await;
}

#[tokio::test]
async fn bad_queries_are_reported_clearly() {
    let bus = QueryBus::new();
    let err = bus.execute("nope", json!({})).await.unwrap_err();
    assert!(matches!(&err, Error::NoHandler { kind: HandlerKind::Query, name } if name == "nope"));

    let runs = Arc::new(AtomicU32::new(0));
    bus.register("q", counting(&runs)).unwrap();
    assert!(matches!(
        bus.register("q", counting(&runs)),
        Err(Error::AlreadyRegistered { .. })
    ));
    assert!(matches!(
        bus.register(" ", counting(&runs)),
        Err(Error::InvalidInput { .. })
    ));

    let needs_id = |params: &Value| match params["id"].as_str() {
        Some(_) => vec![],
        None => vec![FieldError::new("/id", "is required")],
    };
    bus.register_with(
        "by_id",
        QueryOptions::new().validator(needs_id),
        counting(&runs),
    )
    .unwrap();
    let err = bus.execute("by_id", json!({})).await.unwrap_err();
    assert!(matches!(
        err,
        Error::Validation {
            kind: HandlerKind::Query,
            ..
        }
    ));

    // Failures are not cached.
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    bus.register("flaky", move |_: Value| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => Err(HandlerError::retryable("database busy")),
                _ => Ok(json!("ok")),
            }
        }
    })
    .unwrap();
    let err = bus.execute("flaky", json!({})).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Handler {
                kind: HandlerKind::Query,
                ..
            }
        ) && err.is_temporary()
    );
    assert_eq!(bus.execute("flaky", json!({})).await.unwrap(), "ok");

    // Waiting for a read model that is not attached.
    bus.register_with(
        "reads_missing",
        QueryOptions::new().reads("ghost"),
        counting(&runs),
    )
    .unwrap();
    let err = bus
        .execute_request(QueryRequest::new("reads_missing", json!({})).at_least(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`ghost` is not attached"), "{err}");

    // Uncached queries always run.
    bus.register_with("live", QueryOptions::new().no_cache(), counting(&runs))
        .unwrap();
    let before = runs.load(Ordering::SeqCst);
    bus.execute("live", json!({})).await.unwrap();
    bus.execute("live", json!({})).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), before + 2);
    assert_eq!(
        bus.query_names(),
        ["by_id", "flaky", "live", "q", "reads_missing"]
    );
}

#[tokio::test]
async fn an_in_memory_read_model_rebuilds_from_the_start_when_attached_again() {
    let store = shared(InMemoryEventStore::new());
    append(
        &store,
        "user-1",
        "user.created",
        json!({ "user_id": "1", "name": "Ann" }),
    )
    .await;
    let first = QueryBus::new();
    let users_1 = first
        .attach_read_model(store.clone(), users())
        .await
        .unwrap();
    users_1.wait_for_position(1).await.unwrap();
    first.shutdown().await; // writes a checkpoint past the user event

    // A new process: the checkpoint says "done", but the new in-memory documents are empty;
    // their own position (0) wins and the user comes back.
    let second = QueryBus::new();
    let users_2 = second
        .attach_read_model(store.clone(), users())
        .await
        .unwrap();
    users_2.wait_for_position(1).await.unwrap();
    assert_eq!(
        users_2.storage().get("1").await.unwrap().unwrap()["name"],
        "Ann"
    );
    assert!(
        second.attach_read_model(store, users()).await.is_err(),
        "attached twice"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn stopping_a_read_model_releases_queries_waiting_for_it() {
    let store = shared(InMemoryEventStore::new());
    let bus = QueryBus::builder()
        .wait_timeout(Duration::from_secs(600))
        .build();
    let users = bus.attach_read_model(store.clone(), users()).await.unwrap();
    register_get_user(&bus, users.storage().clone());
    // A position nobody has written yet: the query waits for it.
    let waiting = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.execute_request(
                QueryRequest::new("get_user", json!({ "user_id": "1" })).at_least(99),
            )
            .await
        }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let status = users.stop().await.unwrap();
    assert!(status.is_finished());
    let err = waiting.await.unwrap().unwrap_err();
    let Error::NotCaughtUp {
        state: Some(state),
        wanted: 99,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(state, "stopped");
    assert!(users.stop().await.is_none(), "already stopped");
}
