//! Stores and transports from URLs: what the builder's `store_url` / `transport_url` and the
//! CLI's `--store` / `--transport` accept.
//!
//! | URL | store | transport | feature |
//! |---|---|---|---|
//! | `memory:` | [`InMemoryEventStore`] | [`InProcessTransport`] | — |
//! | `file://DIR` (`file:///abs/dir`, `file://./rel`) | [`FileEventStore`] in `DIR` | — | — |
//! | `redis://…` (`rediss://…`) | `RedisEventStore` | `RedisTransport` | `redis` (`redis-tls`) |
//! | `amqp://…` (`amqps://…`) | `RabbitMqEventStore` | `RabbitMqTransport` | `rabbitmq` (`rabbitmq-tls`) |
//! | `kafka://host:port[,host:port…][?key=value&…]` | `KafkaEventStore` | `KafkaTransport` | `kafka` |
//! | `postgres://…[?schema=NAME]` (`postgresql://…`) | `PostgresEventStore` in schema `NAME` (default `orchestrator`) | `PostgresTransport` in schema `NAME` | `postgres` |
//!
//! A URL whose backend is not compiled in is [`Error::FeatureDisabled`], naming the feature
//! to enable. Credentials in URLs never appear in errors or `Debug` output ([`redact`]).
//!
//! A `kafka://` URL's query carries TLS and SASL settings (librdkafka's names:
//! `security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
//! `ssl.ca.location`, …; unknown keys are refused): see
//! `orchestrator::backends::kafka::KafkaConfig::from_url`.
//!
//! ```
//! use orchestrator::connect::Backend;
//!
//! assert_eq!(Backend::parse("file:///var/lib/app")?, Backend::File("/var/lib/app".into()));
//! assert_eq!(Backend::parse("memory:")?, Backend::Memory);
//! assert!(Backend::parse("ftp://example.com").is_err());
//! assert_eq!(
//!     orchestrator::connect::redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
//!     "amqp://guest:***@127.0.0.1:5672/%2f"
//! );
//! # Ok::<(), orchestrator::Error>(())
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use orchestrator_bus::InProcessTransport;
use orchestrator_core::{EventStore, MaxEventSize, Transport};
use orchestrator_store::file::FileStoreOptions;
use orchestrator_store::{FileEventStore, InMemoryEventStore};

use crate::error::{Error, Result};

/// A parsed backend URL. Its `Debug` output hides passwords ([`redact`]).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// `memory:` — in this process only.
    Memory,
    /// `file://DIR` — the embedded durable store in `DIR`.
    File(PathBuf),
    /// `redis://…` or `rediss://…`, the whole URL.
    Redis(String),
    /// `amqp://…` or `amqps://…`, the whole URL.
    Amqp(String),
    /// `kafka://…`, the whole URL: the bootstrap servers (`host:port,host:port`) and the
    /// query's settings.
    Kafka(String),
    /// `postgres://…` or `postgresql://…`, the whole URL (libpq's form: user, password,
    /// host, port, database, and options such as `connect_timeout` in the query).
    Postgres(String),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory => f.write_str("Memory"),
            Self::File(dir) => f.debug_tuple("File").field(dir).finish(),
            Self::Redis(url) => f.debug_tuple("Redis").field(&redact(url)).finish(),
            Self::Amqp(url) => f.debug_tuple("Amqp").field(&redact(url)).finish(),
            Self::Kafka(url) => f.debug_tuple("Kafka").field(&redact(url)).finish(),
            Self::Postgres(url) => f.debug_tuple("Postgres").field(&redact(url)).finish(),
        }
    }
}

impl Backend {
    /// Parses a backend URL (see the [module docs](self)).
    pub fn parse(url: &str) -> Result<Self> {
        let url = url.trim();
        if matches!(url, "memory" | "memory:" | "memory://") {
            return Ok(Self::Memory);
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(unknown(url));
        };
        match scheme {
            "file" if !rest.is_empty() => Ok(Self::File(PathBuf::from(rest))),
            "file" => Err(Error::Core(orchestrator_core::Error::invalid(
                "store URL",
                "`file://` needs a directory: file:///var/lib/app or file://./data",
            ))),
            "redis" | "rediss" => Ok(Self::Redis(url.to_owned())),
            "amqp" | "amqps" => Ok(Self::Amqp(url.to_owned())),
            "postgres" | "postgresql" => Ok(Self::Postgres(url.to_owned())),
            "kafka" => {
                let brokers = rest.split_once('?').map_or(rest, |(b, _)| b);
                if brokers.trim_end_matches('/').is_empty() {
                    return Err(Error::Core(orchestrator_core::Error::invalid(
                        "Kafka URL",
                        "name the brokers: kafka://127.0.0.1:9092[,host:port…]",
                    )));
                }
                Ok(Self::Kafka(url.to_owned()))
            }
            _ => Err(unknown(url)),
        }
    }

