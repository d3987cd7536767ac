//! What the PostgreSQL tests share: reaching the live server, random schema names, and
//! dropping them afterwards.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use orchestrator_backends::postgres::{PostgresConfig, PostgresEventStore};
use orchestrator_core::testkit::services;
use tokio_postgres::NoTls;

/// The live PostgreSQL's URL, or `None` (after reporting why) when it does not answer.
pub async fn reachable() -> Option<String> {
    let url = services::postgres_url();
    match ping(&url).await {
        Ok(()) => Some(url),
        Err(error) => {
            let shown = orchestrator_core::redact::redact_url(&url);
            services::unreachable("PostgreSQL", &shown, &error);
            None
        }
    }
}

async fn ping(url: &str) -> Result<(), String> {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.map(|_| ())
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

/// A fresh schema name prefix, so tests never see each other's tables.
pub fn random_schema() -> String {
    format!("orch_test_{}", uuid::Uuid::now_v7().simple())
}

/// A config for `url` with its tables in `schema`.
pub fn config(url: &str, schema: &str) -> PostgresConfig {
    PostgresConfig::new(url)
        .unwrap()
        .with_schema(schema)
        .unwrap()
}

/// A store on `url` in `schema`.
pub async fn store(url: &str, schema: &str) -> PostgresEventStore {
    PostgresEventStore::connect(config(url, schema))
        .await
        .unwrap()
}

/// A raw tokio-postgres connection, for writing what other clients would write.
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Drops every schema whose name starts with its prefix when dropped — also when the test
/// panics.
pub struct Cleanup {
    pub url: String,
    pub prefix: String,
}

impl Cleanup {
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // A runtime of its own on a thread of its own: `Drop` may run inside the test's.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(drop_schemas(&url, &prefix))
        })
        .join()
        .unwrap_or_else(|_| Err("the cleanup thread panicked".into()));
        match dropped {
            Ok(n) => eprintln!(
                "cleanup: dropped {n} schemas starting with `{}`",
                self.prefix
            ),
            Err(e) => eprintln!("cleanup of `{}` failed: {e}", self.prefix),
        }
    }
}

/// Drops every schema whose name starts with `prefix`; returns how many.
pub async fn drop_schemas(url: &str, prefix: &str) -> Result<usize, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname::text, $1)",
            &[&prefix],
        )
        .await
        .map_err(|e| e.to_string())?;
    for row in &rows {
        let name: String = row.get(0);
        client
            .batch_execute(&format!(
                "DROP SCHEMA \"{}\" CASCADE",
                name.replace('"', "\"\"")
            ))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(rows.len())
}
