//! Redis backend throughput against raw redis-rs doing the same work, in the same run.
//!
//! `cargo bench -p orchestrator-backends --features redis --bench redis`
//!
//! - publish: raw `XADD` one at a time / pipelined 100, against `RedisTransport::publish` /
//!   `publish_batch(100)` and `RedisEventStore::append` of 1 / 100 events (an append writes
//!   two entries per event and checks the version, in one script call);
//! - consume: raw `XREADGROUP COUNT 100` + one `XACK` per batch, against a `RedisTransport`
//!   subscription (prefetch 100) handing out deliveries that are acked one by one; for
//!   reference, raw again decoding each entry's CloudEvent, work the library cannot skip.
//!
//! Raw redis-rs writes the same bytes the library writes (the CloudEvents JSON of a
//! 200-byte JSON payload); events are made before the clock starts. Each group of
//! measurements runs back to back, raw first in even rounds and last in odd ones, Redis
//! emptied in between; the bench prints the median rate of each and the median of the
//! per-round ratios ours / raw. `REDIS_BENCH_ROUNDS` overrides the number of rounds (9).
//! Needs the Redis at `ORCHESTRATOR_REDIS_URL` (default `redis://127.0.0.1:6379`); if it is
//! unreachable the bench says so and exits successfully. Its keys live under a random prefix
//! and are deleted afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use orchestrator_backends::redis::{RedisConfig, RedisEventStore, RedisTransport};
use orchestrator_core::{
    EventEnvelope, EventStore, ExpectedVersion, SubscribeOptions, Transport, cloudevents,
};
use redis::aio::MultiplexedConnection;

/// Rounds unless `REDIS_BENCH_ROUNDS` says otherwise (at least 5 for a report).
const ROUNDS: usize = 9;
const SINGLE: usize = 2_000;
const BATCHED: usize = 30_000;
const BATCH: usize = 100;
const CONSUMED: usize = 30_000;

/// A 200-byte JSON object.
fn payload() -> Vec<u8> {
    let mut value = serde_json::json!({
        "order_id": "o-00000042",
        "customer": "c-000042",
        "amount_cents": 129_900,
        "currency": "EUR",
        "items": [{"sku": "sku-1", "qty": 2}, {"sku": "sku-2", "qty": 1}],
        "note": "",
    });
    let len = serde_json::to_vec(&value).unwrap().len();
    value["note"] = "x".repeat(200usize.saturating_sub(len)).into();
    serde_json::to_vec(&value).unwrap()
}

fn event(topic: &str, payload: &[u8]) -> EventEnvelope {
    EventEnvelope::from_bytes(topic, "application/json", payload.to_vec()).unwrap()
}

/// Events made before the clock starts: the bench times the library, not event making.
fn events(n: usize) -> Vec<EventEnvelope> {
    let payload = payload();
    (0..n).map(|_| event("bench.order", &payload)).collect()
}

fn batches() -> Vec<Vec<EventEnvelope>> {
    let mut all = events(BATCHED).into_iter();
    (0..BATCHED / BATCH)
        .map(|_| all.by_ref().take(BATCH).collect())
        .collect()
}

struct Bench {
    url: String,
    prefix: String,
    raw: MultiplexedConnection,
    wire: Vec<u8>,
    run: usize,
}

impl Bench {
    fn key(&mut self, what: &str) -> String {
        self.run += 1;
        format!("{}{what}-{}", self.prefix, self.run)
    }

    fn config(&mut self) -> RedisConfig {
        self.run += 1;
        RedisConfig::new(&self.url)
            .unwrap()
            .with_prefix(format!("{}r{}:", self.prefix, self.run))
    }

    async fn clean(&mut self) {
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.raw)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: usize = redis::cmd("DEL")
                    .arg(keys)
                    .query_async(&mut self.raw)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    fn xadd(&self, pipe: &mut redis::Pipeline, key: &str) {
        pipe.cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("type")
            .arg("bench.order")
            .arg("event")
            .arg(&self.wire)
            .ignore();
    }

    async fn raw_xadd_single(&mut self) -> f64 {
        let key = self.key("raw1");
        let started = Instant::now();
        for _ in 0..SINGLE {
            let _: String = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("type")
                .arg("bench.order")
                .arg("event")
                .arg(&self.wire)
                .query_async(&mut self.raw)
                .await
                .unwrap();
        }
        rate(SINGLE, started)
    }