    /// The URL scheme, for messages.
    pub fn scheme(&self) -> &str {
        match self {
            Self::Memory => "memory",
            Self::File(_) => "file",
            Self::Redis(url) | Self::Amqp(url) | Self::Postgres(url) => {
                url.split_once("://").map_or("", |(s, _)| s)
            }
            Self::Kafka(_) => "kafka",
        }
    }
}

fn unknown(url: &str) -> Error {
    Error::Core(orchestrator_core::Error::invalid(
        "backend URL",
        format!(
            "`{}` is not one of memory:, file://DIR, redis://…, amqp://…, kafka://host:port, \
             postgres://…",
            redact(url)
        ),
    ))
}

/// `url` with the password of its user info replaced by `***` (see
/// [`orchestrator_core::redact::redact_url`]); for a `kafka://` URL, the values of its
/// secret query parameters (`sasl.password`, `ssl.key.password`, …) and of unknown ones
/// ([`orchestrator_backends::kafka::redact_url`]; built without the `kafka` feature, the
/// whole query).
pub fn redact(url: &str) -> String {
    if !url.trim_start().starts_with("kafka://") {
        return orchestrator_core::redact::redact_url(url);
    }
    #[cfg(feature = "kafka")]
    {
        orchestrator_backends::kafka::redact_url(url)
    }
    #[cfg(not(feature = "kafka"))]
    match url.split_once('?') {
        Some((base, _)) => format!("{}?***", orchestrator_core::redact::redact_url(base)),
        None => orchestrator_core::redact::redact_url(url),
    }
}

/// Opens the event store a URL names.
///
/// A `file://` store is opened for writing, which locks its directory: while another
/// process (or another store in this one) has it open, this fails with
/// [`orchestrator_store::Error::Locked`] inside [`Error::Core`] (see
/// [`orchestrator_store::Error::from_core`]), naming the holder's pid.
pub async fn store(url: &str) -> Result<Arc<dyn EventStore>> {
    store_with_limit(url, MaxEventSize::DEFAULT).await
}

/// Opens the event store a URL names, as [`store`] does, refusing events over `limit`
/// (see [`MaxEventSize`]).
pub async fn store_with_limit(url: &str, limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    match Backend::parse(url)? {
        Backend::Memory => Ok(Arc::new(
            InMemoryEventStore::new().with_max_event_size(limit),
        )),
        Backend::File(dir) => Ok(Arc::new(
            open_file(dir, move |dir| {
                FileEventStore::open_with(dir, FileStoreOptions::default().max_event_size(limit))
            })
            .await?,
        )),
        Backend::Redis(url) => redis_store(&url, limit).await,
        Backend::Amqp(url) => rabbitmq_store(&url, limit).await,
        Backend::Kafka(url) => kafka_store(&url, limit).await,
        Backend::Postgres(url) => postgres_store(&url, limit).await,
    }
}

/// Opens the event store a URL names for reading: for tools that look into the store of a
/// running application.
///
/// A `file://` store is opened with [`FileEventStore::open_read_only`]: no lock, nothing
/// written, so it opens beside the application that writes to it, and holds what was on
/// disk when it opened; appending to it is an error. Every other URL is opened as by
/// [`store`] (a broker-backed store has no single writer to step aside for).
pub async fn store_read_only(url: &str) -> Result<Arc<dyn EventStore>> {
    match Backend::parse(url)? {
        Backend::File(dir) => Ok(Arc::new(
            open_file(dir, FileEventStore::open_read_only).await?,
        )),
        _ => store(url).await,
    }
}

/// Opens a [`FileEventStore`] off the async threads: opening reads every segment with
/// blocking I/O.
async fn open_file(
    dir: PathBuf,
    open: impl FnOnce(PathBuf) -> orchestrator_store::Result<FileEventStore> + Send + 'static,
) -> Result<FileEventStore> {
    let opened = tokio::task::spawn_blocking(move || open(dir))
        .await
        .map_err(|e| {
            orchestrator_core::Error::backend("file", false, format!("open failed: {e}"))
        })??;
    Ok(opened)
}

