//! `statement_timeout` against the live PostgreSQL: set per session from the config or the
//! URL; a statement that runs past it (an append, a read model transaction, both held up by
//! a lock another client keeps) fails with the typed, temporary `PostgresStatementTimeout`
//! having written nothing; and the pool works on afterwards.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::time::{Duration, Instant};

use orchestrator_backends::postgres::{
    PostgresConfig, PostgresEventStore, PostgresStatementTimeout,
};
use orchestrator_core::read_model::ReadModelStore;
use orchestrator_core::{Error, EventEnvelope, EventStore, ExpectedVersion};
use postgres_support::{Cleanup, random_schema, raw, reachable};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_millis(300);

/// The store's sessions run with the timeout, whether it came from the URL or the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_with_the_configured_statement_timeout() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let separator = if url.contains('?') { '&' } else { '?' };
    let config = PostgresConfig::new(&format!(
        "{url}{separator}statement_timeout=1500&schema={schema}"
    ))
    .unwrap();
    assert_eq!(
        config.statement_timeout(),
        Some(Duration::from_millis(1500))
    );
    let store = PostgresEventStore::connect(config).await.unwrap();
    let conn = store.pool().get().await.unwrap();
    let shown: String = conn
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "1500ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_timeout_is_a_typed_temporary_error_and_the_pool_goes_on() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let config = PostgresConfig::new(&url)
        .unwrap()
        .with_schema(&schema)
        .unwrap()
        .with_pool_size(2)
        .with_statement_timeout(TIMEOUT);
    let store = PostgresEventStore::connect(config).await.unwrap();

    // Another client holds the schema's append lock (as a tool writing rows by hand would):
    // the append waits for it inside its statement, past the timeout.
    let mut other = raw(&url).await;
    let holding = other.transaction().await.unwrap();
    holding
        .execute(
            "SELECT pg_advisory_xact_lock(1330791233, hashtext($1))",
            &[&schema],
        )
        .await
        .unwrap();
    let started = Instant::now();
    let event = EventEnvelope::new("order.placed", &json!({"n": 1})).unwrap();
    let error = store
        .append("order-1", ExpectedVersion::Any, vec![event.clone()])
        .await
        .expect_err("an append waiting past the statement timeout succeeded");
    let waited = started.elapsed();
    assert_timeout(&error);
    assert!(
        waited >= TIMEOUT && waited < TIMEOUT * 10,
        "the append failed after {waited:?}, with a timeout of {TIMEOUT:?}"
    );

    // The same with a read model transaction waiting for the position row's lock.
    let documents = store.read_model_store("orders").unwrap();
    holding
        .execute(
            &format!(
                "INSERT INTO \"{schema}\".read_model_positions (read_model, position) \
                 VALUES ('orders', 0)"
            ),
            &[],
        )
        .await
        .unwrap();
    let error = documents
        .begin()
        .await
        .err()
        .expect("a transaction began on a locked read model");
    assert_timeout(&error);
    holding.rollback().await.unwrap();

    // Nothing was written, and every pooled connection works: the append, retried, lands.
    assert_eq!(store.head_position().await.unwrap(), 0);
    let written = store
        .append("order-1", ExpectedVersion::Any, vec![event])
        .await
        .unwrap();
    assert_eq!(written.next_expected_version, 1);
    for _ in 0..4 {
        let tx = documents.begin().await.unwrap().unwrap();
        tx.put("o-1", json!(1)).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(store.head_position().await.unwrap(), 1);
}

fn assert_timeout(error: &Error) {
    let timeout = PostgresStatementTimeout::find(error)
        .unwrap_or_else(|| panic!("not a statement timeout: {error:?}"));
    assert!(timeout.message().contains("statement timeout"), "{timeout}");
    assert!(error.is_temporary(), "a statement timeout is permanent");
    assert!(
        error.to_string().contains("statement_timeout"),
        "the error does not name the timeout: {error}"
    );
}
