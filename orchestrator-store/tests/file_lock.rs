//! The embedded store's directory lock (one writer at a time, across processes) and its
//! read-only mode beside a live writer.
//!
//! The test with a second process runs this test binary again, with `LOCK_HOLDER_DIR_ENV`
//! set, filtered to that one test: the child opens the store, says so, and waits to be
//! killed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use futures::StreamExt;
use orchestrator_core::ExpectedVersion::Any;
use orchestrator_core::{EventEnvelope, EventFilter, EventStore, ReadAll};
use orchestrator_store::Error;
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use serde_json::json;
use tokio::sync::Semaphore;

const LOCK_HOLDER_DIR_ENV: &str = "ORCHESTRATOR_STORE_LOCK_HOLDER_DIR";

fn event(append: u64, of: u64, i: u64) -> EventEnvelope {
    // Every seventh append is large, so that its write spans many pages and a reader can
    // catch it half-done.
    let pad = if append.is_multiple_of(7) {
        48 * 1024
    } else {
        120
    };
    let data = json!({ "append": append, "of": of, "i": i, "pad": "x".repeat(pad) });
    EventEnvelope::new("test.happened", &data).unwrap()
}

fn batch(append: u64, count: u64) -> Vec<EventEnvelope> {
    (0..count).map(|i| event(append, count, i)).collect()
}

/// Every file of a directory, by name, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// The body length in the header of the frame at `at`.
fn frame_body_len(data: &[u8], at: usize) -> usize {
    u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize
}

