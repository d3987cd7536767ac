//! `PostgresEventStore` against the live PostgreSQL: the event store conformance suite and
//! the PostgreSQL-specific guarantees (migrations, rows, retries, bad input, subscriptions
//! that outlive their listening connection).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use futures::StreamExt;
use orchestrator_backends::postgres::PostgresEventStore;
use orchestrator_core::testkit::store::run_all;
use orchestrator_core::{
    Error, EventEnvelope, EventFilter, EventStore, ExpectedVersion, ReadAll, cloudevents,
};
use postgres_support::{Cleanup, config, random_schema, raw, reachable, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let Some(url) = reachable().await else { return };
    let prefix = random_schema();
    let _cleanup = Cleanup::new(&url, &prefix);
    let case = AtomicUsize::new(0);
    run_all(|| {
        // Each case gets a store of its own in a schema of its own.
        let config = config(
            &url,
            &format!("{prefix}_{}", case.fetch_add(1, Ordering::Relaxed)),
        )
        .with_pool_size(8);
        async move { PostgresEventStore::connect(config).await.unwrap() }
    })
    .await;
}

/// Every case on one store, as the suite allows: cases must not assume an empty store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shared_postgres_store_conforms() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = PostgresEventStore::connect(config(&url, &schema).with_pool_size(8))
        .await
        .unwrap();
    run_all(|| {
        let store = store.clone();
        async move { store }
    })
    .await;
}

/// Processes that start at once on a new schema: every one connects, the migration runs
/// once, and connecting again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_migrate_once() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let config = config(&url, &schema).with_pool_size(1);
        tasks.spawn(async move { PostgresEventStore::connect(config).await });
    }
    for result in tasks.join_all().await {
        result.unwrap();
    }
    let again = store(&url, &schema).await;
    let rows = raw(&url)
        .await
        .query(
            &format!("SELECT version FROM \"{schema}\".migrations ORDER BY version"),
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(
        versions,
        [1, 2, 3, 4, 5],
        "each migration applied once, in order"
    );
    assert_eq!(again.head_position().await.unwrap(), 0);
}

/// A schema written by a newer library is refused, not written in an unknown shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    drop(store(&url, &schema).await);
    raw(&url)
        .await
        .execute(
            &format!(
                "INSERT INTO \"{schema}\".migrations (version, description) VALUES (999, 'future')"
            ),
            &[],
        )
        .await
        .unwrap();
    let Err(error) = PostgresEventStore::connect(config(&url, &schema)).await else {
        panic!("a schema at version 999 was accepted")
    };
    assert!(error.to_string().contains("999"), "{error}");
    assert!(!error.is_temporary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_hold_the_event_and_its_columns() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = store(&url, &schema).await;
    let event = EventEnvelope::new("order.placed", &serde_json::json!({"id": "o-1", "n": 2}))
        .unwrap()
        .with_correlation_id("c-1");
    let result = store
        .append("order-1", ExpectedVersion::NoStream, vec![event.clone()])
        .await
        .unwrap();
    let row = raw(&url)
        .await
        .query_one(
            &format!(
                "SELECT position, stream_id, stream_version, event_id, event_type, event::text, \
                 event->'data'->>'id' FROM \"{schema}\".events"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(result.last_position, 1);
    assert_eq!(row.get::<_, &str>(1), "order-1");
    assert_eq!(row.get::<_, i64>(2), 1);
    assert_eq!(row.get::<_, &str>(3), event.id().as_str());
    assert_eq!(row.get::<_, &str>(4), "order.placed");
    assert_eq!(row.get::<_, &str>(6), "o-1", "the JSON is queryable in SQL");
    // The `event` column is a complete CloudEvent, positions included.
    let stored = cloudevents::decode(row.get::<_, &str>(5).as_bytes()).unwrap();
    assert_eq!(stored.id(), event.id());
    assert_eq!(stored.stream_id(), Some("order-1"));
    assert_eq!(stored.stream_version(), Some(1));
    assert_eq!(stored.global_position(), Some(1));
    assert_eq!(stored.correlation_id(), Some("c-1"));
    assert_eq!(stored.data_bytes(), event.data_bytes());

    store.drop_schema().await.unwrap();
    let gone = raw(&url)
        .await
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&schema.as_str()],
        )
        .await
        .unwrap();
    assert!(gone.is_none(), "drop_schema left the schema");
}

