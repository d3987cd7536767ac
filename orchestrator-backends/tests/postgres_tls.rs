//! TLS to the live PostgreSQL (whose `ssl` is on, with Debian's snakeoil certificate, made
//! for `localhost`): `sslmode=require` encrypts every connection of the store — pooled and
//! listening — without checking the certificate; `disable` does not encrypt; `verify-full`
//! and `verify-ca` check it against `sslrootcert`, and a certificate that fails the check is
//! refused.
#![cfg(feature = "postgres-tls")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::time::Duration;

use futures::StreamExt;
use orchestrator_backends::postgres::{PostgresConfig, PostgresEventStore};
use orchestrator_core::{EventEnvelope, EventFilter, EventStore, ExpectedVersion};
use postgres_support::{Cleanup, random_schema, reachable};
use serde_json::json;

/// The snakeoil certificate the server presents (Debian's `ssl-cert` package).
const SERVER_CERTIFICATE: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn with_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

/// Whether the store's pooled connection is encrypted, as the server sees it.
async fn encrypted(store: &PostgresEventStore) -> bool {
    let conn = store.pool().get().await.unwrap();
    conn.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The server's TLS setting, or `None` (after saying why) when it is off or unreachable.
async fn server_with_tls() -> Option<String> {
    let url = reachable().await?;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the test server's ssl is off"
        );
        eprintln!("skipped: the PostgreSQL server's ssl is off");
        return None;
    }
    Some(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_encrypts_the_pool_and_the_listening_connection() {
    let Some(url) = server_with_tls().await else {
        return;
    };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let config = PostgresConfig::new(&with_params(&url, "sslmode=require"))
        .unwrap()
        .with_schema(&schema)
        .unwrap();
    assert!(format!("{config:?}").contains(r#"tls: "require""#));
    let store = PostgresEventStore::connect(config).await.unwrap();
    assert!(
        encrypted(&store).await,
        "sslmode=require connected in plain text"
    );

    // The subscription's listening connection speaks TLS too: it is woken by the append.
    let mut events = store.subscribe(1, EventFilter::all()).await.unwrap();
    let placed = EventEnvelope::new("order.placed", &json!({"id": 1})).unwrap();
    store
        .append("order-1", ExpectedVersion::NoStream, vec![placed.clone()])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("no event over TLS")
        .unwrap()
        .unwrap();
    assert_eq!(got.id(), placed.id());
    let listening: i64 = store
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.query ILIKE 'LISTEN %' AND a.datname = current_database() AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(listening >= 1, "no listening connection over TLS");

    let plain = PostgresConfig::new(&with_params(&url, "sslmode=disable"))
        .unwrap()
        .with_schema(&schema)
        .unwrap();
    let plain = PostgresEventStore::connect(plain).await.unwrap();
    assert!(!encrypted(&plain).await, "sslmode=disable encrypted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_modes_check_the_certificate_against_the_roots() {
    let Some(url) = server_with_tls().await else {
        return;
    };
    if !url.contains("@127.0.0.1:") || std::fs::metadata(SERVER_CERTIFICATE).is_err() {
        eprintln!("skipped: the server is not the local one with {SERVER_CERTIFICATE}");
        return;
    }
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let connect = |url: String| {
        let schema = schema.clone();
        async move {
            let config = PostgresConfig::new(&url)?.with_schema(schema)?;
            PostgresEventStore::connect(config).await
        }
    };
    let root = format!("sslrootcert={SERVER_CERTIFICATE}");
    let by_name = url.replace("@127.0.0.1:", "@localhost:");

    // verify-full: the chain and the name (`localhost`) check out.
    let store = connect(with_params(
        &by_name,
        &format!("sslmode=verify-full&{root}"),
    ))
    .await
    .unwrap();
    assert!(encrypted(&store).await);
    // ... but not for `127.0.0.1`, a name the certificate is not for.
    let refused = connect(with_params(&url, &format!("sslmode=verify-full&{root}")))
        .await
        .expect_err("verify-full accepted a certificate for another name");
    assert!(
        !refused.is_temporary(),
        "a refused certificate is temporary: {refused:?}"
    );
    // verify-ca checks the chain only.
    let store = connect(with_params(&url, &format!("sslmode=verify-ca&{root}")))
        .await
        .unwrap();
    assert!(encrypted(&store).await);

    // A root that did not sign the server's certificate: refused, as the error says.
    let other_root = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
        .ok()
        .and_then(|bundle| {
            let end = bundle.find("-----END CERTIFICATE-----")?;
            Some(bundle[..end + "-----END CERTIFICATE-----".len()].to_owned())
        });
    if let Some(other_root) = other_root {
        let config = PostgresConfig::new(&with_params(&by_name, "sslmode=verify-full"))
            .unwrap()
            .with_schema(&schema)
            .unwrap()
            .with_tls_root_certificates(other_root)
            .unwrap();
        let error = PostgresEventStore::connect(config)
            .await
            .expect_err("verify-full accepted a certificate of an unknown issuer");
        eprintln!("refused as expected: {error}");
        assert!(
            !error.is_temporary(),
            "a refused certificate is temporary: {error:?}"
        );
    }
}