/// Connects the transport a URL names (`memory:` is a fresh [`InProcessTransport`]).
pub async fn transport(url: &str) -> Result<Arc<dyn Transport>> {
    transport_with_limit(url, MaxEventSize::DEFAULT).await
}

/// Connects the transport a URL names, as [`transport`] does, refusing events over `limit`
/// (see [`MaxEventSize`]).
pub async fn transport_with_limit(url: &str, limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    match Backend::parse(url)? {
        Backend::Memory => Ok(Arc::new(
            InProcessTransport::builder().max_event_size(limit).build(),
        )),
        Backend::File(_) => Err(Error::Core(orchestrator_core::Error::invalid(
            "transport URL",
            "there is no file transport: events travel in-process (memory:) or through a \
             broker (redis://, amqp://, kafka://, postgres://); file:// names a store",
        ))),
        Backend::Redis(url) => redis_transport(&url, limit).await,
        Backend::Amqp(url) => rabbitmq_transport(&url, limit).await,
        Backend::Kafka(url) => kafka_transport(&url, limit).await,
        Backend::Postgres(url) => postgres_transport(&url, limit).await,
    }
}

/// `rediss://` without the `redis-tls` feature names that feature.
#[cfg(feature = "redis")]
fn check_redis_tls(url: &str) -> Result<()> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if scheme.eq_ignore_ascii_case("rediss") && !cfg!(feature = "redis-tls") {
        return Err(disabled(url, "redis-tls"));
    }
    Ok(())
}

#[cfg(feature = "redis")]
async fn redis_store(url: &str, limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    use orchestrator_backends::redis::{RedisConfig, RedisEventStore};
    check_redis_tls(url)?;
    Ok(Arc::new(
        RedisEventStore::connect(RedisConfig::new(url)?.with_max_event_size(limit)).await?,
    ))
}

