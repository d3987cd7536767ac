//! `PostgresReadModelStore` against the live PostgreSQL: the read model store conformance
//! suite (transactions included), read models kept apart in shared tables, documents and
//! position surviving a new pool, and a second transaction of the same read model waiting
//! for the first and seeing its position.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::time::Duration;

use orchestrator_backends::postgres::PostgresReadModelStore;
use orchestrator_core::read_model::ReadModelStore;
use orchestrator_core::testkit::read_model::run_all;
use postgres_support::{Cleanup, config, random_schema, reachable, store};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_model_store_conforms() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let events = store(&url, &schema).await;
    run_all(|| {
        let name = format!("model-{}", uuid::Uuid::now_v7().simple());
        let documents = events.read_model_store(name).unwrap();
        async move { documents }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_are_kept_apart_and_survive_a_new_pool() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let events = store(&url, &schema).await;
    let orders = events.read_model_store("orders").unwrap();
    let users = events.read_model_store("users").unwrap();
    orders.put("o-1", json!({"total": 12})).await.unwrap();
    orders.set_position(3).await.unwrap();
    users.put("u-1", json!({"name": "Ada"})).await.unwrap();
    assert_eq!(users.get("o-1").await.unwrap(), None);
    assert_eq!(users.position().await.unwrap(), Some(0));
    users.clear().await.unwrap();
    assert_eq!(
        orders.list().await.unwrap().len(),
        1,
        "clear reached another model"
    );

    let reopened = PostgresReadModelStore::connect(config(&url, &schema), "orders")
        .await
        .unwrap();
    assert_eq!(reopened.name(), "orders");
    assert_eq!(
        reopened.get("o-1").await.unwrap(),
        Some(json!({"total": 12}))
    );
    assert_eq!(reopened.position().await.unwrap(), Some(3));
    assert!(events.read_model_store("").is_err());
    assert!(events.read_model_store("a\0b").is_err());
    assert!(orders.put("bad\0key", json!(1)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_transaction_waits_and_sees_the_first_ones_position() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let events = store(&url, &schema).await;
    let documents = events.read_model_store("counter").unwrap();

    let first = documents.begin().await.unwrap().unwrap();
    assert_eq!(first.position().await.unwrap(), Some(0));
    let second = tokio::spawn({
        let documents = documents.clone();
        async move {
            let tx = documents.begin().await.unwrap().unwrap();
            let seen = tx.position().await.unwrap();
            tx.rollback().await.unwrap();
            seen
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "a second transaction began while the first held the read model"
    );
    first.put("count", json!(1)).await.unwrap();
    first.set_position(1).await.unwrap();
    first.commit().await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second transaction still waits after the first committed")
        .unwrap();
    assert_eq!(
        seen,
        Some(1),
        "the second transaction missed the first's position"
    );
    assert_eq!(documents.get("count").await.unwrap(), Some(json!(1)));
}
