//! The Redis backend's stream-reply parsers: the input is a RESP reply as the server would
//! send it (parsed by redis-rs, as the connection does), then read as an `XREADGROUP`,
//! `XAUTOCLAIM` and `XRANGE` reply, each entry's `event` field decoded. A malformed or
//! hostile reply must be an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = redis::parse_redis_value(data) {
        let _ = orchestrator_backends::redis::fuzz_stream_reply(&reply);
    }
});
