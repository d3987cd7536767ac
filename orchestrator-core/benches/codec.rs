//! Encode/decode cost of the wire codec (CloudEvents JSON) and the bincode codec, for a
//! ~200-byte JSON payload, next to plain serde_json of the payload alone.
//!
//! `cargo bench -p orchestrator-core --bench codec`
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orchestrator_core::codec::{Bincode, Codec};
use orchestrator_core::{EventEnvelope, cloudevents};

fn payload() -> serde_json::Value {
    serde_json::json!({
        "order_id": "ORDER-0000000001",
        "customer": "customer-0000000042",
        "amount_cents": 9999,
        "currency": "EUR",
        "lines": [{"sku": "SKU-1", "qty": 1}, {"sku": "SKU-2", "qty": 3}],
        "note": "leave at the door, ring twice",
    })
}

fn bench(c: &mut Criterion) {
    let event = EventEnvelope::new("order.placed", &payload())
        .unwrap()
        .with_correlation_id("corr-1")
        .with_stream_id("order-1");
    let wire = cloudevents::encode(&event).unwrap();
    let compact = Bincode.encode(&event).unwrap();
    let raw_payload = serde_json::to_vec(&payload()).unwrap();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("cloudevents/encode", |b| {
        b.iter(|| cloudevents::encode(&event).unwrap())
    });
    g.bench_function("cloudevents/decode", |b| {
        b.iter(|| cloudevents::decode(&wire).unwrap())
    });
    g.bench_function("bincode/encode", |b| {
        b.iter(|| Bincode.encode(&event).unwrap())
    });
    g.bench_function("bincode/decode", |b| {
        b.iter(|| Bincode.decode(&compact).unwrap())
    });
    g.bench_function("serde_json_payload/decode_value", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(&raw_payload).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
