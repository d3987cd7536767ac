//! An application restarted on each broker: its named subscription resumes where its
//! consumer group stood (what was published while it was down is handled, each event once
//! with the durable inbox); its unnamed subscription is ephemeral (it sees only what is
//! published while it is subscribed). That an ephemeral group leaves nothing on the broker
//! is checked per broker in `orchestrator-backends/tests/*_transport.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator::prelude::*;
use orchestrator::store::file::FileEventStore;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// What the application's subscriptions handled.
#[derive(Default)]
struct Handled {
    /// Times each event (by `n`) was handled by the named subscription.
    named: BTreeMap<u64, u32>,
    /// The `n`s the unnamed subscription handled, in order.
    unnamed: Vec<u64>,
}

type Shared = Arc<Mutex<Handled>>;

fn n_of(event: &EventEnvelope) -> u64 {
    event.data::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

/// One run of the application: the file store in `dir` (its durable inbox), `transport`, a
/// named subscription with the inbox and an unnamed one.
async fn application(
    dir: &std::path::Path,
    transport: Arc<dyn Transport>,
    handled: &Shared,
) -> (EventOrchestrator, String) {
    let app = EventOrchestrator::builder()
        .file_store(FileEventStore::open(dir).unwrap())
        .transport(transport)
        .build()
        .await
        .unwrap();
    let record = Arc::clone(handled);
    app.subscribe_with(
        SubscriptionConfig::new("parcel.#")
            .named("restart-shipping")
            .inbox(app.inbox()),
        move |event: EventEnvelope| {
            let record = Arc::clone(&record);
            async move {
                let n = n_of(&event);
                *record.lock().unwrap().named.entry(n).or_default() += 1;
                Ok::<_, HandlerError>(())
            }
        },
    )
    .await
    .unwrap();
    let record = Arc::clone(handled);
    let unnamed = app
        .subscribe("parcel.#", move |event: EventEnvelope| {
            let record = Arc::clone(&record);
            async move {
                record.lock().unwrap().unnamed.push(n_of(&event));
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    (app, unnamed.name().to_owned())
}

async fn wait_until(what: &str, handled: &Shared, ok: impl Fn(&Handled) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ok(&handled.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: named {:?}, unnamed {:?}",
            handled.lock().unwrap().named,
            handled.lock().unwrap().unnamed
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The scenario, on transports `make` connects.
async fn restart<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Transport>>,
{
    let dir = tempfile::tempdir().unwrap();
    let publisher = EventOrchestrator::builder()
        .transport(make().await)
        .build()
        .await
        .unwrap();
    let publish = |n: u64| {
        publisher.publish_and_wait(EventEnvelope::new("parcel.sent", &json!({ "n": n })).unwrap())
    };
    let handled = Shared::default();

    let (first, first_unnamed) = application(dir.path(), make().await, &handled).await;
    for n in 1..=3 {
        publish(n).await.unwrap();
    }
    wait_until("the first run", &handled, |h| {
        h.named.len() == 3 && h.unnamed.len() == 3
    })
    .await;
    first.shutdown(Duration::from_secs(10)).await;
    drop(first);

    // While the application is down.
    for n in 4..=6 {
        publish(n).await.unwrap();
    }

    handled.lock().unwrap().unnamed.clear();
    let (again, again_unnamed) = application(dir.path(), make().await, &handled).await;
    assert_ne!(
        first_unnamed, again_unnamed,
        "an unnamed group is new each run"
    );
    wait_until("what was published while it was down", &handled, |h| {
        h.named.len() == 6
    })
    .await;
    publish(7).await.unwrap();
    wait_until("the event published after the restart", &handled, |h| {
        h.named.len() == 7 && h.unnamed.contains(&7)
    })
    .await;
    // Time for stray redeliveries to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let handled = handled.lock().unwrap();
        let once: BTreeMap<u64, u32> = (1..=7).map(|n| (n, 1)).collect();
        assert_eq!(
            handled.named, once,
            "the named subscription: each event once"
        );
        assert_eq!(
            handled.unnamed,
            [7],
            "the unnamed subscription: only what was published while it was subscribed"
        );
    }
    again.shutdown(Duration::from_secs(10)).await;
    publisher.shutdown(Duration::from_secs(10)).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_application_on_redis() {
    use orchestrator::backends::redis::{RedisConfig, RedisTransport};
    let url = orchestrator::core::testkit::services::redis_url();
    let config = RedisConfig::new(&url)
        .unwrap()
        .with_prefix(format!("{}:", support::unique("restart")));
    let probe = match RedisTransport::connect(config.clone()).await {
        Ok(transport) => transport,
        Err(error) => {
            return orchestrator::core::testkit::services::unreachable("Redis", &url, &error);
        }
    };
    restart(|| {
        let config = config.clone();
        async move { Arc::new(RedisTransport::connect(config).await.unwrap()) as Arc<dyn Transport> }
    })
    .await;
    probe.delete_all().await.unwrap();
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_application_on_rabbitmq() {
    use orchestrator::backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
    let url = orchestrator::core::testkit::services::amqp_url();
    let prefix = support::unique("restart");
    let config = RabbitMqConfig::new(&url)
        .with_exchange(format!("{prefix}.events"))
        .with_queue_prefix(prefix)
        .with_connect_timeout(Duration::from_secs(5));
    let probe = match RabbitMqTransport::connect(config.clone()).await {
        Ok(transport) => transport,
        Err(error) => {
            return orchestrator::core::testkit::services::unreachable("RabbitMQ", &url, &error);
        }
    };
    let made = Arc::new(Mutex::new(Vec::new()));
    restart(|| {
        let (config, made) = (config.clone(), Arc::clone(&made));
        async move {
            let transport = RabbitMqTransport::connect(config).await.unwrap();
            made.lock().unwrap().push(transport.clone());
            Arc::new(transport) as Arc<dyn Transport>
        }
    })
    .await;
    let made: Vec<RabbitMqTransport> = made.lock().unwrap().drain(..).collect();
    for transport in made {
        let _ = transport.delete_topology().await;
    }
    let _ = probe.delete_topology().await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_application_on_kafka() {
    use orchestrator::backends::kafka::{KafkaConfig, KafkaTransport};
    let brokers = orchestrator::core::testkit::services::kafka_brokers();
    let config = KafkaConfig::new(&brokers)
        .with_prefix(format!("{}.", support::unique("restart")))
        .unwrap();
    let probe = match KafkaTransport::connect(config.clone()).await {
        Ok(transport) => transport,
        Err(error) => {
            return orchestrator::core::testkit::services::unreachable("Kafka", &brokers, &error);
        }
    };
    restart(|| {
        let config = config.clone();
        async move { Arc::new(KafkaTransport::connect(config).await.unwrap()) as Arc<dyn Transport> }
    })
    .await;
    probe.delete_all_topics().await.unwrap();
}
