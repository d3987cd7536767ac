//! `RabbitMqEventStore` against the live broker (`ORCHESTRATOR_AMQP_URL`): the EventStore
//! conformance suite (the cases its capabilities claim, and the Unsupported checks of the
//! rest), plus what the suite does not check: a second instance on the same log, and
//! appenders in two instances at once.
//!
//! Every test uses its own randomly named stream queue and deletes it at the end.
#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod rabbitmq_support;

use std::time::Duration;

use futures::StreamExt as _;
use orchestrator_backends::rabbitmq::{RabbitMqEventStore, RabbitMqStoreConfig};
use orchestrator_core::testkit::{services, store as suite};
use orchestrator_core::{Error, EventEnvelope, EventFilter, EventStore, ExpectedVersion, ReadAll};
use rabbitmq_support::Cleanup;
use serde_json::json;

fn config(tag: &str) -> RabbitMqStoreConfig {
    RabbitMqStoreConfig::new(services::amqp_url())
        .with_stream(format!("test.{tag}.{}.log", uuid::Uuid::now_v7().simple()))
        .with_connect_timeout(Duration::from_secs(5))
        .with_connection_name(format!("orchestrator-test-{tag}"))
}

/// A store on `config`, or `None` (after reporting why) when the broker is unreachable.
async fn connect(config: RabbitMqStoreConfig) -> Option<RabbitMqEventStore> {
    let url = config.url().to_owned();
    match RabbitMqEventStore::connect(config).await {
        Ok(store) => Some(store),
        Err(error) => {
            services::unreachable("RabbitMQ", &url, &error);
            None
        }
    }
}

fn event(ty: &str, n: u64) -> EventEnvelope {
    EventEnvelope::new(ty, &json!({ "n": n })).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_conformance() {
    let Some(probe) = connect(config("probe")).await else {
        return;
    };
    probe.delete_log().await.unwrap();
    probe.close().await;
    // A fresh log per case: the cases check head positions and unfiltered reads exactly.
    // The logs are deleted when `cleanup` drops, even if a case failed.
    let cleanup = Cleanup::default();
    let logs = cleanup.queues.clone();
    suite::run_all(|| {
        let logs = logs.clone();
        async move {
            let config = config("conformance");
            logs.lock().unwrap().push(config.stream().to_owned());
            RabbitMqEventStore::connect(config).await.unwrap()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_versions_other_than_any_are_unsupported_and_write_nothing() {
    let Some(store) = connect(config("unsupported")).await else {
        return;
    };
    let cleanup = Cleanup::default();
    cleanup
        .queues
        .lock()
        .unwrap()
        .push(store.config().stream().to_owned());
    assert!(!store.capabilities().expected_version);
    let ty = format!("t{}.e", uuid::Uuid::now_v7().simple());
    let written = store
        .append("s-1", ExpectedVersion::Any, vec![event(&ty, 1)])
        .await
        .unwrap();
    for expected in [
        ExpectedVersion::Exact(1),
        ExpectedVersion::Exact(0),
        ExpectedVersion::NoStream,
        ExpectedVersion::StreamExists,
    ] {
        let result = store.append("s-1", expected, vec![event(&ty, 2)]).await;
        assert!(
            matches!(
                result,
                Err(Error::Unsupported {
                    backend: "rabbitmq",
                    ..
                })
            ),
            "{expected}: {result:?}"
        );
    }
    assert_eq!(store.head_position().await.unwrap(), written.last_position);
    assert_eq!(store.stream_version("s-1").await.unwrap(), Some(1));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_reads_the_same_versions_and_positions() {
    let config = config("instances");
    let Some(first) = connect(config.clone()).await else {
        return;
    };
    let cleanup = Cleanup::default();
    cleanup
        .queues
        .lock()
        .unwrap()
        .push(config.stream().to_owned());
    let ty = format!("t{}.e", uuid::Uuid::now_v7().simple());
    first
        .append(
            "a",
            ExpectedVersion::Any,
            (1..=3).map(|n| event(&ty, n)).collect(),
        )
        .await
        .unwrap();
    first
        .append("b", ExpectedVersion::Any, vec![event(&ty, 4)])
        .await
        .unwrap();

    // A new instance (as after a restart of the process) reads the log from the start.
    let second = RabbitMqEventStore::connect(config).await.unwrap();
    let all_first = first.read_all(ReadAll::from(0, 100)).await.unwrap();
    let all_second = second.read_all(ReadAll::from(0, 100)).await.unwrap();
    assert_eq!(all_first.len(), 4);
    assert_eq!(all_first, all_second, "both instances see the same log");
    assert_eq!(second.stream_version("a").await.unwrap(), Some(3));

    // Appends from both instances at once: versions stay gapless and distinct.
    let appends = (0..20).map(|n| {
        let store = if n % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let ty = ty.clone();
        tokio::spawn(async move {
            store
                .append("a", ExpectedVersion::Any, vec![event(&ty, 100 + n)])
                .await
                .unwrap()
                .next_expected_version
        })
    });
    let mut versions = Vec::new();
    for append in appends.collect::<Vec<_>>() {
        versions.push(append.await.unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (4..=23).collect::<Vec<u64>>());
    first.sync().await.unwrap();
    second.sync().await.unwrap();
    let via_first = first.read_stream("a", 1, 100).await.unwrap();
    let via_second = second.read_stream("a", 1, 100).await.unwrap();
    assert_eq!(via_first.len(), 23);
    assert_eq!(via_first, via_second);

    // A subscription of the second instance sees what the first appends.
    let from = second.head_position().await.unwrap() + 1;
    let mut live = second.subscribe(from, EventFilter::all()).await.unwrap();
    let written = first
        .append("c", ExpectedVersion::Any, vec![event(&ty, 999)])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.global_position(), Some(written.last_position));
    assert_eq!(got.stream_version(), Some(1));

    drop(live);
    first.close().await;
    second.close().await;
}

/// Processes sharing a RabbitMQ store elect one holder of a lease through an exclusive
/// queue: a second candidate stands by until the holder lets go.
#[tokio::test]
async fn the_store_lease_has_one_holder_at_a_time() {
    let config = config("lease");
    let Some(store) = connect(config.clone()).await else {
        return;
    };
    let first = store
        .lease("relay.default")
        .expect("the RabbitMQ store has a lease");
    let second = store.lease("relay.default").unwrap();
    assert!(
        first.describe().contains(".lease.relay.default"),
        "{}",
        first.describe()
    );
    assert!(first.try_acquire().await.unwrap(), "free: taken");
    assert!(first.try_acquire().await.unwrap(), "kept by its holder");
    assert!(!second.try_acquire().await.unwrap(), "held by the first");
    assert!(!second.try_acquire().await.unwrap(), "still held");
    let other = store.lease("relay.other").unwrap();
    assert!(
        other.try_acquire().await.unwrap(),
        "another name is another lease"
    );
    first.release().await.unwrap();
    // A standby tries again at its pace (the relay: a third of the lease's time to live).
    let mut taken = false;
    for _ in 0..50 {
        if second.try_acquire().await.unwrap() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken, "released: the standby takes it");
    second.release().await.unwrap();
    other.release().await.unwrap();
    store.delete_log().await.unwrap();
}