    async fn raw_xadd_pipelined(&mut self) -> f64 {
        let key = self.key("raw100");
        let started = Instant::now();
        for _ in 0..BATCHED / BATCH {
            let mut pipe = redis::pipe();
            for _ in 0..BATCH {
                self.xadd(&mut pipe, &key);
            }
            pipe.query_async::<()>(&mut self.raw).await.unwrap();
        }
        rate(BATCHED, started)
    }

    async fn publish_single(&mut self) -> f64 {
        let transport = RedisTransport::connect(self.config()).await.unwrap();
        let events = events(SINGLE);
        let started = Instant::now();
        for event in events {
            transport.publish("bench.order", event).await.unwrap();
        }
        rate(SINGLE, started)
    }

    async fn publish_batched(&mut self) -> f64 {
        let transport = RedisTransport::connect(self.config()).await.unwrap();
        let batches = batches();
        let started = Instant::now();
        for batch in batches {
            transport.publish_batch("bench.order", batch).await.unwrap();
        }
        rate(BATCHED, started)
    }

    async fn append_single(&mut self) -> f64 {
        let store = RedisEventStore::connect(self.config()).await.unwrap();
        let events = events(SINGLE);
        let started = Instant::now();
        for (version, event) in events.into_iter().enumerate() {
            let expected = ExpectedVersion::Exact(version as u64);
            store
                .append("order-1", expected, vec![event])
                .await
                .unwrap();
        }
        rate(SINGLE, started)
    }

    async fn append_batched(&mut self) -> f64 {
        let store = RedisEventStore::connect(self.config()).await.unwrap();
        let batches = batches();
        let started = Instant::now();
        for (b, batch) in batches.into_iter().enumerate() {
            let expected = ExpectedVersion::Exact((b * BATCH) as u64);
            store.append("order-1", expected, batch).await.unwrap();
        }
        rate(BATCHED, started)
    }

    /// Fills `key` with `CONSUMED` entries and makes group `g` reading from the start.
    async fn fill(&mut self, key: &str) {
        for _ in 0..CONSUMED / 1000 {
            let mut pipe = redis::pipe();
            for _ in 0..1000 {
                self.xadd(&mut pipe, key);
            }
            pipe.query_async::<()>(&mut self.raw).await.unwrap();
        }
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("0")
            .query_async(&mut self.raw)
            .await
            .unwrap();
    }

    /// With `decode`, each entry's `event` is also decoded: what raw consumers that need the
    /// event (as the library does) pay on top.
    async fn raw_consume(&mut self, decode: bool) -> f64 {
        let key = self.key("rawc");
        self.fill(&key).await;
        let options = redis::streams::StreamReadOptions::default()
            .group("g", "c")
            .count(BATCH);
        let started = Instant::now();
        let mut done = 0;
        while done < CONSUMED {
            let reply: Option<redis::streams::StreamReadReply> =
                redis::AsyncCommands::xread_options(&mut self.raw, &[&key], &[">"], &options)
                    .await
                    .unwrap();
            let reply = reply.unwrap();
            if decode {
                for entry in &reply.keys[0].ids {
                    let Some(redis::Value::BulkString(json)) = entry.map.get("event") else {
                        panic!("entry without `event`");
                    };
                    std::hint::black_box(cloudevents::decode(json).unwrap());
                }
            }
            let ids: Vec<String> = reply.keys[0].ids.iter().map(|e| e.id.clone()).collect();
            done += ids.len();
            let _: usize = redis::AsyncCommands::xack(&mut self.raw, &key, "g", &ids)
                .await
                .unwrap();
        }
        rate(CONSUMED, started)
    }

