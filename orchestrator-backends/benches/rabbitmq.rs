//! RabbitMQ throughput: `RabbitMqTransport` against raw lapin doing the same work, in the
//! same run, on the broker at `ORCHESTRATOR_AMQP_URL`.
//!
//! `cargo bench -p orchestrator-backends --features rabbitmq --bench rabbitmq`
//!
//! Persistent messages of 200-byte JSON payloads into a durable queue, publisher confirms:
//! - publish, 500 in flight: raw `basic_publish` ×500 then await the confirms, vs
//!   `publish_batch` of 500;
//! - publish, each confirm awaited: raw publish + await, vs `publish`;
//! - consume with prefetch 500, ack each: raw `basic_consume`, vs `subscribe` + `ack`
//!   (which also decodes each CloudEvent);
//! - store appends: raw `basic_publish` of the very messages `RabbitMqEventStore::append`
//!   writes (CloudEvents body, the store's properties and headers) into a stream queue, each
//!   confirm awaited, vs `append` (which also waits for its log reader to see the write, to
//!   learn the positions): single events by 64 tasks at once, and batches of 100 from one
//!   task.
//!
//! Each measurement runs `ROUNDS` times; the medians and the ratio ours/raw are printed.
//! When the broker is unreachable it says so and exits 0.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::Arc;

use orchestrator_backends::rabbitmq::{
    RabbitMqConfig, RabbitMqEventStore, RabbitMqStoreConfig, RabbitMqTransport,
};
use orchestrator_core::{
    EventEnvelope, EventStore, ExpectedVersion, SubscribeOptions, Transport, cloudevents,
};
use serde_json::json;

const ROUNDS: usize = 5;
const IN_FLIGHT: usize = 500;
const BATCH_MESSAGES: usize = 10_000;
const SINGLE_MESSAGES: usize = 1_000;
const CONSUME_MESSAGES: usize = BATCH_MESSAGES + SINGLE_MESSAGES;
/// Single-event store appends per round, by [`STORE_WRITERS`] tasks at once.
const STORE_SINGLES: usize = 5_000;
const STORE_WRITERS: usize = 64;
/// Store batches per round, of [`STORE_BATCH`] events, one after another.
const STORE_BATCHES: usize = 50;
const STORE_BATCH: usize = 100;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn payload(i: usize) -> serde_json::Value {
    // 200 bytes of JSON.
    let pad = "x".repeat(150);
    json!({ "order_id": format!("o-{i:08}"), "amount_cents": 1299, "pad": pad })
}

fn raw_body(i: usize) -> Vec<u8> {
    let body = serde_json::to_vec(&payload(i)).unwrap_or_default();
    debug_assert!((190..=210).contains(&body.len()));
    body
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

async fn raw_queue(channel: &Channel, name: &str) -> BenchResult<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

async fn raw_publish(channel: &Channel, queue: &str, n: usize, window: usize) -> BenchResult<f64> {
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let mut confirms = Vec::with_capacity(window);
        for _ in 0..window.min(n - i) {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &raw_body(i),
                        persistent(),
                    )
                    .await?,
            );
            i += 1;
        }
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                return Err("nacked".into());
            }
        }
    }
    Ok(rate(n, start.elapsed()))
}

async fn raw_consume(channel: &Channel, queue: &str, n: usize) -> BenchResult<f64> {
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.ok_or("consumer ended")??;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let elapsed = start.elapsed();
    channel
        .basic_cancel(consumer.tag(), Default::default())
        .await?;
    Ok(rate(n, elapsed))
}

fn events(topic: &str, n: usize) -> Vec<EventEnvelope> {
    (0..n)
        .filter_map(|i| EventEnvelope::new(topic, &payload(i)).ok())
        .collect()
}

async fn ours_publish_batch(t: &RabbitMqTransport, topic: &str, n: usize) -> BenchResult<f64> {
    let all = events(topic, n);
    let start = Instant::now();
    for chunk in all.chunks(IN_FLIGHT) {
        t.publish_batch(topic, chunk.to_vec()).await?;
    }
    Ok(rate(n, start.elapsed()))
}

async fn ours_publish_each(t: &RabbitMqTransport, topic: &str, n: usize) -> BenchResult<f64> {
    let all = events(topic, n);
    let start = Instant::now();
    for event in all {
        t.publish(topic, event).await?;
    }
    Ok(rate(n, start.elapsed()))
}

