//! The bincode envelope decoder (the embedded store's record format).
//!
//! Bad input must be an error, never a panic nor a huge allocation; what decodes must
//! encode, and decode again to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrator_core::codec::{Bincode, Codec};

fuzz_target!(|data: &[u8]| {
    let Ok(event) = Bincode.decode(data) else {
        return;
    };
    let bytes = Bincode.encode(&event).expect("a decoded event encodes");
    let again = Bincode.decode(&bytes).expect("an encoded event decodes");
    assert_eq!(again, event);
});
