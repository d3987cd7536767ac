//! `KafkaEventStore` against the live broker: the event store conformance suite (which checks
//! the capabilities the store claims), plus the typed `Unsupported` answers and positions that
//! survive a new store instance.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kafka_support;

use kafka_support::{Live, config, live};
use orchestrator_backends::kafka::{KAFKA_STORE_CAPABILITIES, KafkaEventStore};
use orchestrator_core::testkit::store::run_all;
use orchestrator_core::{Error, EventEnvelope, EventStore, ExpectedVersion, ReadAll};

/// A store on the live broker under the test's prefix.
async fn store(live: &Live) -> KafkaEventStore {
    KafkaEventStore::connect(config(&live.brokers, &live.prefix))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_store_conforms() {
    let Some(live) = live().await else {
        return;
    };
    // One log for every case: each case names its own streams and event types.
    let store = store(&live).await;
    run_all(|| {
        let store = store.clone();
        async move { store }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_versions_are_unsupported_and_typed() {
    let Some(live) = live().await else {
        return;
    };
    let store = store(&live).await;
    assert!(!store.capabilities().expected_version);
    assert!(!store.capabilities().atomic_batch);
    assert!(store.capabilities().durable && store.capabilities().read_stream);
    assert_eq!(store.capabilities(), KAFKA_STORE_CAPABILITIES);

    let event = || EventEnvelope::new("account.opened", &serde_json::json!({"n": 1})).unwrap();
    for expected in [
        ExpectedVersion::Exact(0),
        ExpectedVersion::Exact(3),
        ExpectedVersion::NoStream,
        ExpectedVersion::StreamExists,
    ] {
        match store.append("acct-1", expected, vec![event()]).await {
            Err(Error::Unsupported {
                backend: "kafka",
                operation,
                ..
            }) => assert!(operation.contains("expected version"), "{operation}"),
            other => panic!("append expecting {expected}: expected Unsupported, got {other:?}"),
        }
    }
    assert_eq!(
        store.head_position().await.unwrap(),
        0,
        "nothing was written"
    );
    let written = store
        .append("acct-1", ExpectedVersion::Any, vec![event(), event()])
        .await
        .unwrap();
    assert_eq!(written.next_expected_version, 2);
    assert_eq!((written.first_position, written.last_position), (1, 2));

    // A second store instance rebuilds the same versions and positions from the log.
    let again = self::store(&live).await;
    let events = again.read_stream("acct-1", 1, 10).await.unwrap();
    let positions: Vec<(u64, u64)> = events
        .iter()
        .map(|e| (e.stream_version().unwrap(), e.global_position().unwrap()))
        .collect();
    assert_eq!(positions, [(1, 1), (2, 2)]);
    let all = again.read_all(ReadAll::from(2, 10)).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id(), events[1].id());
}

/// The log deleted right after the store read it: `delete_topic` closes the store's own log
/// readers first. Unassigning a partition stops librdkafka's fetcher only asynchronously, and
/// on tansu a fetch that meets a deleted topic crashes librdkafka (a null topic name in its
/// leader discovery) — and this test binary with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_can_be_deleted_right_after_a_read() {
    let Some(live) = live().await else {
        return;
    };
    let Live {
        brokers, prefix, ..
    } = &live;
    // Short fetch waits, as the fault suite's writers use, where the crash showed.
    let config = config(brokers, prefix).with_fetch_wait(std::time::Duration::from_millis(20));
    let store = KafkaEventStore::connect(config).await.unwrap();
    let event = || EventEnvelope::new("account.opened", &serde_json::json!({"n": 1})).unwrap();
    store
        .append(
            "acct-9",
            ExpectedVersion::Any,
            vec![event(), event(), event()],
        )
        .await
        .unwrap();
    assert_eq!(store.read_stream("acct-9", 1, 10).await.unwrap().len(), 3);
    assert_eq!(store.stream_version("acct-9").await.unwrap(), Some(3));
    store.delete_topic().await.unwrap();
    // Time for a fetch still under way to meet the deleted topic, and for a metadata refresh.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    drop(store);
}

/// The store's log topic keeps every record: the store creates it with infinite retention,
/// and refuses a topic provisioned with a finite one (events would vanish and versions be
/// renumbered) unless the user accepts that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_topic_with_finite_retention_is_refused() {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{
        AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication,
    };
    use rdkafka::client::DefaultClientContext;
    let Some(live) = live().await else {
        return;
    };
    let Live {
        brokers, prefix, ..
    } = &live;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers.as_str())
        .create()
        .unwrap();
    let options = AdminOptions::new();

    // Created by the store: every record kept.
    let store = store(&live).await;
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(store.topic())], &options)
        .await
        .unwrap();
    let created = described[0].as_ref().unwrap();
    for name in ["retention.ms", "retention.bytes"] {
        assert_eq!(
            created.get(name).and_then(|e| e.value.as_deref()),
            Some("-1"),
            "{name} of the store's own topic"
        );
    }

    // Provisioned by someone else, with the broker's usual week.
    let topic = format!("{prefix}weekly");
    let weekly =
        NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("retention.ms", "604800000");
    admin.create_topics([&weekly], &options).await.unwrap()[0]
        .as_ref()
        .unwrap();
    let on_weekly = || {
        config(brokers, prefix)
            .with_store_topic(topic.clone())
            .unwrap()
    };
    match KafkaEventStore::connect(on_weekly()).await {
        Err(Error::InvalidInput { reason, .. }) => {
            assert!(reason.contains("retention.ms=604800000"), "{reason}");
            assert!(reason.contains("with_finite_store_retention"), "{reason}");
        }
        other => panic!(
            "expected InvalidInput, got {:?}",
            other.map(|s| s.topic().to_owned())
        ),
    }
    let accepted = KafkaEventStore::connect(on_weekly().with_finite_store_retention(true)).await;
    assert!(accepted.is_ok(), "{:?}", accepted.err());
}

