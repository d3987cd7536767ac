//! A subscription and its publisher survive a restart of Redis: 10,000 events published while
//! the server restarts once in the middle are all delivered; the only duplicates are
//! redeliveries (attempt > 1).
//!
//! Runs its own redis-server (AOF, fsync always) on a spare loopback port and data folder, so
//! the shared Redis is never touched; the server is killed and the folder removed whatever
//! happens.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrator_backends::redis::{RedisConfig, RedisTransport};
use orchestrator_core::testkit::services;
use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
use tokio::process::{Child, Command};

const EVENTS: usize = 10_000;
const RESTART_AFTER: usize = 3_000;
const PUBLISHERS: usize = 4;

/// A redis-server of the test's own; killed, and its folder removed, on drop.
struct SpareRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl SpareRedis {
    /// Starts a server on a free port, or explains why it cannot.
    async fn start() -> Result<Self, String> {
        let port = free_port()?;
        assert_ne!(port, 6379, "never the shared Redis");
        let dir = std::env::temp_dir().join(format!("orchestrator-redis-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            let ping = async {
                let client = redis::Client::open(self.url())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            };
            match ping.await {
                Ok(_) => return Ok(()),
                Err(_) if started.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(format!("redis-server did not answer: {e}")),
            }
        }
    }

    /// `SHUTDOWN` (which syncs the AOF), then the same server again on the same port and data.
    async fn restart(&mut self) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // The connection closes instead of answering.
        let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
        let mut child = self.child.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("redis-server did not stop")
            .unwrap();
        self.spawn().await.unwrap();
    }
}

impl Drop for SpareRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Reap it, so no zombie outlives the test.
            for _ in 0..100 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, String> {
    for _ in 0..50 {
        let port = 6391 + (uuid::Uuid::now_v7().as_u128() % 2000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port in 6391..8391".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_publishers_survive_a_redis_restart() {
    // The shared Redis proves the machine runs Redis at all; this test uses its own.
    if redis_support::reachable().await.is_none() {
        return;
    }
    let mut server = match SpareRedis::start().await {
        Ok(server) => server,
        Err(why) => {
            services::unreachable("a spare redis-server", "127.0.0.1:6391+", &why);
            return;
        }
    };
    let config = RedisConfig::new(&server.url())
        .unwrap()
        .with_prefix("restart:")
        .with_claim_min_idle(Duration::from_secs(2))
        .with_retry_for(Duration::from_secs(60));
    let transport = RedisTransport::connect(config).await.unwrap();
    let topic = "load.generated";
    let mut sub = transport
        .subscribe(
            SubscribeOptions::new("loader", topic)
                .unwrap()
                .prefetch(100),
        )
        .await
        .unwrap();

    // Every delivery's attempt, by event sequence number.
    let published = Arc::new(AtomicUsize::new(0));
    let consumer = tokio::spawn(async move {
        let mut seen: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        while seen.len() < EVENTS && Instant::now() < deadline {
            let Ok(next) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await else {
                continue;
            };
            let delivery = next.unwrap().expect("the subscription ended");
            let seq = delivery.event().data::<serde_json::Value>().unwrap()["seq"]
                .as_u64()
                .unwrap();
            seen.entry(seq).or_default().push(delivery.attempt());
            delivery.ack().await.unwrap();
        }
        seen
    });
    // Four publishers, two publishing one event at a time and two in batches of 20; they
    // retry on their own (inside the transport) while Redis is down.
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (transport, published) = (transport.clone(), published.clone());
            tokio::spawn(async move {
                let seqs: Vec<usize> = (p..EVENTS).step_by(PUBLISHERS).collect();
                let event = |seq: &usize| {
                    EventEnvelope::new(topic, &serde_json::json!({ "seq": seq })).unwrap()
                };
                if p % 2 == 0 {
                    for seq in &seqs {
                        transport.publish(topic, event(seq)).await.unwrap();
                        published.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    for chunk in seqs.chunks(20) {
                        let batch = chunk.iter().map(event).collect();
                        transport.publish_batch(topic, batch).await.unwrap();
                        published.fetch_add(chunk.len(), Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();

    while published.load(Ordering::SeqCst) < RESTART_AFTER {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_restart = published.load(Ordering::SeqCst);
    let restarted = Instant::now();
    server.restart().await;
    let down_for = restarted.elapsed();
    let after_restart = published.load(Ordering::SeqCst);
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let seen = consumer.await.unwrap();
    eprintln!(
        "restart: began after {at_restart} published, server back after {down_for:?} \
         ({after_restart} published by then)"
    );
    assert!(
        at_restart < EVENTS && after_restart < EVENTS,
        "the restart must fall in the middle of publishing"
    );

    let missing: Vec<u64> = (0..EVENTS as u64)
        .filter(|s| !seen.contains_key(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let deliveries: usize = seen.values().map(Vec::len).sum();
    // A first delivery lost with the connection (read by Redis, reply never received) comes
    // back as attempt 2 when reclaimed: that is a redelivery, not a duplicate.
    let first_lost = seen.values().filter(|a| !a.contains(&1)).count();
    let duplicated_firsts: Vec<_> = seen
        .iter()
        .filter(|(_, attempts)| attempts.iter().filter(|&&a| a == 1).count() > 1)
        .collect();
    eprintln!(
        "restart: {EVENTS} events delivered in {deliveries} deliveries: {} redeliveries \
         (attempt > 1), of which {first_lost} replaced a first delivery lost with the connection",
        seen.values().flatten().filter(|&&a| a > 1).count()
    );
    assert!(
        duplicated_firsts.is_empty(),
        "duplicates that are not redeliveries (published twice, or delivered twice as new): {:?}",
        &duplicated_firsts[..duplicated_firsts.len().min(10)]
    );
    assert!(
        seen.values().flatten().all(|&a| a <= 2),
        "no event needs more than one redelivery here"
    );
    transport.close().await;
}
