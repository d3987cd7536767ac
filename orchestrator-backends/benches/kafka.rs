//! Kafka throughput: the backend against raw rdkafka doing the same work, in the same run.
//!
//! - produce: raw `FutureProducer` (idempotent, 10 000 messages in flight, 200-byte JSON
//!   values) against `KafkaTransport::publish_batch` (batches of 10 000 events with 200-byte
//!   JSON payloads, sent as CloudEvents);
//! - consume: raw `StreamConsumer` in a fresh group (`fetch.wait.max.ms` 10, offsets stored
//!   as it goes) against a `KafkaTransport` subscription of a fresh group (fetch wait 10 ms),
//!   `next()` + `ack()` per event; timed from the first message to the last.
//!
//! - store append: raw `FutureProducer` writing the very records `KafkaEventStore::append`
//!   writes (one partition, stream id as key, CloudEvents JSON with the stream id, the same
//!   headers), waiting for each delivery, against `KafkaEventStore::append`, which also keeps
//!   its stream index: single events by 64 tasks at once (`STORE_SINGLES` events), and
//!   batches of 100 from one task (`STORE_BATCHES` batches).
//!
//! Each is run `REPS` times (the store rows `STORE_REPS`); medians are printed with the
//! ratio ours/raw. `KAFKA_BENCH_ONLY=store` runs the store rows alone, `=transport` the
//! others; `KAFKA_BENCH_STORE_SCALE=<percent>` scales the store rows' event counts.
//!
//! The broker: with `ORCHESTRATOR_KAFKA_BROKERS` set, that one. Otherwise the bench starts a
//! tansu of its own (the one `cargo xtask services up` installs) with
//! `--storage-engine sqlite://tansu.db` (the store rows read the log back, which the memory
//! engine does not reliably serve) on a spare loopback port — it leaves the shared test
//! broker alone — and stops it at the end. Without either,
//! or when the broker does not answer, it says why and exits successfully.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use std::sync::Arc;

use orchestrator_backends::kafka::{KafkaConfig, KafkaEventStore, KafkaTransport};
use orchestrator_core::testkit::services;
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, SubscribeOptions, Transport};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

const REPS: usize = 5;
const PRODUCE: usize = 100_000;
const CONSUME: usize = 200_000;
const IN_FLIGHT: usize = 10_000;
const TOPIC: &str = "bench.item";
/// Where the raw producer writes: its plain JSON values are not events, so they stay out of
/// the topic the consumers read.
const RAW_TOPIC: &str = "bench.raw";
const STORE_REPS: usize = 3;
/// Single-event appends per store rep, made by [`STORE_WRITERS`] tasks at once.
const STORE_SINGLES: usize = 5_000;
const STORE_WRITERS: usize = 64;
/// Batches of [`STORE_BATCH`] events per store rep, appended one after another.
const STORE_BATCHES: usize = 100;
const STORE_BATCH: usize = 100;
/// The raw writer's topic for the store rows: one partition, as the store's log.
const RAW_LOG_TOPIC: &str = "bench.rawlog";

