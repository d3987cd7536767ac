//! What the Kafka tests share: reaching the live broker, random topic prefixes, clean-up.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use orchestrator_backends::kafka::{KafkaConfig, KafkaTransport};
use orchestrator_core::testkit::services;

/// Held for the whole of a test: the Kafka tests of one binary run one at a time, so that
/// one test's topic deletion never overlaps another's traffic (see the module docs on tansu).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes this binary's Kafka test turn.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A fresh topic prefix, so tests never see each other's topics or groups.
pub fn random_prefix() -> String {
    format!("ot{}.", uuid::Uuid::now_v7().simple())
}

/// A config for `brokers` under `prefix`, tuned for tests: quicker metadata refreshes, so a
/// topic created by another client is seen sooner. Timeouts stay at the library's defaults:
/// they bound a broker operation, and a loaded machine must not turn a slow answer into a
/// failed test.
pub fn config(brokers: &str, prefix: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .with_prefix(prefix)
        .unwrap()
        .with_metadata_refresh_interval(Duration::from_secs(2))
}

/// The live broker's address and a transport under `prefix`, or `None` (after reporting
/// why) when it does not answer.
pub async fn reachable(prefix: &str) -> Option<(String, KafkaTransport)> {
    let brokers = services::kafka_brokers();
    let connect = KafkaTransport::connect(config(&brokers, prefix));
    match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Ok(Ok(transport)) => Some((brokers, transport)),
        Ok(Err(error)) => {
            services::unreachable("Kafka", &brokers, &error);
            None
        }
        Err(_) => {
            services::unreachable("Kafka", &brokers, &"no answer within 15 s");
            None
        }
    }
}

/// One Kafka test's hold on the live broker: its turn, a fresh prefix, a transport under
/// it, and the deletion of the prefix's topics when dropped (fields drop in this order, the
/// turn last).
pub struct Live {
    _cleanup: Cleanup,
    pub transport: KafkaTransport,
    pub brokers: String,
    pub prefix: String,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// Takes this binary's turn and reaches the broker under a fresh prefix; `None` (after
/// reporting why) when it does not answer.
pub async fn live() -> Option<Live> {
    let serial = serial().await;
    let prefix = random_prefix();
    let (brokers, transport) = reachable(&prefix).await?;
    Some(Live {
        _cleanup: Cleanup::new(&brokers, &prefix),
        transport,
        brokers,
        prefix,
        _serial: serial,
    })
}

/// Deletes every topic under `transport`'s prefix.
pub async fn cleanup(transport: &KafkaTransport) {
    match transport.delete_all_topics().await {
        Ok(()) => eprintln!(
            "cleanup: deleted the topics under `{}`",
            transport.config().prefix()
        ),
        Err(e) => eprintln!("cleanup of `{}` failed: {e}", transport.config().prefix()),
    }
}

/// Deletes the topics of `prefix` when dropped — also when the test panics.
pub struct Cleanup {
    brokers: String,
    prefix: String,
}

impl Cleanup {
    pub fn new(brokers: &str, prefix: &str) -> Self {
        Self {
            brokers: brokers.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (brokers, prefix) = (self.brokers.clone(), self.prefix.clone());
        // A runtime of its own: Drop may run inside (or outside) the test's runtime.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let config = config(&brokers, &prefix);
                match KafkaTransport::connect(config).await {
                    Ok(t) => cleanup(&t).await,
                    Err(e) => eprintln!("cleanup of `{prefix}` failed: {e}"),
                }
            });
        });
        let _ = done.join();
    }
}
