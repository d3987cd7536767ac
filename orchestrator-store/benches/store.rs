//! Benchmarks of the embedded store against the raw primitives doing the same work, in the
//! same run:
//!
//! - `append/*`: 100 events of a 200-byte JSON payload per iteration, made durable with one
//!   sync — one writer appending a batch of 100, one task keeping 100 single-event appends
//!   in flight (group commit), and the raw loop: `write` of each of the same 100 frames, then
//!   `sync_data`.
//! - `replay/*`: 100 000 stored events read back and decoded — through `Replay` (paged
//!   `read_all`: index, positioned reads, both checksums, decode), and the raw loop: read the
//!   segment file sequentially and decode each record with the same codec; and the codec
//!   alone on records already in memory, the bound of both.
//!
//! Run with `cargo bench -p orchestrator-store -- --warm-up-time 1 --measurement-time 3`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use orchestrator_core::codec::{Bincode, Codec};
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, StoredPosition};
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use orchestrator_store::replay::Replay;

const BATCH: usize = 100;
const REPLAY_EVENTS: usize = 100_000;

fn payload() -> serde_json::Value {
    // About 200 bytes of JSON.
    serde_json::json!({
        "order_id": "order-0000000001",
        "customer_id": "customer-000000042",
        "amount_cents": 123456,
        "currency": "EUR",
        "items": ["sku-000001", "sku-000002", "sku-000003"],
        "note": "leave at the door, ring twice, thank you",
    })
}

fn events(n: usize) -> Vec<EventEnvelope> {
    let data = payload();
    (0..n)
        .map(|_| EventEnvelope::new("bench.order-placed", &data).unwrap())
        .collect()
}

/// The frames the store writes for `events` appended to `stream` (see `file/format.rs`):
/// length, body CRC, header CRC, flags, Bincode envelope.
fn frames(events: &[EventEnvelope], stream: &str) -> Vec<Vec<u8>> {
    events
        .iter()
        .zip(1..)
        .map(|(e, i)| {
            let stored = e.clone().with_position(
                stream,
                StoredPosition {
                    stream_version: i,
                    global_position: i,
                },
            );
            let mut body = vec![u8::from(i as usize == events.len())];
            body.extend(Bincode.encode(&stored).unwrap());
            let mut frame = Vec::with_capacity(body.len() + 12);
            frame.extend((body.len() as u32).to_le_bytes());
            frame.extend(crc32fast::hash(&body).to_le_bytes());
            let header_crc = crc32fast::hash(&frame[..8]);
            frame.extend(header_crc.to_le_bytes());
            frame.extend(body);
            frame
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);

    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path().join("batch")).unwrap();
    group.bench_function("store_batch_of_100", |b| {
        b.iter_batched(
            || events(BATCH),
            |batch| {
                runtime
                    .block_on(store.append("bench", ExpectedVersion::Any, batch))
                    .unwrap()
            },
            BatchSize::SmallInput,
        );
    });

    let store = FileEventStore::open(dir.path().join("in-flight")).unwrap();
    group.bench_function("store_100_appends_in_flight", |b| {
        b.iter_batched(
            || events(BATCH),
            |batch| {
                runtime.block_on(futures::future::try_join_all(
                    batch.into_iter().enumerate().map(|(i, e)| {
                        let stream = format!("bench-{}", i % 10);
                        let store = &store;
                        async move { store.append(&stream, ExpectedVersion::Any, vec![e]).await }
                    }),
                ))
            },
            BatchSize::SmallInput,
        );
    });
    println!("group commit with 100 in flight: {:?}", store.stats());

    let frames = frames(&events(BATCH), "bench");
    let mut raw = std::fs::File::create(dir.path().join("raw.log")).unwrap();
    group.bench_function("raw_write_each_then_sync_data", |b| {
        b.iter(|| {
            for frame in &frames {
                raw.write_all(frame).unwrap();
            }
            raw.sync_data().unwrap();
        });
    });
    group.finish();
}

fn segment_of(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap()
}

fn replay(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions::default().fsync(FsyncPolicy::Never);
    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    runtime.block_on(async {
        for chunk in 0..REPLAY_EVENTS / 1000 {
            let stream = format!("order-{}", chunk % 50);
            store
                .append(&stream, ExpectedVersion::Any, events(1000))
                .await
                .unwrap();
        }
        store.sync().await.unwrap();
    });
    let segment = segment_of(dir.path());

    let mut group = c.benchmark_group("replay");
    group.throughput(Throughput::Elements(REPLAY_EVENTS as u64));
    group.sample_size(10);
    group.bench_function("store_replay_read_all_decode", |b| {
        b.iter(|| {
            let count = runtime
                .block_on(Replay::all().to_sink(&store, |e| {
                    black_box(e);
                    async { Ok(()) }
                }))
                .unwrap();
            assert_eq!(count, REPLAY_EVENTS as u64);
        });
    });
    group.bench_function("raw_sequential_read_decode", |b| {
        b.iter(|| {
            let data = std::fs::read(&segment).unwrap();
            let mut at = 16;
            let mut count = 0;
            while at < data.len() {
                let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                let body = &data[at + 12..at + 12 + len];
                black_box(Bincode.decode(&body[1..]).unwrap());
                at += 12 + len;
                count += 1;
            }
            assert_eq!(count, REPLAY_EVENTS);
        });
    });
    // The codec alone, on records already in memory: the bound of any replay here.
    let records: Vec<Vec<u8>> = frames(&events(1000), "order-1")
        .into_iter()
        .map(|frame| frame[13..].to_vec())
        .collect();
    group.bench_function("codec_decode_only", |b| {
        b.iter(|| {
            for _ in 0..REPLAY_EVENTS / records.len() {
                for record in &records {
                    black_box(Bincode.decode(record).unwrap());
                }
            }
        });
    });
    group.finish();
    drop(store);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = append, replay
}
criterion_main!(benches);
