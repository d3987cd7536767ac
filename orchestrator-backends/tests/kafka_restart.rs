//! A broker restart in the middle of a 10,000-event run: a second tansu of its own (sqlite
//! storage in a temporary folder, a spare port) is killed with SIGKILL while events are being
//! published and consumed, then started again on the same folder and port. Every event must
//! arrive; duplicates may only be redeliveries (the topic itself holds each event once).
//! The shared broker is never touched.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kafka_support;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kafka_support::config;
use orchestrator_backends::kafka::KafkaTransport;
use orchestrator_core::testkit::services;
use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const EVENTS: usize = 10_000;
const BATCH: usize = 200;
/// How long the consumer may go without a new event before the test gives up (the broker's
/// restart, the group's rejoin and the redeliveries all fit well inside it).
const DELIVERY_STALL: Duration = Duration::from_secs(90);

/// The tansu binary: `ORCHESTRATOR_TANSU`, else where `cargo xtask services up` installs it.
fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("ORCHESTRATOR_TANSU") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/orchestrator/tools/bin/tansu")
}

/// A tansu of this test's own; SIGKILLed and its folder removed when dropped, whatever happens.
struct Broker {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn new(binary: PathBuf) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "orchestrator-kafka-restart-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // A port nobody listens on right now.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            binary,
            dir,
            port,
            child: None,
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let url = format!("tcp://{}", self.address());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let child = Command::new(&self.binary)
            .current_dir(&self.dir)
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.address()).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not start: see {:?}",
                self.dir
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing() {
    let binary = tansu_binary();
    if !binary.is_file() {
        services::unreachable(
            "Kafka (tansu, for the restart test)",
            &binary.display().to_string(),
            &"not installed",
        );
        return;
    }
    let mut broker = Broker::new(binary);
    broker.start();
    let brokers = broker.address();
    let prefix = "restart.";
    let transport = KafkaTransport::connect(config(&brokers, prefix))
        .await
        .unwrap();
    let topic = "load.item";
    let mut sub = transport
        .subscribe(
            SubscribeOptions::new("loaders", topic)
                .unwrap()
                .prefetch(256),
        )
        .await
        .unwrap();

    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (transport, published) = (transport.clone(), Arc::clone(&published));
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(EVENTS);
            for chunk in 0..EVENTS / BATCH {
                let events: Vec<EventEnvelope> = (0..BATCH)
                    .map(|i| {
                        EventEnvelope::new(topic, &serde_json::json!({"n": chunk * BATCH + i}))
                            .unwrap()
                    })
                    .collect();
                ids.extend(events.iter().map(|e| e.id().clone()));
                // A batch that fails while the broker is away is sent again: the idempotent
                // producer keeps a retry from writing twice what did land.
                loop {
                    match transport.publish_batch(topic, events.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            eprintln!("publish failed ({e}); retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                published.fetch_add(BATCH, Ordering::SeqCst);
            }
            ids
        })
    };

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut deliveries = 0_usize;
    let mut restarted = false;
    // The run takes as long as the machine needs; it fails only when deliveries stop.
    let mut last_new = Instant::now();
    while seen.len() < EVENTS {
        assert!(
            last_new.elapsed() < DELIVERY_STALL,
            "no new event for {DELIVERY_STALL:?}: only {} of {EVENTS} events arrived \
             ({deliveries} deliveries, {} published)",
            seen.len(),
            published.load(Ordering::SeqCst)
        );
        if !restarted && published.load(Ordering::SeqCst) >= EVENTS * 3 / 10 {
            eprintln!(
                "killing the broker (SIGKILL) after {} published, {} received",
                published.load(Ordering::SeqCst),
                seen.len()
            );
            broker.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            broker.start();
            eprintln!("broker restarted");
            restarted = true;
        }
        let Ok(next) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await else {
            continue;
        };
        let delivery = next.unwrap().expect("the subscription ended");
        deliveries += 1;
        let copies = seen.entry(delivery.event().id().to_string()).or_default();
        if *copies == 0 {
            last_new = Instant::now();
        }
        *copies += 1;
        // An ack that cannot be committed (broker away) is redelivered later: counted below.
        delivery.ack().await.unwrap();
    }
    let ids = publisher.await.unwrap();
    assert!(restarted, "the broker was never restarted");
    assert_eq!(ids.len(), EVENTS);
    for id in &ids {
        assert!(seen.contains_key(id.as_str()), "event {id} was lost");
    }
    assert_eq!(seen.len(), EVENTS, "deliveries of events nobody published");
    let duplicates = deliveries - EVENTS;
    eprintln!("{EVENTS} events, {deliveries} deliveries: {duplicates} redeliveries");

    // The topic holds each event exactly once: every duplicate delivery was a redelivery.
    let kafka_topic = transport.kafka_topic(topic).unwrap();
    let in_log = count_records(&brokers, &kafka_topic).await;
    let copies = in_log.values().filter(|&&n| n > 1).count();
    assert_eq!(in_log.len(), EVENTS, "events in the topic");
    assert_eq!(copies, 0, "events written to the topic more than once");
    // Close the subscription (and tidy up) while the broker is there to answer.
    drop(sub);
    transport.delete_all_topics().await.unwrap();
    drop(transport);
    drop(broker);
}

/// How long reading the topic back may go without a single new record before the test
/// gives up: a bound on a stall, not on the whole read, which takes as long as the broker
/// needs to serve the records up to the watermarks.
const READ_BACK_STALL: Duration = Duration::from_secs(60);

/// Reads the whole topic with a plain consumer: event id → records.
///
/// Each partition is assigned by hand (no group: no join to wait for, no rebalance that
/// could start a partition over) from its low watermark, and read until the consumer has
/// passed its high watermark as it stands once the run is over: the read ends when every
/// record the broker acknowledged has been counted, whatever the machine's speed, and each
/// offset is counted once however often a fetch hands it out.
async fn count_records(brokers: &str, topic: &str) -> HashMap<String, usize> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("count-{}", uuid::Uuid::now_v7().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    // Partition → (next offset to count, high watermark).
    let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), timeout)
            .unwrap();
        ranges.insert(partition.id(), (low, high));
        assignment
            .add_partition_offset(topic, partition.id(), Offset::Offset(low))
            .unwrap();
    }
    let records: i64 = ranges.values().map(|(low, high)| high - low).sum();
    consumer.assign(&assignment).unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut read = 0;
    while ranges.values().any(|(next, high)| next < high) {
        let message = tokio::time::timeout(READ_BACK_STALL, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "reading `{topic}` back: no record for {READ_BACK_STALL:?} after {read} of \
                     the {records} records below the watermarks {ranges:?}"
                )
            })
            .unwrap();
        let Some((next, _)) = ranges.get_mut(&message.partition()) else {
            continue;
        };
        if message.offset() < *next {
            continue;
        }
        *next = message.offset() + 1;
        let event = orchestrator_core::cloudevents::decode(message.payload().unwrap()).unwrap();
        *counts.entry(event.id().to_string()).or_default() += 1;
        read += 1;
    }
    eprintln!("{read} records in `{topic}` (watermarks {ranges:?})");
    counts
}
