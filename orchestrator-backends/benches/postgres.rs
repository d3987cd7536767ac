//! PostgreSQL event store appends against raw tokio-postgres doing the same INSERTs, in the
//! same run.
//!
//! `cargo bench -p orchestrator-backends --features postgres --bench postgres`
//!
//! - single-event appends, 1 writer and 16 concurrent writers (a stream each, each append
//!   expecting the stream's exact version): raw `BEGIN; INSERT … VALUES (…); COMMIT`
//!   pipelined in one round trip on a connection per writer, against
//!   `PostgresEventStore::append` of 1 event (group commit: the 16 writers' appends share
//!   transactions);
//! - 100-event batches, 1 writer: raw `BEGIN; INSERT … SELECT FROM unnest(…); COMMIT`
//!   against `PostgresEventStore::append` of 100 events.
//! - reading 20,000 stored events back: raw pages of 1,000 with the library's `read_all`
//!   SELECT (the JSON taken as text, not decoded) against `PostgresEventStore::read_all` in
//!   pages of 1,000 and against a subscription from position 0 (its catch-up);
//! - the transport: publish one at a time against raw INSERTs of the queue row; consume
//!   (prefetch 100) acking each delivery before the next against raw claiming 100 and
//!   deleting each row; and consume with up to 100 acks in flight (each in a task; the
//!   library batches the deletes of acks that wait together) against raw claiming 100 and
//!   deleting them in one statement. Raw's consumer statements run autocommitted in a
//!   session with `synchronous_commit = off`, as the library's do.
//!
//! The raw table has the library's columns, indexes and version check — `UNIQUE (stream_id,
//! stream_version)`, the versions computed by the writer — with positions from an identity
//! column (not gap-safe: the library's global order costs its lock). The library's work that
//! raw skips: encoding each event to CloudEvents JSON (raw's is made before the clock
//! starts), checking ids and the expected version before writing, and the global order. Raw writes the same
//! bytes (the CloudEvents JSON of a 200-byte JSON payload); events are made before the clock
//! starts. Each group runs back to back, raw first in even rounds and last in odd ones, tables
//! emptied in between; the bench prints the median rate of each and the median of the
//! per-round ratios ours / raw, and each round's rates and ratios on stderr. `PG_BENCH_ROUNDS` overrides the number of rounds (5);
//! `PG_BENCH_ONLY=read,consume` runs only the groups named (single, many, batched, read,
//! publish, consume). Needs the PostgreSQL at `ORCHESTRATOR_POSTGRES_URL`; if it is
//! unreachable the bench says so and exits successfully — except under `CI=true`, where it
//! fails. It works in a schema of its own, dropped afterwards. `cargo xtask bench` runs it
//! and reads the table it prints (`xtask/src/bench/parse.rs`, `postgres_report`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use orchestrator_backends::postgres::{PostgresConfig, PostgresEventStore, PostgresTransport};
use orchestrator_core::{
    EventEnvelope, EventFilter, EventStore, ExpectedVersion, ReadAll, SubscribeOptions, Transport,
    cloudevents,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

const ROUNDS: usize = 5;
const WRITERS: usize = 16;
/// Appends by the single writer.
const SINGLE: usize = 400;
/// Appends by each of the 16 writers.
const PER_WRITER: usize = 100;
const BATCH: usize = 100;
const BATCHES: usize = 200;
const PUBLISHED: usize = 400;
const CONSUMED: usize = 5_000;
/// Events read back by `read_all` and a subscription.
const READ: usize = 20_000;
/// The page `read_all` and the raw read ask for.
const PAGE: usize = 1_000;
const TOPIC: &str = "bench.order";
const GROUP: &str = "bench";

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

/// Events made before the clock starts.
fn events(n: usize) -> Vec<EventEnvelope> {
    let payload = payload();
    (0..n)
        .map(|_| {
            EventEnvelope::from_bytes("bench.order", "application/json", payload.clone()).unwrap()
        })
        .collect()
}

/// An event as raw tokio-postgres writes it: the columns the library fills.
#[derive(Clone)]
struct Row {
    id: String,
    event_type: String,
    time: DateTime<Utc>,
    json: String,
}

fn rows(events: &[EventEnvelope], stream: &str) -> Vec<Row> {
    events
        .iter()
        .map(|e| Row {
            id: e.id().to_string(),
            event_type: e.event_type().to_owned(),
            time: e.time(),
            json: String::from_utf8(
                cloudevents::encode(&e.clone().with_stream_id(stream)).unwrap(),
            )
            .unwrap(),
        })
        .collect()
}

struct Bench {
    schema: String,
    store: PostgresEventStore,
    transport: PostgresTransport,
    raw: Vec<Client>,
    run: usize,
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

impl Bench {
    fn stream(&mut self, what: &str) -> String {
        self.run += 1;
        format!("{what}-{}", self.run)
    }

    fn insert_one(&self) -> String {
        format!(
            "INSERT INTO \"{}\".raw_events \
             (stream_id, stream_version, event_id, event_type, event_time, event) \
             VALUES ($1, $2, $3, $4, $5, $6::text::json)",
            self.schema
        )
    }

    async fn clean(&self) {
        self.raw[0]
            .batch_execute(&format!(
                "TRUNCATE \"{0}\".raw_events; TRUNCATE \"{0}\".events; \
                 TRUNCATE \"{0}\".raw_queue; TRUNCATE \"{0}\".transport_queue",
                self.schema
            ))
            .await
            .unwrap();
    }

    /// `writers` connections, each appending `per_writer` single events to a stream of its own.
    async fn raw_single(&mut self, writers: usize, per_writer: usize) -> f64 {
        let sql = self.insert_one();
        let mut work = Vec::new();
        let streams: Vec<String> = (0..writers).map(|_| self.stream("raw")).collect();
        for (w, stream) in streams.into_iter().enumerate() {
            let rows = rows(&events(per_writer), &stream);
            let client = &self.raw[w];
            let statement = client.prepare(&sql).await.unwrap();
            work.push((client, statement, stream, rows));
        }
        let started = Instant::now();
        let tasks = work
            .into_iter()
            .map(|(client, statement, stream, rows)| async move {
                for (i, row) in rows.iter().enumerate() {
                    let version = i as i64 + 1;
                    let params: [&(dyn ToSql + Sync); 6] = [
                        &stream,
                        &version,
                        &row.id,
                        &row.event_type,
                        &row.time,
                        &row.json,
                    ];
                    futures::try_join!(
                        client.batch_execute("BEGIN"),
                        client.execute(&statement, &params),
                        client.batch_execute("COMMIT"),
                    )
                    .unwrap();
                }
            });
        futures::future::join_all(tasks).await;
        rate(writers * per_writer, started)
    }

    async fn store_single(&mut self, writers: usize, per_writer: usize) -> f64 {
        let mut work = Vec::new();
        for _ in 0..writers {
            work.push((self.stream("ours"), events(per_writer)));
        }
        let started = Instant::now();
        let tasks = work.into_iter().map(|(stream, events)| {
            let store = self.store.clone();
            async move {
                for (i, event) in events.into_iter().enumerate() {
                    store
                        .append(&stream, ExpectedVersion::Exact(i as u64), vec![event])
                        .await
                        .unwrap();
                }
            }
        });
        futures::future::join_all(tasks).await;
        rate(writers * per_writer, started)
    }

    async fn raw_batched(&mut self) -> f64 {
        let sql = format!(
            "INSERT INTO \"{}\".raw_events \
             (stream_id, stream_version, event_id, event_type, event_time, event) \
             SELECT $1, $2 + u.n, u.id, u.ty, u.tm, u.ev::json \
             FROM unnest($3::text[], $4::text[], $5::timestamptz[], $6::text[]) \
             WITH ORDINALITY AS u(id, ty, tm, ev, n)",
            self.schema
        );
        let stream = self.stream("raw");
        let all = rows(&events(BATCH * BATCHES), &stream);
        let client = &self.raw[0];
        let statement = client.prepare(&sql).await.unwrap();
        let started = Instant::now();
        for (b, batch) in all.chunks(BATCH).enumerate() {
            let base = (b * BATCH) as i64;
            let ids: Vec<&str> = batch.iter().map(|r| r.id.as_str()).collect();
            let types: Vec<&str> = batch.iter().map(|r| r.event_type.as_str()).collect();
            let times: Vec<DateTime<Utc>> = batch.iter().map(|r| r.time).collect();
            let jsons: Vec<&str> = batch.iter().map(|r| r.json.as_str()).collect();
            let params: [&(dyn ToSql + Sync); 6] = [&stream, &base, &ids, &types, &times, &jsons];
            futures::try_join!(
                client.batch_execute("BEGIN"),
                client.execute(&statement, &params),
                client.batch_execute("COMMIT"),
            )
            .unwrap();
        }
        rate(BATCH * BATCHES, started)
    }

    async fn store_batched(&mut self) -> f64 {
        let stream = self.stream("ours");
        let mut all = events(BATCH * BATCHES).into_iter();
        let batches: Vec<Vec<EventEnvelope>> = (0..BATCHES)
            .map(|_| all.by_ref().take(BATCH).collect())
            .collect();
        let started = Instant::now();
        for (b, batch) in batches.into_iter().enumerate() {
            self.store
                .append(&stream, ExpectedVersion::Exact((b * BATCH) as u64), batch)
                .await
                .unwrap();
        }
        rate(BATCH * BATCHES, started)
    }

    /// `PUBLISHED` events, one publish each, to a topic one durable group subscribes to: a
    /// row each in the queue table.
    async fn publish(&mut self) -> f64 {
        let events = events(PUBLISHED);
        let started = Instant::now();
        for event in events {
            self.transport.publish(TOPIC, event).await.unwrap();
        }
        rate(PUBLISHED, started)
    }

    /// Raw: the same rows, one autocommitted INSERT each.
    async fn raw_publish(&mut self) -> f64 {
        let rows = rows(&events(PUBLISHED), "");
        let client = &self.raw[0];
        let statement = client
            .prepare(&format!(
                "INSERT INTO \"{}\".raw_queue (group_name, topic, event) VALUES ($1, $2, $3)",
                self.schema
            ))
            .await
            .unwrap();
        let started = Instant::now();
        for row in &rows {
            client
                .execute(&statement, &[&GROUP, &TOPIC, &row.json])
                .await
                .unwrap();
        }
        rate(PUBLISHED, started)
    }

    /// `CONSUMED` events queued, then received through a subscription (prefetch 100) and
    /// acked: one by one, each awaited before the next delivery (`concurrent` false), or
    /// each in a task of its own, up to 100 at a time (the library batches the deletes of
    /// acks that wait together).
    async fn consume(&mut self, concurrent: bool) -> f64 {
        let mut all = events(CONSUMED).into_iter();
        for _ in 0..CONSUMED / BATCH {
            let batch: Vec<EventEnvelope> = all.by_ref().take(BATCH).collect();
            self.transport.publish_batch(TOPIC, batch).await.unwrap();
        }
        let options = SubscribeOptions::new(GROUP, TOPIC).unwrap().prefetch(BATCH);
        let started = Instant::now();
        let mut sub = self.transport.subscribe(options).await.unwrap();
        let mut acks = tokio::task::JoinSet::<orchestrator_core::Result<()>>::new();
        for _ in 0..CONSUMED {
            let delivery = sub.next().await.unwrap().unwrap();
            if concurrent {
                while acks.len() >= BATCH {
                    acks.join_next().await.unwrap().unwrap().unwrap();
                }
                acks.spawn(delivery.ack());
            } else {
                delivery.ack().await.unwrap();
            }
        }
        while let Some(acked) = acks.join_next().await {
            acked.unwrap().unwrap();
        }
        rate(CONSUMED, started)
    }

    /// Raw: the same rows claimed 100 at a time with the library's claim (`FOR UPDATE SKIP
    /// LOCKED`, `locked_until`), each deleted on its own (`batched` false) or the 100 in one
    /// `DELETE … WHERE id = ANY($1)`, each statement autocommitted in a session with the
    /// library's commit setting for a consumer's statements (`synchronous_commit = off`); no
    /// decoding.
    async fn raw_consume(&mut self, batched: bool) -> f64 {
        let rows = rows(&events(CONSUMED), "");
        let client = &self.raw[0];
        let q = format!("\"{}\".raw_queue", self.schema);
        for chunk in rows.chunks(BATCH) {
            let jsons: Vec<&str> = chunk.iter().map(|r| r.json.as_str()).collect();
            client
                .execute(
                    &format!(
                        "INSERT INTO {q} (group_name, topic, event) \
                         SELECT $1, $2, u FROM unnest($3::text[]) u"
                    ),
                    &[&GROUP, &TOPIC, &jsons],
                )
                .await
                .unwrap();
        }
        let claim = client
            .prepare(&format!(
                "WITH c AS (SELECT id FROM {q} WHERE group_name = $1 AND not_before <= now() \
                   AND (locked_until IS NULL OR locked_until <= now()) \
                   ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE {q} t SET locked_until = now() + interval '30 seconds' \
                 FROM c WHERE t.id = c.id RETURNING t.id, t.event"
            ))
            .await
            .unwrap();
        let delete = client
            .prepare(&format!("DELETE FROM {q} WHERE id = $1"))
            .await
            .unwrap();
        let delete_all = client
            .prepare(&format!("DELETE FROM {q} WHERE id = ANY($1)"))
            .await
            .unwrap();
        client
            .batch_execute("SET synchronous_commit TO off")
            .await
            .unwrap();
        let limit = BATCH as i64;
        let started = Instant::now();
        let mut done = 0;
        while done < CONSUMED {
            let params: [&(dyn ToSql + Sync); 2] = [&GROUP, &limit];
            let claimed = client.query(&claim, &params).await.unwrap();
            if batched {
                let ids: Vec<i64> = claimed.iter().map(|row| row.get(0)).collect();
                client.execute(&delete_all, &[&ids]).await.unwrap();
                done += ids.len();
                continue;
            }
            for row in &claimed {
                let id: i64 = row.get(0);
                let _event: &str = row.get(1);
                client.execute(&delete, &[&id]).await.unwrap();
                done += 1;
            }
        }
        let rate = rate(CONSUMED, started);
        client
            .batch_execute("RESET synchronous_commit")
            .await
            .unwrap();
        rate
    }

    /// `READ` events in the store, written before the clock starts (200 to an append).
    async fn fill_store(&mut self) {
        let stream = self.stream("read");
        let mut all = events(READ).into_iter();
        for b in 0..READ / 200 {
            let batch: Vec<EventEnvelope> = all.by_ref().take(200).collect();
            self.store
                .append(&stream, ExpectedVersion::Exact((b * 200) as u64), batch)
                .await
                .unwrap();
        }
    }

    /// Raw: the store's `events` table read from the start in pages of 1,000 with the
    /// library's statement (`SELECT position, event::text … WHERE position >= $1 … ORDER BY
    /// position LIMIT 1000`), the JSON taken as text and not decoded.
    async fn raw_read_all(&mut self) -> f64 {
        let client = &self.raw[0];
        let statement = client
            .prepare(&format!(
                "SELECT position, event::text FROM \"{}\".events WHERE position >= $1 \
                 AND ($2::text[] IS NULL OR event_type = ANY($2)) \
                 AND ($3::timestamptz IS NULL OR event_time >= $3) \
                 AND ($4::timestamptz IS NULL OR event_time <= $4) \
                 AND ($5::text IS NULL OR starts_with(stream_id, $5)) \
                 ORDER BY position LIMIT $6",
                self.schema
            ))
            .await
            .unwrap();
        // No filter: every bound NULL, as the library sends it.
        let types: Option<Vec<String>> = None;
        let (after, before): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (None, None);
        let prefix: Option<String> = None;
        let page = PAGE as i64;
        let started = Instant::now();
        let (mut from, mut read) = (1i64, 0);
        loop {
            let params: [&(dyn ToSql + Sync); 6] = [&from, &types, &after, &before, &prefix, &page];
            let rows = client.query(&statement, &params).await.unwrap();
            for row in &rows {
                from = row.get::<_, i64>(0) + 1;
                let _event: &str = row.get(1);
            }
            read += rows.len();
            if rows.len() < PAGE {
                break;
            }
        }
        assert_eq!(read, READ);
        rate(READ, started)
    }

    /// `PostgresEventStore::read_all` from the start, 1,000 events a call.
    async fn store_read_all(&mut self) -> f64 {
        let started = Instant::now();
        let (mut from, mut read) = (1, 0);
        loop {
            let events = self
                .store
                .read_all(ReadAll::from(from, PAGE))
                .await
                .unwrap();
            read += events.len();
            match events.last() {
                Some(last) if events.len() == PAGE => from = last.global_position().unwrap() + 1,
                _ => break,
            }
        }
        assert_eq!(read, READ);
        rate(READ, started)
    }

    /// A subscription from the start of the store, until it has handed out every event (the
    /// catch-up: the library reads pages and decodes them as the raw read does its SELECTs).
    async fn store_subscribe(&mut self) -> f64 {
        let started = Instant::now();
        let mut events = self.store.subscribe(0, EventFilter::all()).await.unwrap();
        for _ in 0..READ {
            events.next().await.unwrap().unwrap();
        }
        rate(READ, started)
    }

    async fn drop_schema(&self) {
        self.store.drop_schema().await.unwrap();
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
    let url = orchestrator_core::testkit::services::postgres_url();
    let shown = orchestrator_core::redact::redact_url(&url);
    let raw = async {
        let mut raw = Vec::new();
        for _ in 0..WRITERS {
            raw.push(connect(&url).await?);
        }
        Ok::<_, tokio_postgres::Error>(raw)
    };
    let raw = match tokio::time::timeout(Duration::from_secs(3), raw).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return unreachable(&format!("PostgreSQL at {shown} is unreachable ({e})")),
        Err(_) => return unreachable(&format!("PostgreSQL at {shown} does not answer")),
    };
    let schema = format!("orch_bench_{}", uuid::Uuid::now_v7().simple());
    let config = PostgresConfig::new(&url)
        .unwrap()
        .with_schema(&schema)
        .unwrap()
        .with_pool_size(WRITERS + 2);
    let store = PostgresEventStore::connect(config.clone()).await.unwrap();
    let transport = PostgresTransport::connect(config).await.unwrap();
    // A durable group: every publish queues a row for it.
    drop(
        transport
            .subscribe(SubscribeOptions::new(GROUP, TOPIC).unwrap())
            .await
            .unwrap(),
    );
    raw[0]
        .batch_execute(&format!(
            "CREATE TABLE \"{schema}\".raw_events (
                 position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 stream_id      text        NOT NULL,
                 stream_version bigint      NOT NULL,
                 event_id       text        NOT NULL,
                 event_type     text        NOT NULL,
                 event_time     timestamptz NOT NULL,
                 recorded_at    timestamptz NOT NULL DEFAULT now(),
                 event          json        NOT NULL,
                 UNIQUE (stream_id, stream_version),
                 UNIQUE (stream_id, event_id)
             );
             CREATE INDEX ON \"{schema}\".raw_events (event_type, position);
             CREATE INDEX ON \"{schema}\".raw_events (event_time);
             CREATE TABLE \"{schema}\".raw_queue (LIKE \"{schema}\".transport_queue INCLUDING ALL);"
        ))
        .await
        .unwrap();
    let settings = raw[0]
        .query_one(
            "SELECT current_setting('synchronous_commit'), current_setting('server_version')",
            &[],
        )
        .await
        .unwrap();
    let rounds = std::env::var("PG_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    println!(
        "postgres bench: {shown}, PostgreSQL {}, synchronous_commit = {}, payload {} B of JSON \
         ({} B as a CloudEvent), {rounds} rounds, medians",
        settings.get::<_, String>(1),
        settings.get::<_, String>(0),
        payload().len(),
        cloudevents::encode(&events(1)[0]).unwrap().len()
    );
    let mut bench = Bench {
        schema,
        store,
        transport,
        raw,
        run: 0,
    };

    let mut groups = Groups::new();
    // `PG_BENCH_ONLY=consume,batched` runs only the groups named (single, many, batched,
    // read, publish, consume); all by default.
    let only = std::env::var("PG_BENCH_ONLY").unwrap_or_default();
    let runs = |group: &str| only.is_empty() || only.split(',').any(|g| g.trim() == group);
    for round in 0..rounds {
        let reverse = round % 2 == 1;
        for i in order(2, reverse).into_iter().filter(|_| runs("single")) {
            let rate = match i {
                0 => bench.raw_single(1, SINGLE).await,
                _ => bench.store_single(1, SINGLE).await,
            };
            groups.one.samples[i].push(rate);
            bench.clean().await;
        }
        for i in order(2, reverse).into_iter().filter(|_| runs("many")) {
            let rate = match i {
                0 => bench.raw_single(WRITERS, PER_WRITER).await,
                _ => bench.store_single(WRITERS, PER_WRITER).await,
            };
            groups.many.samples[i].push(rate);
            bench.clean().await;
        }
        for i in order(2, reverse).into_iter().filter(|_| runs("batched")) {
            let rate = match i {
                0 => bench.raw_batched().await,
                _ => bench.store_batched().await,
            };
            groups.batched.samples[i].push(rate);
            bench.clean().await;
        }
        if runs("read") {
            bench.fill_store().await;
            for i in order(3, reverse) {
                let rate = match i {
                    0 => bench.raw_read_all().await,
                    1 => bench.store_read_all().await,
                    _ => bench.store_subscribe().await,
                };
                match i {
                    0 => {
                        groups.read_all.samples[0].push(rate);
                        groups.subscription.samples[0].push(rate);
                    }
                    1 => groups.read_all.samples[1].push(rate),
                    _ => groups.subscription.samples[1].push(rate),
                }
            }
            bench.clean().await;
        }
        for i in order(2, reverse).into_iter().filter(|_| runs("publish")) {
            let rate = match i {
                0 => bench.raw_publish().await,
                _ => bench.publish().await,
            };
            groups.publish.samples[i].push(rate);
            bench.clean().await;
        }
        for i in order(2, reverse).into_iter().filter(|_| runs("consume")) {
            let rate = match i {
                0 => bench.raw_consume(false).await,
                _ => bench.consume(false).await,
            };
            groups.consume.samples[i].push(rate);
            bench.clean().await;
        }
        for i in order(2, reverse).into_iter().filter(|_| runs("consume")) {
            let rate = match i {
                0 => bench.raw_consume(true).await,
                _ => bench.consume(true).await,
            };
            groups.consume_batched.samples[i].push(rate);
            bench.clean().await;
        }
        eprintln!("round {}/{rounds} done", round + 1);
        for group in groups.in_order() {
            group.print_round(round);
        }
    }
    bench.drop_schema().await;
    println!(
        "{:<42} {:>14} {:>16}",
        "", "median events/s", "ours/raw median"
    );
    for group in groups.in_order() {
        group.print();
    }
    println!(
        "(ours/raw is the median of the per-round ratios to the first line of each group; target >= 0.8)"
    );
}

/// No PostgreSQL: skipped with the reason, or under `CI=true` (where a skip would pass
/// silently) a failure.
fn unreachable(why: &str) {
    if orchestrator_core::testkit::services::is_ci() {
        panic!("CI=true: postgres bench: {why}");
    }
    println!("postgres bench skipped: {why}");
}

fn order(n: usize, reverse: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if reverse {
        order.reverse();
    }
    order
}

/// Every group of measurements.
struct Groups {
    one: Group,
    many: Group,
    batched: Group,
    read_all: Group,
    subscription: Group,
    publish: Group,
    consume: Group,
    consume_batched: Group,
}

impl Groups {
    fn new() -> Self {
        Self {
            one: Group::new(&[
                "raw INSERT, 1 writer",
                "PostgresEventStore::append, 1 writer",
            ]),
            many: Group::new(&[
                "raw INSERT, 16 writers",
                "PostgresEventStore::append, 16 writers",
            ]),
            batched: Group::new(&[
                "raw INSERT unnest 100, 1 writer",
                "PostgresEventStore::append, 100 events",
            ]),
            read_all: Group::new(&[
                "raw SELECT pages of 1000, no decoding",
                "PostgresEventStore::read_all, pages of 1000",
            ]),
            subscription: Group::new(&[
                "raw SELECT pages of 1000, no decoding",
                "PostgresEventStore::subscribe, catch-up",
            ]),
            publish: Group::new(&[
                "raw INSERT queue row, 1 publisher",
                "PostgresTransport::publish",
            ]),
            consume: Group::new(&[
                "raw claim 100 + DELETE each",
                "PostgresTransport consume + ack each",
            ]),
            consume_batched: Group::new(&[
                "raw claim 100 + DELETE the 100",
                "PostgresTransport consume, 100 acks in flight",
            ]),
        }
    }

    /// In the order they are printed.
    fn in_order(&self) -> [&Group; 8] {
        [
            &self.one,
            &self.many,
            &self.batched,
            &self.read_all,
            &self.subscription,
            &self.publish,
            &self.consume,
            &self.consume_batched,
        ]
    }
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

    /// This round's rates and ratios, on stderr (the spread behind the medians).
    fn print_round(&self, round: usize) {
        let Some(raw) = self.samples[0].get(round) else {
            return;
        };
        let mut line = format!("  {}  {raw:.0}", self.names[0]);
        for (name, samples) in self.names.iter().zip(&self.samples).skip(1) {
            if let Some(ours) = samples.get(round) {
                line.push_str(&format!("  |  {name}  {ours:.0}  {:.2}x", ours / raw));
            }
        }
        eprintln!("{line}");
    }

    fn print(&self) {
        if self.samples.iter().any(Vec::is_empty) {
            return;
        }
        for (i, name) in self.names.iter().enumerate() {
            let rate = median(self.samples[i].clone());
            if i == 0 {
                println!("{name:<42} {rate:>14.0}");
            } else {
                let ratios = self.samples[i]
                    .iter()
                    .zip(&self.samples[0])
                    .map(|(ours, raw)| ours / raw)
                    .collect();
                println!("{name:<42} {rate:>14.0} {:>16.2}", median(ratios));
            }
        }
    }
}
