//! The CloudEvents JSON decoder — the entry parser of every backend: a Kafka record's value,
//! a RabbitMQ message body and a Redis entry's `event` field all go through it.
//!
//! Bad input must be an error, never a panic; what decodes must encode, and decode again
//! to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrator_core::cloudevents;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = cloudevents::decode(data) else {
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