#[cfg(feature = "redis")]
async fn redis_transport(url: &str, limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    use orchestrator_backends::redis::{RedisConfig, RedisTransport};
    check_redis_tls(url)?;
    Ok(Arc::new(
        RedisTransport::connect(RedisConfig::new(url)?.with_max_event_size(limit)).await?,
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis_store(url: &str, _limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    Err(disabled(url, "redis"))
}

#[cfg(not(feature = "redis"))]
async fn redis_transport(url: &str, _limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    Err(disabled(url, "redis"))
}

#[cfg(feature = "rabbitmq")]
fn check_tls(url: &str) -> Result<()> {
    if url.starts_with("amqps://") && !cfg!(feature = "rabbitmq-tls") {
        return Err(disabled(url, "rabbitmq-tls"));
    }
    Ok(())
}

#[cfg(feature = "rabbitmq")]
async fn rabbitmq_store(url: &str, limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    use orchestrator_backends::rabbitmq::{RabbitMqEventStore, RabbitMqStoreConfig};
    check_tls(url)?;
    Ok(Arc::new(
        RabbitMqEventStore::connect(RabbitMqStoreConfig::new(url).with_max_event_size(limit))
            .await?,
    ))
}

#[cfg(feature = "rabbitmq")]
async fn rabbitmq_transport(url: &str, limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    use orchestrator_backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
    check_tls(url)?;
    Ok(Arc::new(
        RabbitMqTransport::connect(RabbitMqConfig::new(url).with_max_event_size(limit)).await?,
    ))
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbitmq_store(url: &str, _limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    Err(disabled(url, "rabbitmq"))
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbitmq_transport(url: &str, _limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    Err(disabled(url, "rabbitmq"))
}

#[cfg(feature = "kafka")]
async fn kafka_store(url: &str, limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    use orchestrator_backends::kafka::{KafkaConfig, KafkaEventStore};
    Ok(Arc::new(
        KafkaEventStore::connect(KafkaConfig::from_url(url)?.with_max_event_size(limit)).await?,
    ))
}

#[cfg(feature = "kafka")]
async fn kafka_transport(url: &str, limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    use orchestrator_backends::kafka::{KafkaConfig, KafkaTransport};
    Ok(Arc::new(
        KafkaTransport::connect(KafkaConfig::from_url(url)?.with_max_event_size(limit)).await?,
    ))
}

#[cfg(not(feature = "kafka"))]
async fn kafka_store(_url: &str, _limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    Err(disabled("kafka://", "kafka"))
}

#[cfg(not(feature = "kafka"))]
async fn kafka_transport(_url: &str, _limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    Err(disabled("kafka://", "kafka"))
}

#[cfg(feature = "postgres")]
async fn postgres_store(url: &str, limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    use orchestrator_backends::postgres::{PostgresConfig, PostgresEventStore};
    Ok(Arc::new(
        PostgresEventStore::connect(PostgresConfig::new(url)?.with_max_event_size(limit)).await?,
    ))
}

#[cfg(feature = "postgres")]
async fn postgres_transport(url: &str, limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    use orchestrator_backends::postgres::{PostgresConfig, PostgresTransport};
    Ok(Arc::new(
        PostgresTransport::connect(PostgresConfig::new(url)?.with_max_event_size(limit)).await?,
    ))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_transport(url: &str, _limit: MaxEventSize) -> Result<Arc<dyn Transport>> {
    Err(disabled(url, "postgres"))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_store(url: &str, _limit: MaxEventSize) -> Result<Arc<dyn EventStore>> {
    Err(disabled(url, "postgres"))
}

fn disabled(url: &str, feature: &'static str) -> Error {
    Error::FeatureDisabled {
        scheme: url.split_once("://").map_or(url, |(s, _)| s).to_owned(),
        feature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_backends() {
        assert_eq!(
            Backend::parse("file://./data").unwrap(),
            Backend::File("./data".into())
        );
        assert_eq!(
            Backend::parse("kafka://a:9092,b:9092/").unwrap(),
            Backend::Kafka("kafka://a:9092,b:9092/".into())
        );
        assert!(Backend::parse("kafka://?security.protocol=ssl").is_err());
        assert_eq!(Backend::parse("rediss://h:1").unwrap().scheme(), "rediss");
        assert_eq!(
            Backend::parse("postgresql://h/db").unwrap(),
            Backend::Postgres("postgresql://h/db".into())
        );
        assert_eq!(
            Backend::parse("postgres://h/db").unwrap().scheme(),
            "postgres"
        );
        assert!(Backend::parse("file://").is_err());
        assert!(Backend::parse("kafka://").is_err());
        let err = Backend::parse("mysql://u:pw@h/db").unwrap_err().to_string();
        assert!(err.contains("u:***@h") && !err.contains("pw"), "{err}");
    }

    #[test]
    fn redaction_keeps_everything_but_the_password() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://token@h"), "redis://***@h");
        assert_eq!(redact("file:///a@b/c"), "file:///a@b/c");
        #[cfg(feature = "kafka")]
        {
            assert_eq!(
                redact("kafka://b:9092?sasl.username=u&sasl.password=p@ss&ssl.key.password=k"),
                "kafka://b:9092?sasl.username=u&sasl.password=***&ssl.key.password=***"
            );
            assert_eq!(
                redact("kafka://b:9092?s3cret&x.y=z"),
                "kafka://b:9092?…&x.y=***"
            );
        }
        #[cfg(not(feature = "kafka"))]
        assert_eq!(
            redact("kafka://u:pw@b:9092?sasl.password=p@ss"),
            "kafka://u:***@b:9092?***"
        );
        let backend = Backend::parse("kafka://b:9092?sasl.password=p%40ss").unwrap();
        assert!(!format!("{backend:?}").contains("p%40ss"));
        let backend = Backend::parse("redis://:s3cret@h:1").unwrap();
        assert!(!format!("{backend:?}").contains("s3cret"));
        let backend = Backend::parse("postgres://app:s3cret@h:5432/db").unwrap();
        assert_eq!(
            format!("{backend:?}"),
            "Postgres(\"postgres://app:***@h:5432/db\")"
        );
    }

    #[tokio::test]
    async fn backends_not_compiled_in_name_their_feature() {
        if !cfg!(feature = "kafka") {
            let Err(err) = store("kafka://127.0.0.1:9092").await else {
                panic!("kafka is not compiled in")
            };
            assert!(matches!(
                err,
                Error::FeatureDisabled {
                    feature: "kafka",
                    ..
                }
            ));
        }
        if !cfg!(feature = "redis") {
            let Err(err) = transport("redis://127.0.0.1:6379").await else {
                panic!("redis is not compiled in")
            };
            assert!(matches!(
                err,
                Error::FeatureDisabled {
                    feature: "redis",
                    ..
                }
            ));
        }
        if cfg!(feature = "redis") && !cfg!(feature = "redis-tls") {
            let Err(err) = store("rediss://:pw@127.0.0.1:6380").await else {
                panic!("redis-tls is not compiled in")
            };
            assert!(
                matches!(
                    err,
                    Error::FeatureDisabled {
                        feature: "redis-tls",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(transport("file:///tmp/x").await.is_err());
        if !cfg!(feature = "postgres") {
            let Err(err) = store("postgres://u:s3cret@127.0.0.1:5432/test").await else {
                panic!("postgres is not compiled in")
            };
            assert!(
                matches!(
                    err,
                    Error::FeatureDisabled {
                        feature: "postgres",
                        ..
                    }
                ),
                "{err}"
            );
        }
        if !cfg!(feature = "postgres") {
            let Err(err) = transport("postgres://u:s3cret@127.0.0.1:5432/test").await else {
                panic!("postgres is not compiled in")
            };
            assert!(
                matches!(
                    err,
                    Error::FeatureDisabled {
                        feature: "postgres",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(!err.to_string().contains("s3cret"));
        } else {
            // A bad port: refused, with the password hidden.
            let Err(err) = transport("postgres://u:s3cret@127.0.0.1:notaport/test").await else {
                panic!("a bad port was accepted")
            };
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    /// `postgres://` opens a working store (skipped, with the reason, when PostgreSQL is
    /// unreachable; failed under `CI=true`), and a bad one fails with the password hidden.
    #[cfg(feature = "postgres")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_url_opens_a_store() {
        use orchestrator_core::testkit::services;
        let Err(err) = store("postgres://u:s3cret@127.0.0.1:notaport/test").await else {
            panic!("a bad port was accepted")
        };
        assert!(!err.to_string().contains("s3cret"), "{err}");

        let base = services::postgres_url();
        let schema = format!("orch_test_{}", orchestrator_core::EventId::new().as_str());
        let schema = schema.replace('-', "");
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}schema={schema}");
        let store = match store(&url).await {
            Ok(store) => store,
            Err(error) => {
                services::unreachable("PostgreSQL", &redact(&url), &error);
                return;
            }
        };
        assert_eq!(store.name(), "postgres");
        assert!(store.capabilities().durable);
        let stream = format!("connect-{}", orchestrator_core::EventId::new());
        let event = orchestrator_core::EventEnvelope::new("a.b", &serde_json::json!({})).unwrap();
        store
            .append(
                &stream,
                orchestrator_core::ExpectedVersion::NoStream,
                vec![event],
            )
            .await
            .unwrap();
        assert_eq!(store.stream_version(&stream).await.unwrap(), Some(1));
        drop(store);
        // The URL's schema was used: dropping it leaves nothing behind.
        let config = orchestrator_backends::postgres::PostgresConfig::new(&url).unwrap();
        assert_eq!(config.schema(), schema);
        let cleanup = orchestrator_backends::postgres::PostgresEventStore::connect(config)
            .await
            .unwrap();
        assert_eq!(cleanup.stream_version(&stream).await.unwrap(), Some(1));
        cleanup.drop_schema().await.unwrap();
    }

    #[tokio::test]
    async fn a_file_store_opens_read_only_beside_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let writer = store(&url).await.unwrap();
        let event = orchestrator_core::EventEnvelope::new("a.b", &serde_json::json!({})).unwrap();
        writer
            .append(
                "s",
                orchestrator_core::ExpectedVersion::Any,
                vec![event.clone()],
            )
            .await
            .unwrap();

        let Err(Error::Core(locked)) = store(&url).await else {
            panic!("a second writer opened the directory")
        };
        assert!(matches!(
            orchestrator_store::Error::from_core(&locked),
            Some(orchestrator_store::Error::Locked { pid: Some(_), .. })
        ));
        let reader = store_read_only(&url).await.unwrap();
        assert_eq!(reader.stream_version("s").await.unwrap(), Some(1));
        let refused = reader
            .append("s", orchestrator_core::ExpectedVersion::Any, vec![event])
            .await;
        assert!(matches!(
            refused,
            Err(orchestrator_core::Error::Unsupported { .. })
        ));
        // Other URLs open as `store` does.
        let memory = store_read_only("memory:").await.unwrap();
        assert_eq!(memory.name(), store("memory:").await.unwrap().name());
    }
}