/// A batch of events is one transaction under the append lock: it lands whole and
/// contiguous, and positions have no gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_take_contiguous_positions() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = store(&url, &schema).await;
    let batch: Vec<_> = (0..500)
        .map(|i| EventEnvelope::new("n.added", &i).unwrap())
        .collect();
    let tasks: Vec<_> = (0..4)
        .map(|s| {
            let (store, batch) = (store.clone(), batch.clone());
            tokio::spawn(async move {
                store
                    .append(&format!("s{s}"), ExpectedVersion::Any, batch)
                    .await
                    .unwrap()
            })
        })
        .collect();
    for task in tasks {
        let result = task.await.unwrap();
        assert_eq!(result.next_expected_version, 500);
        assert_eq!(result.last_position - result.first_position, 499);
    }
    assert_eq!(store.head_position().await.unwrap(), 2000);
    let all = store.read_all(ReadAll::from(0, usize::MAX)).await.unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.global_position().unwrap()).collect();
    assert_eq!(positions, (1..=2000).collect::<Vec<_>>());
}

/// A lost reply, simulated: writer A's append lands but A never hears of it, writer B (a
/// store of its own) appends to the same stream, and A sends the same batch again with the
/// same expectation. Nothing is written twice and A hears the original positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_reply_returns_the_original_despite_another_writer() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let a = store(&url, &schema).await;
    let b = store(&url, &schema).await;
    let event = |n: u64| EventEnvelope::new("order.line_added", &n).unwrap();
    let batch = vec![event(1), event(2), event(3)];
    let original = a
        .append("order-9", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let other = b
        .append("order-9", ExpectedVersion::Any, vec![event(99)])
        .await
        .unwrap();
    let head = a.head_position().await.unwrap();
    assert_eq!(head, other.last_position);
    let retried = a
        .append("order-9", ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert_eq!(retried, original);
    assert_eq!(a.head_position().await.unwrap(), head, "the retry wrote");

    let reordered = vec![batch[2].clone(), batch[0].clone(), batch[1].clone()];
    match a.append("order-9", ExpectedVersion::Any, reordered).await {
        Err(Error::DuplicateEvent {
            stream,
            event_id,
            version,
        }) => assert_eq!(
            (stream.as_str(), &event_id, version),
            ("order-9", batch[2].id(), 3)
        ),
        other => panic!("expected DuplicateEvent, got {other:?}"),
    }
}

/// Copies of one append sent at once by many writers, as a retry racing its original: one
/// copy is written, every writer hears its positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_copies_of_an_append_are_written_once() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = store(&url, &schema).await;
    let batch: Vec<_> = (0..20)
        .map(|i| EventEnvelope::new("n.added", &i).unwrap())
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (store, batch) = (store.clone(), batch.clone());
        tasks.spawn(async move {
            store
                .append("s", ExpectedVersion::Any, batch)
                .await
                .unwrap()
        });
    }
    let results = tasks.join_all().await;
    assert!(results.iter().all(|r| *r == results[0]), "{results:?}");
    assert_eq!(results[0].next_expected_version, 20);
    assert_eq!(store.head_position().await.unwrap(), 20);
}

