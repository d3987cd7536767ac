//! The Kafka dead-letter queue's letter decoder (its own JSON layout, read back from the
//! dead-letter topic). Bad input must be an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = orchestrator_backends::kafka::fuzz_decode_letter(data);
});
