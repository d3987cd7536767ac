//! The embedded store's record reader: recovery of a store folder holding fuzzed segment
//! files, then reads, an append and a reopen.
//!
//! Frames carry two CRC-32s, which random bytes almost never match; so besides raw
//! segments (first byte even) the input can describe frames whose checksums the harness
//! computes (first byte odd): `[flags][len: u16 LE][body; len]…`, any bytes that do not
//! make a whole frame written as a torn tail. That way the bodies reach the bincode
//! decoder and the recovery's checks of positions, versions and append boundaries.
//! With bit 2 of the first byte set, a frame whose flags have bit 7 set ends segment 1 and
//! the rest goes to segment 2.
//!
//! Whatever the bytes, opening must fail with an error or recover; a recovered store must
//! read without panicking, take an append, and reopen with that append in it.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, ReadAll};
use orchestrator_store::file::FileEventStore;

const HEADER: [u8; 16] = *b"ORCHSEG\0\x01\0\0\0\0\0\0\0";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fn frame(out: &mut Vec<u8>, flags: u8, envelope: &[u8]) {
    let mut body = Vec::with_capacity(envelope.len() + 1);
    body.push(flags);
    body.extend_from_slice(envelope);
    let mut header = [0_u8; 12];
    header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let header_crc = crc32fast::hash(&header[..8]);
    header[8..].copy_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
}

/// The segment files the input describes.
fn segments(data: &[u8]) -> Vec<Vec<u8>> {
    let Some((&mode, rest)) = data.split_first() else {
        return vec![];
    };
    if mode & 1 == 0 {
        let mut segment = Vec::new();
        if mode & 2 != 0 {
            segment.extend_from_slice(&HEADER);
        }
        segment.extend_from_slice(rest);
        return vec![segment];
    }
    let split = mode & 4 != 0;
    let mut segments = vec![HEADER.to_vec()];
    let mut at = rest;
    while let [flags, lo, hi, tail @ ..] = at {
        let len = usize::from(u16::from_le_bytes([*lo, *hi]));
        let Some(body) = tail.get(..len) else {
            break;
        };
        let current = segments.last_mut().expect("one segment at least");
        frame(current, flags & 0x7f, body);
        if split && flags & 0x80 != 0 && segments.len() == 1 {
            segments.push(HEADER.to_vec());
        }
        at = &tail[len..];
    }
    // What is left does not make a whole frame: a torn tail.
    segments
        .last_mut()
        .expect("one segment at least")
        .extend_from_slice(at);
    segments
}

async fn exercise(dir: &Path) {
    let Ok(store) = FileEventStore::open(dir) else {
        return;
    };
    let head = store
        .head_position()
        .await
        .expect("head of a recovered store");
    let events = store
        .read_all(ReadAll::from(0, 10_000))
        .await
        .expect("read_all of a recovered store");
    for event in events.iter().take(20) {
        if let Some(stream) = event.stream_id() {
            let _ = store.read_stream(stream, 1, 100).await;
            let _ = store.stream_version(stream).await;
        }
    }
    let event = EventEnvelope::new("fuzz.appended", &serde_json_value()).expect("an event");
    let written = store
        .append(
            "fuzz-after-recovery",
            ExpectedVersion::Any,
            vec![event.clone()],
        )
        .await
        .expect("an append to a recovered store");
    assert_eq!(written.first_position, head + 1);
    drop(store);
    let reopened = FileEventStore::open(dir).expect("a store reopens after its own append");
    let stored = reopened
        .read_stream("fuzz-after-recovery", 1, 10)
        .await
        .expect("read back");
    assert_eq!(stored.last().map(EventEnvelope::id), Some(event.id()));
}

fn serde_json_value() -> std::collections::BTreeMap<&'static str, u32> {
    [("n", 1)].into_iter().collect()
}

fuzz_target!(|data: &[u8]| {
    let segments = segments(data);
    if segments.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary folder");
    for (i, segment) in segments.iter().enumerate() {
        let name = format!("segment-{:010}.log", i + 1);
        std::fs::write(dir.path().join(name), segment).expect("a segment written");
    }
    runtime().block_on(exercise(dir.path()));
});