/// The pid on the first line of the directory's lock file.
fn recorded_pid(dir: &Path) -> u32 {
    let text = std::fs::read_to_string(dir.join("LOCK")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

async fn all(store: &FileEventStore) -> Vec<EventEnvelope> {
    store.read_all(ReadAll::from(0, usize::MAX)).await.unwrap()
}

/// Checks that `events` (a whole store, in order) is a consistent prefix of what
/// `writer` appends: gapless positions, gapless versions per stream, whole appends, and
/// that the store's other reads agree. Returns the number of events.
async fn check_prefix(store: &FileEventStore, events: &[EventEnvelope]) -> u64 {
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut open_append: Option<(u64, u64, u64)> = None;
    for (n, e) in (1..).zip(events) {
        assert_eq!(e.global_position(), Some(n), "positions have a gap");
        let stream = e.stream_id().unwrap().to_owned();
        let version = versions.entry(stream.clone()).or_default();
        *version += 1;
        assert_eq!(
            e.stream_version(),
            Some(*version),
            "stream {stream} has a gap"
        );
        let data: serde_json::Value = e.data().unwrap();
        let (append, of, i) = (
            data["append"].as_u64().unwrap(),
            data["of"].as_u64().unwrap(),
            data["i"].as_u64().unwrap(),
        );
        match open_append {
            Some((a, o, last)) => assert_eq!((append, of, i), (a, o, last + 1)),
            None => assert_eq!(i, 0, "an append starts in the middle"),
        }
        open_append = (i + 1 < of).then_some((append, of, i));
    }
    assert_eq!(open_append, None, "the last append is not whole");
    let head = events.len() as u64;
    assert_eq!(store.head_position().await.unwrap(), head);
    for (stream, version) in &versions {
        assert_eq!(store.stream_version(stream).await.unwrap(), Some(*version));
        let stream_events = store.read_stream(stream, 1, usize::MAX).await.unwrap();
        assert_eq!(stream_events.len() as u64, *version);
    }
    let mut subscription = store.subscribe(0, EventFilter::all()).await.unwrap();
    for expected in events {
        let got = subscription.next().await.unwrap().unwrap();
        assert_eq!(got.id(), expected.id());
    }
    head
}

#[tokio::test]
async fn a_second_open_in_this_process_is_locked_and_names_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    store.append("a", Any, batch(1, 2)).await.unwrap();
    assert_eq!(recorded_pid(dir.path()), std::process::id());

    let error = FileEventStore::open(dir.path()).unwrap_err();
    match &error {
        Error::Locked { dir: locked, pid } => {
            assert_eq!(locked, dir.path());
            assert_eq!(*pid, Some(std::process::id()));
        }
        other => panic!("expected Error::Locked, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains(&std::process::id().to_string()),
        "{message}"
    );
    assert!(
        message.contains("already open in this process"),
        "{message}"
    );
    // Through the core error, the typed variant is still there, and retrying is no help.
    let core = orchestrator_core::Error::from(error);
    assert!(!core.is_temporary());
    assert!(matches!(
        Error::from_core(&core),
        Some(Error::Locked { .. })
    ));
    // A clone is the same store, not a second opener; a reader needs no lock.
    let clone = store.clone();
    clone.append("a", Any, batch(2, 1)).await.unwrap();
    let reader = FileEventStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.head_position().await.unwrap(), 3);

    drop((store, clone));
    // The reader does not hold the lock either: the writer reopens while it lives.
    let reopened = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(reopened.head_position().await.unwrap(), 3);
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_process_is_locked_out_until_the_holder_is_killed() {
    if let Ok(dir) = std::env::var(LOCK_HOLDER_DIR_ENV) {
        return hold_the_lock(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_second_process_is_locked_out_until_the_holder_is_killed",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LOCK_HOLDER_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let child_pid = child.0.id();

    // Wait (at most a minute, for a loaded machine) for the child to hold the store.
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child never said it holds the store");
        // libtest prints the test's name before it, on the same line.
        if line.ends_with(&format!("holding {child_pid}")) {
            break;
        }
    }

    match FileEventStore::open(dir.path()) {
        Err(Error::Locked { pid, .. }) => assert_eq!(pid, Some(child_pid)),
        other => panic!("expected Error::Locked by {child_pid}, got {other:?}"),
    }
    let message = FileEventStore::open(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains(&format!("locked by process {child_pid}")),
        "{message}"
    );
    assert!(message.contains("open_read_only"), "{message}");
    // Reading beside the holder works.
    let reader = FileEventStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.recovery_report().events, 1);
    drop(reader);

    // SIGKILL: no destructor runs, the LOCK file stays with the dead pid in it, and yet
    // the operating system has released the lock.
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert!(!status.success());
    assert_eq!(recorded_pid(dir.path()), child_pid);
    let store = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(store.recovery_report().events, 1);
    assert_eq!(recorded_pid(dir.path()), std::process::id());
}

/// The child: opens the store, appends one event, says so, and waits to be killed.
fn hold_the_lock(dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = FileEventStore::open(dir).unwrap();
    runtime
        .block_on(store.append("held", Any, batch(1, 1)))
        .unwrap();
    println!("holding {}", std::process::id());
    loop {
        std::thread::park();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_beside_a_live_writer_reads_a_consistent_prefix() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so that the reader meets segments being sealed and created too.
    let options = FileStoreOptions::default()
        .fsync(FsyncPolicy::Never)
        .max_segment_bytes(64 * 1024);
    let writer = FileEventStore::open_with(dir.path(), options.clone()).unwrap();
    // The writers append as the reader hands out permits, so that they stay a little ahead
    // of it (unpaced, they would outrun it, and each open would scan more than the last).
    let permits = Arc::new(Semaphore::new(0));
    let mut tasks = Vec::new();
    for w in 0..2_u64 {
        let (writer, permits) = (writer.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let mut appends = 0_u64;
            while let Ok(permit) = permits.acquire().await {
                permit.forget();
                appends += 1;
                let id = w * 1_000_000 + appends;
                writer
                    .append(&format!("stream-{w}"), Any, batch(id, 1 + id % 4))
                    .await
                    .unwrap();
            }
            appends
        }));
    }

    // The writers append while each open scans: it hands them the permits for the next
    // appends first.
    let mut seen = Vec::new();
    for _ in 0..25 {
        permits.add_permits(12);
        let reader = FileEventStore::open_read_only(dir.path()).unwrap();
        assert!(reader.is_read_only());
        let events = all(&reader).await;
        seen.push(check_prefix(&reader, &events).await);
        let error = reader.append("stream-0", Any, batch(0, 1)).await;
        assert!(
            matches!(
                error,
                Err(orchestrator_core::Error::Unsupported {
                    operation: "append",
                    ..
                })
            ),
            "{error:?}"
        );
    }
    permits.close();
    let mut appends = 0;
    for task in tasks {
        appends += task.await.unwrap();
    }
    let written = writer.head_position().await.unwrap();
    drop(writer);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen.first() < seen.last() && seen.last() <= Some(&written),
        "the opens did not run beside the writers: {seen:?}, {written} written"
    );

    // The writer's events are all there and intact (every frame is checked on open), and
    // no reader cut anything.
    let reopened = FileEventStore::open_with(dir.path(), options).unwrap();
    assert_eq!(reopened.recovery_report().truncated_at, None);
    assert_eq!(reopened.recovery_report().events, written);
    let events = all(&reopened).await;
    assert_eq!(check_prefix(&reopened, &events).await, written);
    assert!(appends > 0);
}

