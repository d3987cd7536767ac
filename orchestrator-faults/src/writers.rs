//! Concurrent writers on one stream: `writers` tasks each append `appends` events to the
//! same stream, at the same time. Afterwards the stream must hold every one of them
//! exactly once, at versions 1, 2, 3, … with no gap, each writer's events in its order.
//!
//! Stores with exact expected versions are used the way a lost update would happen: each
//! writer appends at the version it last saw and, on a conflict, takes the version the
//! store reports and tries again — so an append that overwrote or shadowed another would
//! show up as a missing event or a repeated version. Stores without them (RabbitMQ,
//! Kafka) append with `Any`, and must still number every event once, gaplessly.
//!
//! Redis and RabbitMQ are the shared brokers (`ORCHESTRATOR_REDIS_URL`,
//! `ORCHESTRATOR_AMQP_URL`); Kafka is a tansu of the scenario's own on a spare port.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use orchestrator_core::{Error, EventEnvelope, EventStore, ExpectedVersion};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::file::FileEventStore;

use crate::{Failure, Report, Res, ensure};

/// A store to write to, and what to do with it afterwards.
struct Target {
    store: Arc<dyn EventStore>,
    /// Deletes what the run wrote (brokers), or nothing.
    cleanup: Option<futures::future::BoxFuture<'static, ()>>,
    /// What must outlive the store: the file store's folder, Kafka's spare broker.
    _keep: Option<Box<dyn std::any::Any + Send>>,
}

