//! Group commit on PostgreSQL: concurrent appends of one process share transactions, and each
//! still gets exactly the result it would have had alone — a conflict, a clash or a failure of
//! one append never fails the others.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::collections::HashSet;

use orchestrator_core::{Error, EventEnvelope, EventStore, ExpectedVersion, ReadAll};
use postgres_support::{Cleanup, config, random_schema, raw, reachable};

fn event(n: usize) -> EventEnvelope {
    EventEnvelope::new("test.grouped", &serde_json::json!({ "n": n })).unwrap()
}

/// Many concurrent appends, most fine, some against a contended stream, some retries, some
/// clashes: every caller gets its own answer, and the global order has no hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_each_get_their_own_result() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = orchestrator_backends::postgres::PostgresEventStore::connect(
        config(&url, &schema).with_pool_size(4),
    )
    .await
    .unwrap();
    let original = event(0);
    let first = store
        .append("dup", ExpectedVersion::NoStream, vec![original.clone()])
        .await
        .unwrap();

    for _round in 0..5 {
        let mut tasks = tokio::task::JoinSet::new();
        // Fine: a stream each.
        for i in 0..16 {
            let store = store.clone();
            tasks.spawn(async move {
                let stream = format!("own-{}", uuid::Uuid::now_v7().simple());
                let events = vec![event(i), event(i + 1)];
                (
                    "own",
                    store
                        .append(&stream, ExpectedVersion::NoStream, events)
                        .await,
                )
            });
        }
        // Contended: exactly one of these creates the stream.
        let contended = format!("contended-{}", uuid::Uuid::now_v7().simple());
        for i in 0..8 {
            let store = store.clone();
            let stream = contended.clone();
            tasks.spawn(async move {
                (
                    "contended",
                    store
                        .append(&stream, ExpectedVersion::Exact(0), vec![event(i)])
                        .await,
                )
            });
        }
        // Retries of the first append: its original positions.
        for _ in 0..4 {
            let store = store.clone();
            let again = original.clone();
            tasks.spawn(async move {
                (
                    "retry",
                    store
                        .append("dup", ExpectedVersion::NoStream, vec![again])
                        .await,
                )
            });
        }
        // Clashes: the stored id with a new one is no retry.
        for i in 0..4 {
            let store = store.clone();
            let clash = vec![original.clone(), event(100 + i)];
            tasks.spawn(async move {
                (
                    "clash",
                    store.append("dup", ExpectedVersion::Any, clash).await,
                )
            });
        }
        let mut created = 0;
        for (what, result) in tasks.join_all().await {
            match what {
                "own" => assert_eq!(result.unwrap().next_expected_version, 2),
                "contended" => match result {
                    Ok(result) => {
                        assert_eq!(result.next_expected_version, 1);
                        created += 1;
                    }
                    Err(Error::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, Some(1)),
                    Err(other) => panic!("contended append: {other}"),
                },
                "retry" => assert_eq!(result.unwrap(), first),
                "clash" => assert!(
                    matches!(result, Err(Error::DuplicateEvent { .. })),
                    "clash: {result:?}"
                ),
                _ => unreachable!(),
            }
        }
        assert_eq!(
            created, 1,
            "exactly one append created the contended stream"
        );
    }

    let all = store.read_all(ReadAll::from(1, 10_000)).await.unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.global_position().unwrap()).collect();
    let expected: Vec<u64> = (1..=positions.len() as u64).collect();
    assert_eq!(positions, expected, "positions are 1..=n, no hole");
    // 1 + 5 rounds × (16 × 2 + 1).
    assert_eq!(all.len(), 1 + 5 * (16 * 2 + 1));
    let ids: HashSet<_> = all.iter().map(|e| e.id().to_string()).collect();
    assert_eq!(ids.len(), all.len(), "no event twice");
}

/// An append the server refuses (here: a trigger that rejects one stream) fails alone: the
/// appends that shared its transaction are written, and its caller gets the server's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_append_fails_alone() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = orchestrator_backends::postgres::PostgresEventStore::connect(config(&url, &schema))
        .await
        .unwrap();
    raw(&url)
        .await
        .batch_execute(&format!(
            r#"CREATE FUNCTION "{schema}".poison() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.stream_id LIKE 'poison%' THEN RAISE EXCEPTION 'poisoned stream'; END IF;
                 RETURN NEW;
               END $$;
               CREATE TRIGGER poison BEFORE INSERT ON "{schema}".events
                 FOR EACH ROW EXECUTE FUNCTION "{schema}".poison();"#
        ))
        .await
        .unwrap();
    for _round in 0..5 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..12 {
            let store = store.clone();
            tasks.spawn(async move {
                let poisoned = i % 4 == 0;
                let stream = format!(
                    "{}-{}",
                    if poisoned { "poison" } else { "fine" },
                    uuid::Uuid::now_v7().simple()
                );
                let result = store
                    .append(&stream, ExpectedVersion::NoStream, vec![event(i)])
                    .await;
                (poisoned, stream, result)
            });
        }
        for (poisoned, stream, result) in tasks.join_all().await {
            if poisoned {
                let error = result.unwrap_err();
                assert!(
                    matches!(error, Error::Backend { .. })
                        && error.to_string().contains("poisoned"),
                    "{error}"
                );
                assert_eq!(store.stream_version(&stream).await.unwrap(), None);
            } else {
                assert_eq!(result.unwrap().next_expected_version, 1);
                assert_eq!(store.stream_version(&stream).await.unwrap(), Some(1));
            }
        }
    }
    let all = store.read_all(ReadAll::from(1, 1000)).await.unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.global_position().unwrap()).collect();
    assert_eq!(positions, (1..=45).collect::<Vec<u64>>());
}
