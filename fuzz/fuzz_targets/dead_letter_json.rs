//! The dead-letter JSON decoder shared by the durable dead-letter queues
//! (`DeadLetter::from_json`; the Redis dead-letter queue stores letters in it).
//!
//! Bad input must be an error, never a panic; what decodes must encode, and decode again
//! to the same letter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrator_core::DeadLetter;

fuzz_target!(|data: &[u8]| {
    let Ok(letter) = DeadLetter::from_json(data) else {
        return;
    };
    let json = letter
        .to_json()
        .unwrap_or_else(|error| panic!("a decoded letter does not encode: {error}"));
    let again = DeadLetter::from_json(&json).expect("an encoded letter decodes");
    assert_eq!(
        again,
        letter,
        "round trip of {}",
        String::from_utf8_lossy(&json)
    );
});