#[tokio::test]
async fn a_read_only_open_leaves_a_tail_being_written_unread_and_writes_nothing() {
    let live = tempfile::tempdir().unwrap();
    let writer = FileEventStore::open(live.path()).unwrap();
    writer.append("a", Any, batch(1, 3)).await.unwrap();
    writer.append("b", Any, batch(2, 2)).await.unwrap();
    // What a writer caught mid-append leaves: the first half of the last frame again.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(live.path(), copy.path());
    drop(writer);
    let segment = last_segment(copy.path());
    let mut data = std::fs::read(&segment).unwrap();
    let mut last_frame = 16;
    while last_frame + 12 + frame_body_len(&data, last_frame) < data.len() {
        last_frame += 12 + frame_body_len(&data, last_frame);
    }
    let tail = data[last_frame..last_frame + 50].to_vec();
    data.extend_from_slice(&tail);
    std::fs::write(&segment, &data).unwrap();

    let before = snapshot(copy.path());
    let reader = FileEventStore::open_read_only(copy.path()).unwrap();
    let events = all(&reader).await;
    assert_eq!(check_prefix(&reader, &events).await, 5);
    assert_eq!(reader.recovery_report().unread_bytes, 50);
    assert_eq!(reader.recovery_report().truncated_at, None);
    assert_eq!(reader.refresh().unwrap(), 0);
    assert!(reader.sync().await.is_err());
    drop(reader);
    assert_eq!(
        snapshot(copy.path()),
        before,
        "the read-only store changed a file"
    );

    // The tail is still there for a writer to cut.
    let reopened = FileEventStore::open(copy.path()).unwrap();
    assert_eq!(reopened.recovery_report().truncated_bytes, 50);
    assert_eq!(reopened.recovery_report().events, 5);

    // Nothing is created either: not a missing directory, not a first segment.
    let missing = copy.path().join("missing");
    assert!(matches!(
        FileEventStore::open_read_only(&missing),
        Err(Error::Io { .. })
    ));
    assert!(!missing.exists());
    let empty = tempfile::tempdir().unwrap();
    let reader = FileEventStore::open_read_only(empty.path()).unwrap();
    assert_eq!(reader.head_position().await.unwrap(), 0);
    assert_eq!(reader.refresh().unwrap(), 0);
    assert!(snapshot(empty.path()).is_empty());
}

#[tokio::test]
async fn refresh_reads_what_the_writer_appended_since() {
    let dir = tempfile::tempdir().unwrap();
    let writer = FileEventStore::open_with(
        dir.path(),
        FileStoreOptions::default().max_segment_bytes(4096),
    )
    .unwrap();
    writer.append("a", Any, batch(1, 3)).await.unwrap();
    let reader = FileEventStore::open_read_only(dir.path()).unwrap();
    let mut subscription = reader.subscribe(0, EventFilter::all()).await.unwrap();
    for _ in 0..3 {
        subscription.next().await.unwrap().unwrap();
    }

    // Enough to fill the open segment and start new ones.
    for n in 2..=30 {
        writer.append("a", Any, batch(n, 2)).await.unwrap();
    }
    assert!(writer.stats().segments_created > 0);
    // A snapshot until refreshed.
    assert_eq!(reader.head_position().await.unwrap(), 3);
    assert_eq!(reader.refresh().unwrap(), 58);
    assert_eq!(reader.refresh().unwrap(), 0);
    let events = all(&reader).await;
    assert_eq!(check_prefix(&reader, &events).await, 61);
    // The subscription opened before the refresh gets the new events.
    for expected in &events[3..] {
        let got = subscription.next().await.unwrap().unwrap();
        assert_eq!(got.id(), expected.id());
    }
    // The writer is not disturbed, and refresh does nothing on it.
    writer.append("a", Any, batch(31, 1)).await.unwrap();
    assert_eq!(writer.refresh().unwrap(), 0);
    assert!(!writer.is_read_only());
    assert_eq!(reader.refresh().unwrap(), 1);
}
