//! Shared by the root crate's PostgreSQL tests: a schema of each test's own, dropped
//! afterwards.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use orchestrator::backends::postgres::{PostgresConfig, PostgresEventStore};
use orchestrator::core::testkit::services::postgres_url;

/// A schema name for `test`, unique to this run.
pub(crate) fn schema(test: &str) -> String {
    format!(
        "orch_test_{test}_{}",
        orchestrator::core::EventId::new().as_str().replace('-', "")
    )
}

/// The local server's settings, in `schema`, with a pool of 4.
pub(crate) fn config(schema: &str) -> PostgresConfig {
    PostgresConfig::new(&postgres_url())
        .unwrap()
        .with_schema(schema)
        .unwrap()
        .with_pool_size(4)
}

/// Drops the test's schema when dropped, also when the test panics.
pub(crate) struct DropSchema(pub(crate) String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // A runtime of its own on a thread of its own: `Drop` may run inside the test's.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let store = PostgresEventStore::connect(config(&schema))
                    .await
                    .map_err(|e| e.to_string())?;
                store.drop_schema().await.map_err(|e| e.to_string())
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the cleanup thread panicked".into()));
        if let Err(why) = dropped {
            eprintln!("cleanup of schema `{}` failed: {why}", self.0);
        }
    }
}
