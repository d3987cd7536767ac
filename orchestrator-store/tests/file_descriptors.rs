//! A store of thousands of segments under a low file-descriptor limit: segments are opened
//! when read, through a bounded cache, so neither writing, reopening nor reading runs out of
//! descriptors (before, every segment kept one open and `open` failed with `EMFILE`).
//!
//! The limit is lowered for a child process only (`sh -c 'ulimit -n 256; exec …'` re-running
//! this test binary), so other tests are not affected.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use futures::StreamExt;
use orchestrator_core::ExpectedVersion::Any;
use orchestrator_core::{EventEnvelope, EventFilter, EventStore, ReadAll};
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use serde_json::json;

/// Set in the child that runs under the lowered limit.
const CHILD: &str = "ORCHESTRATOR_TEST_FD_CHILD";
const LIMIT: u64 = 256;
const SEGMENTS: u64 = 2_000;

#[test]
fn two_thousand_segments_open_and_read_under_a_limit_of_256_descriptors() {
    if std::env::var_os(CHILD).is_some() {
        return in_child();
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\""))
        .arg(exe)
        .args([
            "--exact",
            "two_thousand_segments_open_and_read_under_a_limit_of_256_descriptors",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test:\n{stdout}"
    );
}

fn in_child() {
    // The limit really is in effect (Linux says so in /proc).
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        assert!(line.contains(&format!(" {LIMIT} ")), "{line}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(write_reopen_and_read());
}

async fn write_reopen_and_read() {
    // tmpfs when there is one: the test is about descriptors, not syncs.
    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    // Each event is larger than half a segment, so each append takes a segment of its own.
    let options = FileStoreOptions::default()
        .fsync(FsyncPolicy::Never)
        .max_segment_bytes(4096);
    let pad = "x".repeat(2500);
    {
        let store = FileEventStore::open_with(dir.path(), options.clone()).unwrap();
        for n in 0..SEGMENTS {
            let event = EventEnvelope::new("test.big", &json!({ "n": n, "pad": pad })).unwrap();
            store
                .append(&format!("s-{}", n % 10), Any, vec![event])
                .await
                .unwrap();
        }
        // Read while writing too: every segment once.
        assert_eq!(read_all(&store).await, SEGMENTS);
    }
    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    assert_eq!(store.recovery_report().events, SEGMENTS);
    assert!(store.recovery_report().segments as u64 >= SEGMENTS);
    assert_eq!(read_all(&store).await, SEGMENTS);
    assert_eq!(
        store.read_stream("s-3", 1, usize::MAX).await.unwrap().len() as u64,
        SEGMENTS / 10
    );
    // Concurrent readers: two subscriptions and a read, each across every segment.
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut sub = store.subscribe(1, EventFilter::all()).await.unwrap();
                let mut seen = 0;
                while seen < SEGMENTS {
                    let event = sub.next().await.unwrap().unwrap();
                    seen += 1;
                    assert_eq!(event.global_position(), Some(seen));
                }
                seen
            })
        })
        .collect();
    assert_eq!(read_all(&store).await, SEGMENTS);
    for reader in readers {
        assert_eq!(reader.await.unwrap(), SEGMENTS);
    }
    let reader = FileEventStore::open_read_only(dir.path()).unwrap();
    assert_eq!(read_all(&reader).await, SEGMENTS);
}

async fn read_all(store: &FileEventStore) -> u64 {
    let events = store.read_all(ReadAll::from(1, usize::MAX)).await.unwrap();
    for (event, n) in events.iter().zip(0..) {
        assert_eq!(event.data::<serde_json::Value>().unwrap()["n"], json!(n));
    }
    events.len() as u64
}