/// Input PostgreSQL cannot hold is a typed error before anything is sent, never a panic or
/// a driver error; filters past its range still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_typed_error() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = store(&url, &schema).await;
    let far = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap();
    let beyond = EventEnvelope::new("t.far", &1).unwrap().with_time(far);
    // Years RFC 3339 cannot write (the CloudEvents time): refused by the encoder, as on
    // every store that writes CloudEvents, before anything is sent.
    for time in [
        chrono::DateTime::<Utc>::MIN_UTC,
        chrono::DateTime::<Utc>::MAX_UTC,
        Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
    ] {
        let odd = EventEnvelope::new("t.far", &1).unwrap().with_time(time);
        assert!(matches!(
            store.append("s", ExpectedVersion::Any, vec![odd]).await,
            Err(Error::Encode { .. })
        ));
    }
    // An id PostgreSQL text cannot hold.
    let nul = EventEnvelope::new("t.far", &1)
        .unwrap()
        .with_id(orchestrator_core::EventId::parse("a\0b").unwrap());
    assert!(matches!(
        store.append("s", ExpectedVersion::Any, vec![nul]).await,
        Err(Error::InvalidInput { .. })
    ));
    let lease = store.lease("a\0b").unwrap();
    assert!(matches!(
        lease.try_acquire().await,
        Err(Error::InvalidInput { .. })
    ));
    let inbox = store.inbox().unwrap();
    let nul_id = orchestrator_core::EventId::parse("a\0b").unwrap();
    assert!(matches!(
        inbox.record("g", &nul_id).await,
        Err(Error::InvalidInput { .. })
    ));
    for filter in [
        EventFilter::all().stream_prefix("s\0"),
        EventFilter::all().event_type("t\0far"),
    ] {
        let none = store
            .read_all(ReadAll::from(0, 10).filter(filter))
            .await
            .unwrap();
        assert!(none.is_empty());
    }
    // The last second RFC 3339 can write.
    store
        .append("s", ExpectedVersion::Any, vec![beyond])
        .await
        .unwrap();
    for stream in ["", "a\0b", "a\nb"] {
        assert!(matches!(
            store.append(stream, ExpectedVersion::Any, vec![]).await,
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            store.read_stream(stream, 1, 10).await,
            Err(Error::InvalidInput { .. })
        ));
    }
    let filter = EventFilter::all()
        .from_time(chrono::DateTime::<Utc>::MIN_UTC)
        .to_time(chrono::DateTime::<Utc>::MAX_UTC);
    let all = store
        .read_all(ReadAll::from(0, 10).filter(filter))
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        store
            .read_stream("s", u64::MAX, usize::MAX)
            .await
            .unwrap()
            .len(),
        0
    );
    assert!(matches!(
        PostgresEventStore::connect(config(&url, &schema).with_pool_size(1))
            .await
            .map(|_| ()),
        Ok(())
    ));
}

/// The store's listening connection killed by the server (`pg_terminate_backend`) and every
/// pooled connection with it: subscriptions carry on and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_terminated_connections() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let application = format!("orch-test-{}", uuid::Uuid::now_v7().simple());
    let separator = if url.contains('?') { '&' } else { '?' };
    let url_app = format!("{url}{separator}application_name={application}");
    let store = PostgresEventStore::connect(config(&url_app, &schema))
        .await
        .unwrap();
    let mut subscription = store.subscribe(0, EventFilter::all()).await.unwrap();
    let event = |n: u64| EventEnvelope::new("n.added", &n).unwrap();
    store
        .append("s", ExpectedVersion::Any, vec![event(1)])
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.global_position(), Some(1));

    let killed = raw(&url)
        .await
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&application.as_str()],
        )
        .await
        .unwrap();
    assert!(
        killed.len() >= 2,
        "the pool's and the listener's connections: {}",
        killed.len()
    );
    // The first use of a killed pooled connection may fail, as a temporary error.
    let mut written = 1;
    for n in 2..=6 {
        match store
            .append("s", ExpectedVersion::Any, vec![event(n)])
            .await
        {
            Ok(_) => written += 1,
            Err(error) => assert!(error.is_temporary(), "{error}"),
        }
    }
    let mut seen = vec![1];
    while seen.len() < written {
        let next = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("the subscription stalled after its connection was killed")
            .unwrap()
            .unwrap();
        seen.push(next.global_position().unwrap());
    }
    assert_eq!(seen, (1..=written as u64).collect::<Vec<_>>());
}