/// 64 tasks appending at once, most through one store (one producer: their records share
/// produce requests), a quarter through a second store on the same log (another producer, as
/// another process would be): every append is answered with the positions its records really
/// have in the log, every stream reads back whole, in order, with versions 1, 2, 3, … and both
/// stores number the log the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_indexed_where_they_landed() {
    const TASKS: usize = 64;
    const PER_TASK: usize = 10;
    let Some(live) = live().await else {
        return;
    };
    let store = store(&live).await;
    // A second writer on the same log, with its own producer, as another process would be:
    // each store indexes its own records from their delivery reports and must read the
    // other's from the log.
    let other = self::store(&live).await;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = if task % 4 == 3 {
            other.clone()
        } else {
            store.clone()
        };
        tasks.push(tokio::spawn(async move {
            // Half the tasks share streams, so records of one stream interleave with others.
            let stream = format!("acct-{}", task % (TASKS / 2));
            let mut written = Vec::new();
            for n in 0..PER_TASK {
                let event = EventEnvelope::new(
                    "account.credited",
                    &serde_json::json!({"task": task, "n": n}),
                )
                .unwrap();
                let id = event.id().clone();
                let result = store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await
                    .unwrap_or_else(|e| panic!("task {task}, append {n}: {e}"));
                assert_eq!(result.first_position, result.last_position);
                written.push((id, result.last_position, result.next_expected_version));
            }
            (stream, written)
        }));
    }
    let mut by_position = std::collections::BTreeMap::new();
    for task in tasks {
        let (stream, written) = task.await.unwrap();
        for (id, position, version) in written {
            assert!(
                by_position
                    .insert(position, (stream.clone(), id, version))
                    .is_none(),
                "two appends were answered with position {position}"
            );
        }
    }
    let all = store
        .read_all(ReadAll::from(1, TASKS * PER_TASK + 10))
        .await
        .unwrap();
    assert_eq!(all.len(), TASKS * PER_TASK);
    for event in &all {
        let position = event.global_position().unwrap();
        let (stream, id, version) = &by_position[&position];
        assert_eq!(event.id(), id, "the event at position {position}");
        assert_eq!(event.stream_id(), Some(stream.as_str()));
        assert_eq!(event.stream_version(), Some(*version));
    }
    for stream in 0..TASKS / 2 {
        let events = store
            .read_stream(&format!("acct-{stream}"), 1, 1000)
            .await
            .unwrap();
        let versions: Vec<u64> = events.iter().filter_map(|e| e.stream_version()).collect();
        assert_eq!(versions, (1..=2 * PER_TASK as u64).collect::<Vec<_>>());
    }
    // The other writer sees the same log, numbered the same way.
    let seen_by_other = other
        .read_all(ReadAll::from(1, TASKS * PER_TASK + 10))
        .await
        .unwrap();
    let summary = |events: &[EventEnvelope]| -> Vec<_> {
        events
            .iter()
            .map(|e| (e.id().clone(), e.global_position(), e.stream_version()))
            .collect()
    };
    assert_eq!(summary(&seen_by_other), summary(&all));
}