/// A temporary folder removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The store named `name`, connected.
async fn open(name: &str) -> Result<Target, Failure> {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    match name {
        "memory" => Ok(Target {
            store: Arc::new(InMemoryEventStore::new()),
            cleanup: None,
            _keep: None,
        }),
        "file" => {
            let dir = std::env::temp_dir().join(format!("orchestrator-faults-writers-{tag}"));
            let store = FileEventStore::open(&dir).map_err(|e| Failure::Failed(e.into()))?;
            Ok(Target {
                store: Arc::new(store),
                cleanup: None,
                _keep: Some(Box::new(TempDir(dir))),
            })
        }
        #[cfg(feature = "redis")]
        "redis" => {
            use orchestrator_backends::redis::{RedisConfig, RedisEventStore};
            let url = env_or("ORCHESTRATOR_REDIS_URL", "redis://127.0.0.1:6379");
            let config = RedisConfig::new(&url)
                .map_err(|e| Failure::Failed(e.into()))?
                .with_prefix(format!("faults-writers:{tag}:"));
            let store = RedisEventStore::connect(config)
                .await
                .map_err(|e| Failure::CannotRun(format!("Redis at {url}: {e}")))?;
            let doomed = store.clone();
            Ok(Target {
                store: Arc::new(store),
                cleanup: Some(Box::pin(async move {
                    let _ = doomed.delete_all().await;
                })),
                _keep: None,
            })
        }
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => {
            use orchestrator_backends::rabbitmq::{RabbitMqEventStore, RabbitMqStoreConfig};
            let url = env_or(
                "ORCHESTRATOR_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            );
            let config = RabbitMqStoreConfig::new(&url)
                .with_stream(format!("faults.writers.{tag}.log"))
                .with_connect_timeout(std::time::Duration::from_secs(10));
            let store = RabbitMqEventStore::connect(config)
                .await
                .map_err(|e| Failure::CannotRun(format!("RabbitMQ at {url}: {e}")))?;
            let doomed = store.clone();
            Ok(Target {
                store: Arc::new(store),
                cleanup: Some(Box::pin(async move {
                    let _ = doomed.delete_log().await;
                    doomed.close().await;
                })),
                _keep: None,
            })
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            use orchestrator_backends::kafka::{KafkaConfig, KafkaEventStore};
            // A tansu of the scenario's own (sqlite storage, like the shared one): the load
            // stays off the broker other sessions and CI use.
            let binary = crate::spare::tansu_binary();
            if !binary.is_file() {
                return Err(Failure::CannotRun(format!(
                    "no tansu at {} (`cargo xtask services up kafka` installs it)",
                    binary.display()
                )));
            }
            let broker = crate::spare::SpareTansu::start(binary)
                .map_err(|e| Failure::CannotRun(format!("cannot start a spare tansu: {e}")))?;
            let brokers = broker.address();
            let config = KafkaConfig::new(&brokers)
                .with_prefix(format!("faults{tag}."))
                .map_err(|e| Failure::Failed(e.into()))?
                // As the backend's own tests: an append waits until the log reader has
                // indexed it, so the fetch wait bounds each append's latency.
                .with_fetch_wait(std::time::Duration::from_millis(20))
                .with_metadata_refresh_interval(std::time::Duration::from_millis(500))
                .with_operation_timeout(std::time::Duration::from_secs(10));
            let connect = KafkaEventStore::connect(config);
            let store = match tokio::time::timeout(std::time::Duration::from_secs(30), connect)
                .await
            {
                Ok(Ok(store)) => store,
                Ok(Err(e)) => return Err(Failure::CannotRun(format!("Kafka at {brokers}: {e}"))),
                Err(_) => {
                    return Err(Failure::CannotRun(format!(
                        "Kafka at {brokers} did not answer within 30 s"
                    )));
                }
            };
            let doomed = store.clone();
            Ok(Target {
                store: Arc::new(store),
                cleanup: Some(Box::pin(async move {
                    let _ = doomed.delete_topic().await;
                })),
                _keep: Some(Box::new(broker)),
            })
        }
        #[cfg(not(feature = "redis"))]
        "redis" => Err(crate::not_built("redis")),
        #[cfg(not(feature = "rabbitmq"))]
        "rabbitmq" => Err(crate::not_built("rabbitmq")),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(crate::not_built("kafka")),
        other => Err(Failure::Failed(
            format!("unknown store `{other}` (memory, file, redis, rabbitmq, kafka)").into(),
        )),
    }
}

/// `$name`, or `default` when unset or empty.
#[cfg(any(feature = "redis", feature = "rabbitmq"))]
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Runs the scenario on the store named `name`.
pub(crate) async fn run(name: &str, writers: usize, appends: usize) -> Result<(), Failure> {
    let mut target = open(name).await?;
    let result = scenario(name, &target.store, writers, appends).await;
    if let Some(cleanup) = target.cleanup.take() {
        cleanup.await;
    }
    Ok(result?)
}

/// What one writer did.
#[derive(Debug, Default)]
struct Written {
    conflicts: u64,
}

/// One writer: `appends` appends of one event each to `stream`.
async fn writer(
    store: Arc<dyn EventStore>,
    stream: String,
    id: usize,
    appends: usize,
    exact: bool,
) -> Res<Written> {
    let mut written = Written::default();
    let mut version = 0;
    for seq in 0..appends {
        let event = EventEnvelope::new(
            "faults.appended",
            &serde_json::json!({ "writer": id, "seq": seq }),
        )?;
        loop {
            let expected = if exact {
                ExpectedVersion::Exact(version)
            } else {
                ExpectedVersion::Any
            };
            match store.append(&stream, expected, vec![event.clone()]).await {
                Ok(result) => {
                    version = result.next_expected_version;
                    break;
                }
                Err(Error::WrongExpectedVersion { actual, .. }) if exact => {
                    // Someone else appended first: build on what is there now.
                    written.conflicts += 1;
                    version = actual.unwrap_or(0);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(written)
}

async fn scenario(name: &str, store: &Arc<dyn EventStore>, writers: usize, appends: usize) -> Res {
    let exact = store.capabilities().expected_version;
    let stream = format!("contended-{}", uuid::Uuid::now_v7().simple());
    eprintln!(
        "writers/{name}: {writers} writers × {appends} appends to one stream, {}",
        if exact {
            "each at the exact version it last saw, retrying on conflict"
        } else {
            "expected version Any (the store has no exact expected version)"
        }
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|id| tokio::spawn(writer(store.clone(), stream.clone(), id, appends, exact)))
        .collect();
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await??.conflicts;
    }
    let took = started.elapsed();

    // Read the stream back, in pages.
    let mut events = Vec::new();
    loop {
        let from = events.len() as u64 + 1;
        let page = store.read_stream(&stream, from, 5_000).await?;
        if page.is_empty() {
            break;
        }
        events.extend(page);
    }
    let expected_total = writers * appends;
    let mut next_seq: HashMap<u64, u64> = HashMap::new();
    let (mut gaps, mut out_of_order, mut repeated) = (0, 0, 0);
    for (i, event) in events.iter().enumerate() {
        if event.stream_version() != Some(i as u64 + 1) {
            gaps += 1;
        }
        let data: serde_json::Value = event.data()?;
        let (Some(writer), Some(seq)) = (data["writer"].as_u64(), data["seq"].as_u64()) else {
            return Err(format!("event {i} is not one of ours: {data}").into());
        };
        let next = next_seq.entry(writer).or_default();
        if seq < *next {
            repeated += 1;
        } else if seq > *next {
            out_of_order += 1;
        }
        *next = seq + 1;
    }
    let lost = expected_total.saturating_sub(events.len());
    let version = store.stream_version(&stream).await?;
    eprintln!(
        "  {} of {expected_total} appends stored in {took:.1?} ({:.0} appends/s), {conflicts} \
         conflicts retried; stream version {version:?}; {gaps} version gaps, {repeated} \
         repeated, {out_of_order} out of order",
        events.len(),
        expected_total as f64 / took.as_secs_f64(),
    );
    let mut line = Report::new("writers", name);
    line.add("writers", writers)
        .add("appends", expected_total)
        .add("stored", events.len())
        .add("lost", lost)
        .add("repeated", repeated)
        .add("version_gaps", gaps)
        .add("out_of_order", out_of_order)
        .add("conflicts_retried", conflicts)
        .add("exact_expected_version", exact)
        .add(
            "appends_per_s",
            format!("{:.0}", expected_total as f64 / took.as_secs_f64()),
        )
        .add("seconds", format!("{:.1}", took.as_secs_f64()));
    ensure(events.len() == expected_total && lost == 0, || {
        format!(
            "{} events stored, {expected_total} appended: {lost} lost updates",
            events.len()
        )
    })?;
    ensure(repeated == 0 && out_of_order == 0, || {
        format!("{repeated} events stored twice, {out_of_order} out of their writer's order")
    })?;
    ensure(gaps == 0 && version == Some(expected_total as u64), || {
        format!("{gaps} events off their version; stream version {version:?}")
    })?;
    line.print();
    Ok(())
}