/// A subscription hears an append quickly: woken by `NOTIFY`, not by its 500 ms poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_wake_subscriptions_before_the_poll() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = PostgresEventStore::connect(
        config(&url, &schema).with_poll_interval(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let mut subscription = store.subscribe(0, EventFilter::all()).await.unwrap();
    let mut ids = HashSet::new();
    for n in 0..5 {
        let event = EventEnvelope::new("n.added", &n).unwrap();
        ids.insert(event.id().clone());
        store
            .append("s", ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
        let heard = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("not woken within 5 s with a 30 s poll: NOTIFY did not arrive")
            .unwrap()
            .unwrap();
        assert!(ids.contains(heard.id()));
    }
}

/// A user without `CREATE` on the database, given a schema by an administrator, connects,
/// migrates and appends; without the schema it gets the server's refusal as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_given_by_an_administrator_is_enough() {
    let Some(url) = reachable().await else { return };
    if !url.contains("://postgres@") {
        eprintln!("skipping: the test makes a role as `postgres`, and the URL's user is not it");
        return;
    }
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let role = format!("orch_role_{}", uuid::Uuid::now_v7().simple());
    let admin = raw(&url).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; CREATE SCHEMA \"{schema}\" AUTHORIZATION {role};"
        ))
        .await
        .unwrap();
    let as_role = url.replacen("://postgres@", &format!("://{role}@"), 1);
    let outcome = async {
        let store = PostgresEventStore::connect(config(&as_role, &schema)).await?;
        store
            .append(
                "s",
                ExpectedVersion::NoStream,
                vec![EventEnvelope::new("t.a", &1)?],
            )
            .await?;
        let elsewhere =
            PostgresEventStore::connect(config(&as_role, &format!("{schema}_not_given"))).await;
        Ok::<_, Error>(elsewhere.map(|_| ()))
    }
    .await;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; DROP ROLE {role};"
        ))
        .await
        .unwrap();
    let elsewhere = outcome.unwrap();
    assert!(
        matches!(
            &elsewhere,
            Err(Error::Backend {
                temporary: false,
                ..
            })
        ),
        "creating a schema without CREATE on the database: {elsewhere:?}"
    );
}

/// A row of `events` written by hand that holds no event (valid JSON, as the column
/// demands, but no CloudEvent): reads report it as a typed decode error naming the field,
/// and a subscription reports it and goes on to the events after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_row_that_is_no_event_is_reported_and_passed() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = store(&url, &schema).await;
    let first = EventEnvelope::new("order.placed", &1).unwrap();
    store
        .append("order-1", ExpectedVersion::NoStream, vec![first.clone()])
        .await
        .unwrap();
    // Written as the module docs tell a tool to: under the append lock, at the next position.
    let mut client = raw(&url).await;
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
    let last = EventEnvelope::new("order.placed", &3).unwrap();
    store
        .append("order-3", ExpectedVersion::NoStream, vec![last.clone()])
        .await
        .unwrap();

    let Err(error) = store.read_all(ReadAll::from(1, 10)).await else {
        panic!("a row that is no event was read as one");
    };
    assert!(
        matches!(&error, Error::Decode { field, .. } if field == "id"),
        "{error:?}"
    );
    let mut events = store.subscribe(1, EventFilter::all()).await.unwrap();
    let mut items = Vec::new();
    for _ in 0..3 {
        items.push(
            tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .expect("the subscription stalled at the bad row")
                .unwrap(),
        );
    }
    assert_eq!(items[0].as_ref().unwrap().id(), first.id());
    assert!(
        matches!(items[1], Err(Error::Decode { .. })),
        "{:?}",
        items[1]
    );
    assert_eq!(items[2].as_ref().unwrap().id(), last.id());
}