fn payload(i: usize) -> serde_json::Value {
    // About 200 bytes of JSON.
    serde_json::json!({
        "order_id": format!("order-{i:08}"),
        "customer": "customer-0001234",
        "amount_cents": 129_900,
        "currency": "EUR",
        "lines": [{"sku": "sku-000042", "qty": 2}, {"sku": "sku-000043", "qty": 1}],
        "note": "two hundred bytes of json, more or less, for the benchmark",
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let own = if std::env::var_os("ORCHESTRATOR_KAFKA_BROKERS").is_some() {
        None
    } else {
        OwnBroker::start()
    };
    let brokers = own
        .as_ref()
        .map_or_else(services::kafka_brokers, OwnBroker::address);
    runtime.block_on(run(brokers));
    drop(own);
}

/// A tansu with sqlite storage on a spare port, killed when dropped (its folder removed).
struct OwnBroker {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl OwnBroker {
    fn start() -> Option<Self> {
        let home = std::env::var_os("HOME")?;
        let binary = std::path::Path::new(&home).join(".cache/orchestrator/tools/bin/tansu");
        if !binary.is_file() {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("orchestrator-kafka-bench-{port}"));
        std::fs::create_dir_all(&dir).ok()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(binary)
            .current_dir(&dir)
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let broker = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(broker.address()).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "kafka bench: started tansu (sqlite storage) at {}",
            broker.address()
        );
        Some(broker)
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn run(brokers: String) {
    let prefix = format!("bench{}.", uuid::Uuid::now_v7().simple());
    let config = KafkaConfig::new(&brokers)
        .with_prefix(&prefix)
        .expect("a valid prefix")
        .with_fetch_wait(Duration::from_millis(10))
        .with_operation_timeout(Duration::from_secs(10));
    let transport = match tokio::time::timeout(
        Duration::from_secs(15),
        KafkaTransport::connect(config.clone()),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return println!("kafka bench skipped: broker at {brokers} unreachable: {e}"),
        Err(_) => return println!("kafka bench skipped: broker at {brokers} did not answer"),
    };
    let kafka_topic = transport.kafka_topic(TOPIC).expect("a valid topic");
    let raw_topic = transport.kafka_topic(RAW_TOPIC).expect("a valid topic");
    // Creates the topics.
    for topic in [TOPIC, RAW_TOPIC] {
        let event = EventEnvelope::new(topic, &payload(0)).expect("an event");
        transport.publish(topic, event).await.expect("publish");
    }

    let raw_producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("a producer");
    let value = serde_json::to_vec(&payload(0)).expect("json");
    let only = std::env::var("KAFKA_BENCH_ONLY").unwrap_or_default();
    if only != "transport" {
        store_rows(&brokers, &config, &raw_producer).await;
    }
    if only == "store" {
        if let Err(e) = transport.delete_all_topics().await {
            println!("cleanup failed: {e}");
        }
        return;
    }
    println!(
        "kafka bench: broker {brokers}, {REPS} reps, produce {PRODUCE} ({IN_FLIGHT} in flight), \
         consume {CONSUME}; payload {} bytes of JSON (CloudEvent on the wire: {} bytes)",
        value.len(),
        orchestrator_core::cloudevents::encode(&EventEnvelope::new(TOPIC, &payload(0)).unwrap())
            .unwrap()
            .len()
    );
    // Warm up: the first acknowledgement of an idempotent producer takes a while.
    raw_produce(&raw_producer, &raw_topic, &value, 1_000).await;
    our_produce(&transport, &events(1_000)).await;

    // For reference: raw, sending the very bytes the library sends (CloudEvents JSON with its
    // content-type header): what is left is the library's own cost.
    let wire =
        orchestrator_core::cloudevents::encode(&EventEnvelope::new(TOPIC, &payload(0)).unwrap())
            .unwrap();
    let (mut raw_p, mut our_p, mut same_p) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        let t = Instant::now();
        raw_produce(&raw_producer, &raw_topic, &value, PRODUCE).await;
        raw_p.push(PRODUCE as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        raw_produce_events(&raw_producer, &raw_topic, &wire, PRODUCE).await;
        same_p.push(PRODUCE as f64 / t.elapsed().as_secs_f64());
        // Events are made before the clock starts, as the raw values are.
        let batches = events(PRODUCE);
        let t = Instant::now();
        our_produce(&transport, &batches).await;
        our_p.push(PRODUCE as f64 / t.elapsed().as_secs_f64());
    }
    report("produce", &raw_p, &our_p);
    report(
        "produce (raw sending the same CloudEvent bytes + header)",
        &same_p,
        &our_p,
    );

    // Enough events in the topic for every consume run (each group reads from the start).
    let have = 2_000 + (REPS + 1) * PRODUCE;
    if have < CONSUME {
        our_produce(&transport, &events(CONSUME - have)).await;
    }
    let (mut raw_c, mut our_c, mut decode_c) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..REPS {
        raw_c.push(raw_consume(&brokers, &kafka_topic, &format!("{prefix}raw{rep}"), false).await);
        decode_c
            .push(raw_consume(&brokers, &kafka_topic, &format!("{prefix}dec{rep}"), true).await);
        our_c.push(our_consume(&transport, &format!("ours{rep}")).await);
    }
    report("consume", &raw_c, &our_c);
    report(
        "consume (raw also decoding each CloudEvent)",
        &decode_c,
        &our_c,
    );

    if let Err(e) = transport.delete_all_topics().await {
        println!("cleanup failed: {e}");
    }
}

fn report(what: &str, raw: &[f64], ours: &[f64]) {
    let (r, o) = (median(raw.to_vec()), median(ours.to_vec()));
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.0}k", x / 1000.0))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("{what}");
    println!("    raw  median {r:>10.0} msg/s   [{}]", fmt(raw));
    println!("    ours median {o:>10.0} msg/s   [{}]", fmt(ours));
    println!("    ratio ours/raw {:.2}", o / r);
}

async fn raw_produce(producer: &FutureProducer, topic: &str, value: &[u8], n: usize) {
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::with_capacity(IN_FLIGHT);
    for i in 0..n {
        if in_flight.len() >= IN_FLIGHT
            && let Some(oldest) = in_flight.pop_front()
        {
            oldest.await.expect("delivery").expect("delivered");
        }
        let key = format!("key-{i}");
        let record = FutureRecord::to(topic).key(&key).payload(value);
        match producer.send_result(record) {
            Ok(f) => in_flight.push_back(f),
            Err((e, _)) => panic!("produce: {e}"),
        }
    }
    for f in in_flight {
        f.await.expect("delivery").expect("delivered");
    }
}

/// `n` events in batches of [`IN_FLIGHT`].
fn events(n: usize) -> Vec<Vec<EventEnvelope>> {
    (0..n)
        .map(|i| EventEnvelope::new(TOPIC, &payload(i)).expect("an event"))
        .collect::<Vec<_>>()
        .chunks(IN_FLIGHT)
        .map(<[EventEnvelope]>::to_vec)
        .collect()
}

/// Raw, with the library's wire format: CloudEvents JSON value, content-type header, event
/// id as key.
async fn raw_produce_events(producer: &FutureProducer, topic: &str, value: &[u8], n: usize) {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::with_capacity(IN_FLIGHT);
    for _ in 0..n {
        if in_flight.len() >= IN_FLIGHT
            && let Some(oldest) = in_flight.pop_front()
        {
            oldest.await.expect("delivery").expect("delivered");
        }
        let key = uuid::Uuid::now_v7().to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/cloudevents+json"),
        });
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(value)
            .headers(headers);
        match producer.send_result(record) {
            Ok(f) => in_flight.push_back(f),
            Err((e, _)) => panic!("produce: {e}"),
        }
    }
    for f in in_flight {
        f.await.expect("delivery").expect("delivered");
    }
}

async fn our_produce(transport: &KafkaTransport, batches: &[Vec<EventEnvelope>]) {
    for batch in batches {
        transport
            .publish_batch(TOPIC, batch.clone())
            .await
            .expect("publish_batch");
    }
}

async fn raw_consume(brokers: &str, topic: &str, group: &str, decode: bool) -> f64 {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut start = None;
    for _ in 0..CONSUME {
        let message = consumer.recv().await.expect("a message");
        start.get_or_insert_with(Instant::now);
        if decode {
            let event =
                orchestrator_core::cloudevents::decode(message.payload().unwrap_or_default());
            std::hint::black_box(event.expect("a CloudEvent"));
        }
        consumer
            .store_offset(message.topic(), message.partition(), message.offset() + 1)
            .expect("store offset");
    }
    let rate = (CONSUME - 1) as f64 / start.map_or(1.0, |s| s.elapsed().as_secs_f64());
    tokio::task::spawn_blocking(move || drop(consumer));
    rate
}

async fn our_consume(transport: &KafkaTransport, group: &str) -> f64 {
    let mut sub = transport
        .subscribe(
            SubscribeOptions::new(group, TOPIC)
                .expect("options")
                .prefetch(1024),
        )
        .await
        .expect("subscribe");
    let mut start = None;
    for _ in 0..CONSUME {
        let delivery = sub.next().await.expect("next").expect("a delivery");
        start.get_or_insert_with(Instant::now);
        delivery.ack().await.expect("ack");
    }
    (CONSUME - 1) as f64 / start.map_or(1.0, |s| s.elapsed().as_secs_f64())
}

/// The store rows: `KafkaEventStore::append` against raw producing the same records.
async fn store_rows(brokers: &str, config: &KafkaConfig, raw_producer: &FutureProducer) {
    let store = match KafkaEventStore::connect(config.clone()).await {
        Ok(store) => Arc::new(store),
        Err(e) => return println!("kafka store rows skipped: {e}"),
    };
    let raw_log = format!("{}{RAW_LOG_TOPIC}", config.prefix());
    // The raw log topic: one partition, as the store's (created by a store on that name).
    let raw_store = KafkaEventStore::connect(
        config
            .clone()
            .with_store_topic(&raw_log)
            .expect("a valid topic"),
    )
    .await
    .expect("the raw log topic");
    let scale = std::env::var("KAFKA_BENCH_STORE_SCALE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(100)
        .max(1);
    let (singles_n, batches_n) = (
        (STORE_SINGLES * scale / 100).max(STORE_WRITERS),
        (STORE_BATCHES * scale / 100).max(1),
    );
    println!(
        "kafka store bench: broker {brokers}, {STORE_REPS} reps; single appends: \
         {singles_n} by {STORE_WRITERS} tasks; batches: {batches_n} × {STORE_BATCH} from one \
         task"
    );
    // Warm up both.
    let warm: Vec<EventEnvelope> = (0..100).map(store_event).collect();
    store
        .append("warm", ExpectedVersion::Any, warm.clone())
        .await
        .expect("append");
    raw_append(raw_producer, &raw_log, &warm).await;

    let (mut raw_s, mut our_s, mut raw_b, mut our_b) = (vec![], vec![], vec![], vec![]);
    for rep in 0..STORE_REPS {
        let singles: Arc<[EventEnvelope]> = (0..singles_n).map(store_event).collect();
        let stream = format!("single-{rep}");
        raw_s.push(
            concurrently(&singles, |event| {
                let (producer, topic) = (raw_producer.clone(), raw_log.clone());
                async move { raw_append(&producer, &topic, std::slice::from_ref(&event)).await }
            })
            .await,
        );
        our_s.push(
            concurrently(&singles, |event| {
                let (store, stream) = (Arc::clone(&store), stream.clone());
                async move {
                    store
                        .append(&stream, ExpectedVersion::Any, vec![event])
                        .await
                        .expect("append");
                }
            })
            .await,
        );
        let batches: Vec<Vec<EventEnvelope>> = (0..batches_n)
            .map(|b| {
                (0..STORE_BATCH)
                    .map(|i| store_event(b * STORE_BATCH + i))
                    .collect()
            })
            .collect();
        let t = Instant::now();
        for batch in &batches {
            raw_append(raw_producer, &raw_log, batch).await;
        }
        raw_b.push((batches_n * STORE_BATCH) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for batch in batches {
            store
                .append(&format!("batch-{rep}"), ExpectedVersion::Any, batch)
                .await
                .expect("append");
        }
        our_b.push((batches_n * STORE_BATCH) as f64 / t.elapsed().as_secs_f64());
    }
    report(
        &format!("store append, single events, {STORE_WRITERS} in flight"),
        &raw_s,
        &our_s,
    );
    report(
        &format!("store append, batches of {STORE_BATCH}"),
        &raw_b,
        &our_b,
    );
    for store in [store.as_ref(), &raw_store] {
        if let Err(e) = store.delete_topic().await {
            println!("cleanup failed: {e}");
        }
    }
}

/// An event as the store bench appends it.
fn store_event(i: usize) -> EventEnvelope {
    EventEnvelope::new(TOPIC, &payload(i)).expect("an event")
}

/// Runs `append` on every event, [`STORE_WRITERS`] tasks at once; events/s.
async fn concurrently<F, Fut>(events: &Arc<[EventEnvelope]>, append: F) -> f64
where
    F: Fn(EventEnvelope) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(STORE_WRITERS);
    for task in 0..STORE_WRITERS {
        let mine: Vec<Fut> = (task..events.len())
            .step_by(STORE_WRITERS)
            .map(|i| append(events[i].clone()))
            .collect();
        tasks.push(tokio::spawn(async move {
            for one in mine {
                one.await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("a writer");
    }
    events.len() as f64 / t.elapsed().as_secs_f64()
}

/// Raw: the records `KafkaEventStore::append` writes for `events` (partition 0, the stream
/// id as key, CloudEvents JSON with the stream id, the content-type header), then waits
/// for every delivery.
async fn raw_append(producer: &FutureProducer, topic: &str, events: &[EventEnvelope]) {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut pending = Vec::with_capacity(events.len());
    for event in events {
        let event = event.clone().with_stream_id("raw");
        let value = orchestrator_core::cloudevents::encode(&event).expect("encode");
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/cloudevents+json"),
        });
        let record = FutureRecord::to(topic)
            .partition(0)
            .key("raw")
            .payload(&value[..])
            .headers(headers);
        match producer.send_result(record) {
            Ok(f) => pending.push(f),
            Err((e, _)) => panic!("produce: {e}"),
        }
    }
    for f in pending {
        f.await.expect("delivery").expect("delivered");
    }
}
