//! The CloudEvents JSON decoder — the entry parser of every backend: a Kafka record's value,
//! a RabbitMQ message body and a Redis entry's `event` field all go through it.
//!
//! Bad input must be an error, never a panic; what decodes must encode, and decode again
//! to the same envelope; and no input may take longer to decode than a time budget, so that
//! work growing faster than the input (issue 19: quadratic in the number of attributes) is
//! a finding, not only a crash.
//!
//! The budget of one decode is 100 ms, plus 100 ms for every 100 KiB of input (1.1 s for
//! 1 MiB, the largest input libFuzzer makes without `-max_len`); `CLOUDEVENTS_DECODE_BUDGET_MS`
//! replaces the 100 (both times) on a machine too slow for it. This build (ASan, coverage,
//! debug assertions) decodes 1 MiB in up to about 250 ms, 50 to 100 times slower than a
//! release build; the quadratic decoder took 0.3 s for 128 KiB of extension keys in release.
//! A small input over its budget means a stall of the machine or a decoder that grew
//! super-linear: run the artifact again alone to tell which.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use orchestrator_core::cloudevents;

/// The time decoding `len` bytes may take.
fn budget(len: usize) -> Duration {
    static BASE_MS: OnceLock<u64> = OnceLock::new();
    let base_ms = *BASE_MS.get_or_init(|| {
        std::env::var("CLOUDEVENTS_DECODE_BUDGET_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(100)
    });
    let base = Duration::from_millis(base_ms);
    base + base.mul_f64(len as f64 / (100.0 * 1024.0))
}

fuzz_target!(|data: &[u8]| {
    let started = Instant::now();
    let decoded = cloudevents::decode(data);
    let took = started.elapsed();
    let budget = budget(data.len());
    assert!(
        took <= budget,
        "decoding {} bytes took {took:?}, over the budget of {budget:?} \
         (CLOUDEVENTS_DECODE_BUDGET_MS)",
        data.len(),
    );
    let Ok(event) = decoded else {
        return;
    };
    let wire = cloudevents::encode(&event)
        .unwrap_or_else(|error| panic!("a decoded event does not encode: {error}"));
    let again = cloudevents::decode(&wire).expect("an encoded event decodes");
    assert_eq!(
        again,
        event,
        "round trip of {}",
        String::from_utf8_lossy(&wire)
    );
});
