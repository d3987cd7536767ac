//! `PostgresInbox` and `PostgresLease` against the live PostgreSQL: the inbox conformance
//! suite, trimming, surviving a new connection, the store's inbox and lease, and a lease
//! taken over after its holder stops renewing it.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orchestrator_backends::postgres::{PostgresInbox, PostgresLease};
use orchestrator_core::testkit::inbox::run_all;
use orchestrator_core::{EventId, EventStore, Inbox, InboxRetention, Lease};
use postgres_support::{Cleanup, config, random_schema, raw, reachable, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_inbox_conforms() {
    let Some(url) = reachable().await else { return };
    let prefix = random_schema();
    let _cleanup = Cleanup::new(&url, &prefix);
    let case = AtomicUsize::new(0);
    run_all(|retention, clock| {
        let config = config(
            &url,
            &format!("{prefix}_{}", case.fetch_add(1, Ordering::Relaxed)),
        )
        .with_pool_size(2);
        async move {
            PostgresInbox::connect(config)
                .await
                .unwrap()
                .with_retention(retention)
                .with_clock(clock)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_trimmed_to_the_window_and_survive_a_new_connection() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let inbox = PostgresInbox::connect(config(&url, &schema))
        .await
        .unwrap()
        .with_retention(InboxRetention::last(3).and_max_age(Duration::from_secs(3600)));
    let ids: Vec<EventId> = (0..10).map(|_| EventId::new()).collect();
    for id in &ids {
        inbox.record("billing", id).await.unwrap();
        inbox.record("billing", id).await.unwrap();
    }
    inbox.record("shipping", &ids[0]).await.unwrap();
    let count: i64 = raw(&url)
        .await
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".inbox WHERE group_name = 'billing'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3, "rows past the count bound are deleted");
    drop(inbox);

    // Another process, another pool: the same ids.
    let inbox = PostgresInbox::connect(config(&url, &schema))
        .await
        .unwrap()
        .with_retention(InboxRetention::last(3));
    assert!(inbox.durable());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(inbox.seen("billing", id).await.unwrap(), i >= 7, "id {i}");
    }
    assert!(inbox.seen("shipping", &ids[0]).await.unwrap());
    assert!(inbox.seen("", &ids[0]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_hands_out_its_inbox_and_leases() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = store(&url, &schema).await;
    let inbox = store.inbox().expect("the PostgreSQL store keeps an inbox");
    assert!(inbox.durable());
    let id = EventId::new();
    inbox.record("billing", &id).await.unwrap();
    assert!(store.inbox().unwrap().seen("billing", &id).await.unwrap());

    let a = store
        .lease("relay")
        .expect("the PostgreSQL store keeps leases");
    let b = store.lease("relay").unwrap();
    assert!(!a.is_local());
    assert!(a.try_acquire().await.unwrap(), "a free lease is taken");
    assert!(a.try_acquire().await.unwrap(), "its holder renews it");
    assert!(!b.try_acquire().await.unwrap(), "a held lease is not taken");
    assert!(
        store.lease("other").unwrap().try_acquire().await.unwrap(),
        "leases of other names are separate"
    );
    a.release().await.unwrap();
    assert!(b.try_acquire().await.unwrap(), "a released lease is taken");
    a.release().await.unwrap();
    assert!(
        !a.try_acquire().await.unwrap(),
        "releasing a lease one does not hold does nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_holder_stops_renewing_is_taken_over() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let ttl = Duration::from_millis(300);
    let a = PostgresLease::connect(config(&url, &schema), "relay", ttl)
        .await
        .unwrap();
    let b = PostgresLease::connect(config(&url, &schema), "relay", ttl)
        .await
        .unwrap();
    assert_ne!(a.token(), b.token());
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    // `a` dies: no renewal. Within a time to live `b` gets it.
    let started = std::time::Instant::now();
    while !b.try_acquire().await.unwrap() {
        assert!(
            started.elapsed() < ttl * 5,
            "not taken over within 5 times its time to live"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= ttl / 2, "taken before it expired");
    assert!(!a.try_acquire().await.unwrap(), "the old holder lost it");
    assert!(
        PostgresLease::connect(config(&url, &schema), "", ttl)
            .await
            .is_err(),
        "an empty lease name is refused"
    );
}