    async fn consume(&mut self) -> f64 {
        let config = self.config();
        let key = format!("{}topic:bench.order", config.prefix());
        self.fill(&key).await;
        let transport = RedisTransport::connect(config).await.unwrap();
        let started = Instant::now();
        // The group exists (reading from the start): subscribing joins it.
        let options = SubscribeOptions::new("g", "bench.order")
            .unwrap()
            .prefetch(BATCH);
        let mut deliveries = transport.subscribe(options).await.unwrap();
        for _ in 0..CONSUMED {
            let delivery = deliveries.next().await.unwrap().unwrap();
            delivery.ack().await.unwrap();
        }
        // Acks are sent in the background: count until they are all in.
        loop {
            let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
                .arg(&key)
                .arg("g")
                .query_async(&mut self.raw)
                .await
                .unwrap();
            if pending.0 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rate = rate(CONSUMED, started);
        drop(deliveries);
        transport.close().await;
        rate
    }
}

fn rate(n: usize, started: Instant) -> f64 {
    n as f64 / started.elapsed().as_secs_f64()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = orchestrator_core::testkit::services::redis_url();
    let raw = async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    let raw = match tokio::time::timeout(Duration::from_secs(3), raw).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return println!("redis bench skipped: Redis at {url} is unreachable ({e})"),
        Err(_) => return println!("redis bench skipped: Redis at {url} does not answer"),
    };
    let wire = cloudevents::encode(&events(1)[0]).unwrap();
    println!(
        "redis bench: {url}, payload {} B of JSON ({} B as a CloudEvent), medians",
        payload().len(),
        wire.len()
    );
    let mut bench = Bench {
        url,
        prefix: format!("orchestrator-bench:{}:", uuid::Uuid::now_v7().simple()),
        raw,
        wire,
        run: 0,
    };

    let rounds = std::env::var("REDIS_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    // Each group is measured back to back, raw first in even rounds and last in odd ones,
    // with Redis emptied in between; ratios are taken within a round, then the median.
    let mut single = Group::new(&[
        "raw XADD, one at a time",
        "RedisTransport::publish",
        "RedisEventStore::append, 1 event",
    ]);
    let mut batched = Group::new(&[
        "raw XADD, pipelined 100",
        "RedisTransport::publish_batch(100)",
        "RedisEventStore::append, 100 events",
    ]);
    let mut consume = Group::new(&[
        "raw XREADGROUP COUNT 100 + XACK",
        "RedisTransport consume + ack",
        "  (raw + cloudevents::decode each)",
    ]);
    for round in 0..rounds {
        let reverse = round % 2 == 1;
        for i in order(3, reverse) {
            let rate = match i {
                0 => bench.raw_xadd_single().await,
                1 => bench.publish_single().await,
                _ => bench.append_single().await,
            };
            single.samples[i].push(rate);
            bench.clean().await;
        }
        for i in order(3, reverse) {
            let rate = match i {
                0 => bench.raw_xadd_pipelined().await,
                1 => bench.publish_batched().await,
                _ => bench.append_batched().await,
            };
            batched.samples[i].push(rate);
            bench.clean().await;
        }
        for i in order(3, reverse) {
            let rate = match i {
                0 => bench.raw_consume(false).await,
                1 => bench.consume().await,
                _ => bench.raw_consume(true).await,
            };
            consume.samples[i].push(rate);
            bench.clean().await;
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    println!(
        "{:<40} {:>12} {:>16}",
        "", "median msgs/s", "ours/raw median"
    );
    for group in [&single, &batched, &consume] {
        group.print();
    }
    println!(
        "(ours/raw is the median of the per-round ratios to the first line of each group; target >= 0.8)"
    );
}

fn order(n: usize, reverse: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if reverse {
        order.reverse();
    }
    order
}

/// Measurements compared with the first one, the raw client.
struct Group {
    names: Vec<&'static str>,
    samples: Vec<Vec<f64>>,
}

impl Group {
    fn new(names: &[&'static str]) -> Self {
        Self {
            names: names.to_vec(),
            samples: names.iter().map(|_| Vec::new()).collect(),
        }
    }

    fn print(&self) {
        for (i, name) in self.names.iter().enumerate() {
            let rate = median(self.samples[i].clone());
            if i == 0 {
                println!("{name:<40} {rate:>12.0}");
            } else {
                let ratios = self.samples[i]
                    .iter()
                    .zip(&self.samples[0])
                    .map(|(ours, raw)| ours / raw)
                    .collect();
                println!("{name:<40} {rate:>12.0} {:>16.2}", median(ratios));
            }
        }
    }
}