async fn run() -> BenchResult<()> {
    let url = orchestrator_core::testkit::services::amqp_url();
    let connection = match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(error) => {
            println!("RabbitMQ at {url} is unreachable ({error}); no benchmark run");
            return Ok(());
        }
    };
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let raw_q = format!("bench.raw.{tag}");
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    raw_queue(&channel, &raw_q).await?;
    let consume_channel = connection.create_channel().await?;

    let prefix = format!("bench.ours.{tag}");
    let transport = RabbitMqTransport::connect(
        RabbitMqConfig::new(&url)
            .with_exchange(format!("{prefix}.events"))
            .with_queue_prefix(&prefix),
    )
    .await?;
    let topic = "bench.order.placed";
    let group = "bench";
    // Bind the group's queue, then stop consuming: the benchmark fills it first.
    drop(
        transport
            .subscribe(SubscribeOptions::new(group, topic)?.prefetch(500))
            .await?,
    );
    let sample = cloudevents::encode(&events(topic, 1).remove(0))?;
    println!(
        "RabbitMQ benchmark: {ROUNDS} rounds, medians; raw body {} B, CloudEvent body {} B",
        raw_body(0).len(),
        sample.len()
    );

    // The store rows: a stream queue each, the raw one declared as the store declares its own.
    let store = Arc::new(
        RabbitMqEventStore::connect(
            RabbitMqStoreConfig::new(&url).with_stream(format!("bench.store.{tag}")),
        )
        .await?,
    );
    let raw_log = format!("bench.rawlog.{tag}");
    let mut stream_arguments = FieldTable::default();
    stream_arguments.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("stream".into()),
    );
    channel
        .queue_declare(
            raw_log.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            stream_arguments,
        )
        .await?;
    let (mut raw_single, mut our_single, mut raw_batches, mut our_batches) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());

    let (mut raw_batch, mut our_batch, mut raw_each, mut our_each) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut raw_cons, mut our_cons) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        raw_batch.push(raw_publish(&channel, &raw_q, BATCH_MESSAGES, IN_FLIGHT).await?);
        our_batch.push(ours_publish_batch(&transport, topic, BATCH_MESSAGES).await?);
        raw_each.push(raw_publish(&channel, &raw_q, SINGLE_MESSAGES, 1).await?);
        our_each.push(ours_publish_each(&transport, topic, SINGLE_MESSAGES).await?);

        // Consume everything just published (10,000 + 1,000 on each side), timed.
        raw_cons.push(raw_consume(&consume_channel, &raw_q, CONSUME_MESSAGES).await?);
        let mut sub = transport
            .subscribe(SubscribeOptions::new(group, topic)?.prefetch(500))
            .await?;
        let start = Instant::now();
        for _ in 0..CONSUME_MESSAGES {
            let delivery = sub.next().await?.ok_or("subscription ended")?;
            delivery.ack().await?;
        }
        our_cons.push(rate(CONSUME_MESSAGES, start.elapsed()));

        let singles: Arc<[EventEnvelope]> = events(topic, STORE_SINGLES).into();
        raw_single.push(
            concurrently(&singles, |event| {
                let (channel, queue) = (channel.clone(), raw_log.clone());
                async move { raw_append(&channel, &queue, std::slice::from_ref(&event)).await }
            })
            .await?,
        );
        our_single.push(
            concurrently(&singles, |event| {
                let store = Arc::clone(&store);
                async move {
                    store
                        .append("single", ExpectedVersion::Any, vec![event])
                        .await
                        .map(drop)
                        .map_err(Into::into)
                }
            })
            .await?,
        );
        let batches: Vec<Vec<EventEnvelope>> = (0..STORE_BATCHES)
            .map(|_| events(topic, STORE_BATCH))
            .collect();
        let start = Instant::now();
        for batch in &batches {
            raw_append(&channel, &raw_log, batch).await?;
        }
        raw_batches.push(rate(STORE_BATCHES * STORE_BATCH, start.elapsed()));
        let start = Instant::now();
        for batch in batches {
            store.append("batch", ExpectedVersion::Any, batch).await?;
        }
        our_batches.push(rate(STORE_BATCHES * STORE_BATCH, start.elapsed()));
    }

    let rows = [
        ("publish persistent, 500 in flight", raw_batch, our_batch),
        (
            "publish persistent, each confirm awaited",
            raw_each,
            our_each,
        ),
        ("consume prefetch 500, ack each", raw_cons, our_cons),
        (
            "store append, single events, 64 in flight",
            raw_single,
            our_single,
        ),
        ("store append, batches of 100", raw_batches, our_batches),
    ];
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "work", "raw msg/s", "ours msg/s", "ours/raw"
    );
    for (what, raw, ours) in rows {
        let (raw, ours) = (median(raw), median(ours));
        println!("{what:<44} {raw:>12.0} {ours:>12.0} {:>8.2}", ours / raw);
    }

    channel
        .queue_delete(raw_q.as_str().into(), QueueDeleteOptions::default())
        .await?;
    channel
        .queue_delete(raw_log.as_str().into(), QueueDeleteOptions::default())
        .await?;
    store.delete_log().await?;
    store.close().await;
    transport.delete_topology().await?;
    transport.close().await;
    connection.close(200, "bench done".into()).await?;
    Ok(())
}

/// Runs `append` on every event, [`STORE_WRITERS`] tasks at once; events/s.
async fn concurrently<F, Fut>(events: &Arc<[EventEnvelope]>, append: F) -> BenchResult<f64>
where
    F: Fn(EventEnvelope) -> Fut,
    Fut: std::future::Future<Output = BenchResult<()>> + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(STORE_WRITERS);
    for task in 0..STORE_WRITERS {
        let mine: Vec<Fut> = (task..events.len())
            .step_by(STORE_WRITERS)
            .map(|i| append(events[i].clone()))
            .collect();
        tasks.push(tokio::spawn(async move {
            for one in mine {
                one.await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(rate(events.len(), start.elapsed()))
}

/// Raw: the messages `RabbitMqEventStore::append` publishes for `events` into the stream
/// queue `queue` (CloudEvents JSON with the stream id, the store's properties and stream and
/// write-id headers), then every confirm awaited.
async fn raw_append(channel: &Channel, queue: &str, events: &[EventEnvelope]) -> BenchResult<()> {
    let mut confirms = Vec::with_capacity(events.len());
    for event in events {
        let event = event.clone().with_stream_id("raw");
        let body = cloudevents::encode(&event)?;
        let mut headers = FieldTable::default();
        headers.insert(
            "x-orchestrator-stream-id".into(),
            lapin::types::AMQPValue::LongString("raw".into()),
        );
        headers.insert(
            "x-orchestrator-write-id".into(),
            lapin::types::AMQPValue::LongString(uuid::Uuid::now_v7().simple().to_string().into()),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_delivery_mode(2)
            .with_message_id(event.id().as_str().into())
            .with_type(event.event_type().into())
            .with_headers(headers);
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        if !confirm.await?.is_ack() {
            return Err("nacked".into());
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("benchmark failed: {error}");
        std::process::exit(1);
    }
}
