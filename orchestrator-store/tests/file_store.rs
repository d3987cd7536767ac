//! The embedded store beyond the conformance suite: reopening, torn tails, corruption,
//! group commit, sync policies and segment rollover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::ExpectedVersion::{Any, Exact, NoStream};
use orchestrator_core::{EventEnvelope, EventStore, ReadAll};
use orchestrator_store::Error;
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use serde_json::json;

fn event(n: u64) -> EventEnvelope {
    EventEnvelope::new("test.happened", &json!({ "n": n, "pad": "x".repeat(40) })).unwrap()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    found.sort();
    found
}

/// The byte offsets of every frame in a segment file (after its 16-byte header).
fn frame_offsets(file: &Path) -> Vec<u64> {
    let data = std::fs::read(file).unwrap();
    let mut offsets = Vec::new();
    let mut at = 16;
    while at < data.len() {
        offsets.push(at as u64);
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        at += 12 + len;
    }
    offsets
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

async fn all(store: &FileEventStore) -> Vec<EventEnvelope> {
    store.read_all(ReadAll::from(0, usize::MAX)).await.unwrap()
}

#[tokio::test]
async fn reopening_keeps_every_event_and_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    store
        .append("a", NoStream, vec![event(1), event(2)])
        .await
        .unwrap();
    store.append("b", Any, vec![event(3)]).await.unwrap();
    store.append("a", Exact(2), vec![event(4)]).await.unwrap();
    let before = all(&store).await;
    drop(store);

    let store = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(store.recovery_report().events, 4);
    assert_eq!(store.recovery_report().truncated_at, None);
    assert_eq!(all(&store).await, before);
    assert_eq!(store.stream_version("a").await.unwrap(), Some(3));
    assert_eq!(store.head_position().await.unwrap(), 4);
    let err = store
        .append("a", Exact(2), vec![event(5)])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        orchestrator_core::Error::WrongExpectedVersion {
            actual: Some(3),
            ..
        }
    ));
    let written = store.append("a", Exact(3), vec![event(5)]).await.unwrap();
    assert_eq!(
        (written.first_position, written.next_expected_version),
        (5, 4)
    );
}

/// Cutting the last segment anywhere in its last two appends (one of three events) loses
/// exactly the appends not wholly on disk, never part of one.
#[tokio::test]
async fn a_torn_tail_is_cut_at_an_append_boundary_wherever_it_tears() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    store.append("s", Any, vec![event(1)]).await.unwrap();
    store.append("s", Any, vec![event(2)]).await.unwrap();
    store
        .append("s", Any, vec![event(3), event(4), event(5)])
        .await
        .unwrap();
    store.append("t", Any, vec![event(6)]).await.unwrap();
    let complete = all(&store).await;
    drop(store);

    let segment = &segments(dir.path())[0];
    let offsets = frame_offsets(segment);
    let bytes = std::fs::read(segment).unwrap();
    let (batch_start, last_start) = (offsets[2], offsets[5]);
    // Every byte around frame boundaries (headers, the ends of bodies), every 11th elsewhere.
    let near_boundary = |cut: u64| {
        offsets
            .iter()
            .chain(std::iter::once(&(bytes.len() as u64)))
            .any(|&o| cut + 4 >= o && cut <= o + 16)
    };
    let cuts = (batch_start..bytes.len() as u64).filter(|&c| near_boundary(c) || c % 11 == 0);
    for cut in cuts {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let file = copy.path().join(segment.file_name().unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let no_sync = FileStoreOptions::default().fsync(FsyncPolicy::Never);
        let store = FileEventStore::open_with(copy.path(), no_sync.clone()).unwrap();
        let kept = if cut < last_start { 2 } else { 5 };
        let report = store.recovery_report().clone();
        assert_eq!(report.events, kept as u64, "cut at {cut}");
        let expected_cut = if cut < last_start {
            batch_start
        } else {
            last_start
        };
        if cut == expected_cut {
            assert_eq!(report.truncated_at, None, "cut at {cut}");
        } else {
            assert_eq!(report.truncated_at, Some((file.clone(), expected_cut)));
        }
        assert_eq!(all(&store).await, complete[..kept], "cut at {cut}");
        // The store goes on from the cut.
        let next = store.append("s", Any, vec![event(9)]).await.unwrap();
        assert_eq!(next.first_position, kept as u64 + 1);
        drop(store);
        let reopened = FileEventStore::open_with(copy.path(), no_sync).unwrap();
        assert_eq!(reopened.recovery_report().events, kept as u64 + 1);
    }
}

#[tokio::test]
async fn a_zero_filled_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    store.append("s", Any, vec![event(1)]).await.unwrap();
    drop(store);
    let segment = &segments(dir.path())[0];
    let len = std::fs::metadata(segment).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap();
    file.set_len(len + 4096).unwrap();
    drop(file);
    let store = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(store.recovery_report().events, 1);
    assert_eq!(store.recovery_report().truncated_bytes, 4096);
    assert_eq!(std::fs::metadata(segment).unwrap().len(), len);
}

fn corrupt_at(dir: &Path, file: &Path, byte: u64) -> (PathBuf, u64, String) {
    let mut data = std::fs::read(file).unwrap();
    data[byte as usize] ^= 0x5a;
    std::fs::write(file, data).unwrap();
    match FileEventStore::open(dir) {
        Err(Error::Corrupt {
            file,
            offset,
            reason,
        }) => (file, offset, reason),
        Err(other) => panic!("expected Error::Corrupt, got {other}"),
        Ok(_) => panic!("a store with a corrupt record opened"),
    }
}

/// A flipped byte in the body, or in the length, of a record in the middle of a segment:
/// the store refuses to open, naming the file and the record's offset.
#[tokio::test]
async fn a_corrupt_record_in_the_middle_is_reported_with_file_and_offset() {
    for (what, within_frame) in [("body", 20), ("length", 1), ("header checksum", 9)] {
        let dir = tempfile::tempdir().unwrap();
        let store = FileEventStore::open(dir.path()).unwrap();
        for n in 0..10 {
            store.append("s", Any, vec![event(n)]).await.unwrap();
        }
        drop(store);
        let segment = segments(dir.path())[0].clone();
        let victim = frame_offsets(&segment)[4];
        let (file, offset, reason) = corrupt_at(dir.path(), &segment, victim + within_frame);
        assert_eq!(
            (file, offset),
            (segment.clone(), victim),
            "{what}: {reason}"
        );
        assert!(reason.contains("checksum"), "{what}: {reason}");
        // Through the core error, the typed error is still there.
        let core: orchestrator_core::Error = FileEventStore::open(dir.path()).unwrap_err().into();
        assert!(matches!(
            Error::from_core(&core),
            Some(Error::Corrupt { offset, .. }) if *offset == victim
        ));
        assert!(
            core.to_string().contains(&format!("offset {victim}")),
            "{core}"
        );
    }
}

/// The last record of the last segment, whole but failing its checksum, is corruption,
/// not a torn write (a torn write is always a prefix).
#[tokio::test]
async fn a_whole_but_damaged_last_record_is_corruption_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    store
        .append("s", Any, vec![event(1), event(2)])
        .await
        .unwrap();
    drop(store);
    let segment = segments(dir.path())[0].clone();
    let last = *frame_offsets(&segment).last().unwrap();
    let (_, offset, _) = corrupt_at(dir.path(), &segment, last + 30);
    assert_eq!(offset, last);
}

#[tokio::test]
async fn a_torn_sealed_segment_or_a_missing_one_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions::default().max_segment_bytes(4096);
    let store = FileEventStore::open_with(dir.path(), options.clone()).unwrap();
    for n in 0..200 {
        store.append("s", Any, vec![event(n)]).await.unwrap();
    }
    drop(store);
    let files = segments(dir.path());
    assert!(files.len() >= 3, "{files:?}");

    let torn = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), torn.path());
    let first = torn.path().join(files[0].file_name().unwrap());
    let len = std::fs::metadata(&first).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    match FileEventStore::open_with(torn.path(), options.clone()) {
        Err(Error::Corrupt { file, reason, .. }) => {
            assert_eq!(file, first);
            assert!(reason.contains("sealed segment"), "{reason}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }

    let missing = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), missing.path());
    std::fs::remove_file(missing.path().join(files[1].file_name().unwrap())).unwrap();
    match FileEventStore::open_with(missing.path(), options) {
        Err(Error::Corrupt { file, reason, .. }) => {
            assert_eq!(file.file_name(), files[1].file_name());
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn segments_roll_over_and_a_large_append_gets_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions::default().max_segment_bytes(4096);
    let store = FileEventStore::open_with(dir.path(), options.clone()).unwrap();
    for n in 0..100 {
        store
            .append(&format!("s{}", n % 7), Any, vec![event(n)])
            .await
            .unwrap();
    }
    let big: Vec<_> = (0..100).map(event).collect();
    let written = store.append("big", NoStream, big).await.unwrap();
    store.append("after", Any, vec![event(0)]).await.unwrap();
    let stats = store.stats();
    assert!(stats.segments_created >= 3, "{stats:?}");
    let before = all(&store).await;
    drop(store);

    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    assert_eq!(all(&store).await, before);
    let big = store.read_stream("big", 1, 1000).await.unwrap();
    assert_eq!(big.len(), 100);
    assert_eq!(big[99].global_position(), Some(written.last_position));
    let files = segments(dir.path());
    assert_eq!(store.recovery_report().segments, files.len());
    // The big append sits alone in one segment, larger than the limit.
    let alone = files
        .iter()
        .find(|f| std::fs::metadata(f).unwrap().len() > 4096)
        .expect("a segment holding the big append");
    assert_eq!(frame_offsets(alone).len(), 100);
}

/// Appends racing each other share syncs: fewer syncs than appends, and each one is
/// readable as soon as it is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileEventStore::open(dir.path()).unwrap());
    let mut tasks = Vec::new();
    for writer in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..20 {
                let stream = format!("w{writer}");
                let written = store.append(&stream, Any, vec![event(n)]).await.unwrap();
                let back = store
                    .read_stream(&stream, written.next_expected_version, 1)
                    .await;
                assert_eq!(back.unwrap().len(), 1, "acknowledged but not readable");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (320, 320));
    assert!(stats.syncs < 320, "no group commit: {stats:?}");
    assert!(stats.syncs <= stats.writes, "{stats:?}");
}

/// Under an interval policy an append is written at once but neither acknowledged nor
/// visible until the sync.
#[tokio::test]
async fn an_append_is_invisible_until_its_sync() {
    let dir = tempfile::tempdir().unwrap();
    let options =
        FileStoreOptions::default().fsync(FsyncPolicy::Interval(Duration::from_secs(3600)));
    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    let mut append = Box::pin(store.append("s", Any, vec![event(1)]));
    assert!(futures::poll!(&mut append).is_pending());
    // The writer thread has no await point to signal its write: poll its counter.
    for _ in 0..10_000 {
        if store.stats().writes == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(store.stats().writes, 1);
    assert_eq!(store.stats().syncs, 0);
    assert_eq!(store.head_position().await.unwrap(), 0);
    assert!(all(&store).await.is_empty());
    assert!(futures::poll!(&mut append).is_pending());

    store.sync().await.unwrap();
    let written = append.await.unwrap();
    assert_eq!(written.last_position, 1);
    assert_eq!(store.head_position().await.unwrap(), 1);
    assert_eq!(store.stats().syncs, 1);
}

#[tokio::test]
async fn the_interval_policy_acknowledges_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let options =
        FileStoreOptions::default().fsync(FsyncPolicy::Interval(Duration::from_millis(5)));
    let store = Arc::new(FileEventStore::open_with(dir.path(), options).unwrap());
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.append("s", Any, vec![event(n)]).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(store.stream_version("s").await.unwrap(), Some(8));
    assert!(store.stats().syncs <= 8);
}

#[tokio::test]
async fn without_sync_appends_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions::default().fsync(FsyncPolicy::Never);
    let store = FileEventStore::open_with(dir.path(), options.clone()).unwrap();
    for n in 0..50 {
        store.append("s", Any, vec![event(n)]).await.unwrap();
    }
    assert_eq!(store.stats().syncs, 0);
    drop(store);
    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    assert_eq!(store.stream_version("s").await.unwrap(), Some(50));
}

#[tokio::test]
async fn a_file_that_is_not_a_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segment-0000000001.log"),
        b"hello, this is not a segment",
    )
    .unwrap();
    match FileEventStore::open(dir.path()) {
        Err(Error::Corrupt {
            offset: 0, reason, ..
        }) => assert!(reason.contains("header")),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_half_created_last_segment_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    store.append("s", Any, vec![event(1)]).await.unwrap();
    drop(store);
    // A crash right after creating segment 2, before its header was written.
    std::fs::write(dir.path().join("segment-0000000002.log"), b"ORCH").unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(store.recovery_report().segments, 2);
    store.append("s", Any, vec![event(2)]).await.unwrap();
    drop(store);
    let store = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(store.stream_version("s").await.unwrap(), Some(2));
}

#[tokio::test]
async fn a_dropped_store_ends_its_subscriptions() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    store.append("s", Any, vec![event(1)]).await.unwrap();
    let mut sub = store
        .subscribe(1, orchestrator_core::EventFilter::all())
        .await
        .unwrap();
    assert!(sub.next().await.unwrap().is_ok());
    drop(store);
    assert!(sub.next().await.is_none());
}

/// A 70 MiB event — larger than the codec reads back (64 MiB), and than the default maximum
/// event size — is refused before anything is written: the append fails with `TooLarge`
/// naming the size and the limit, and the store — the one in use and the directory reopened
/// — goes on reading and writing. Checked at the default limit and at the largest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_to_read_back_is_refused_before_it_is_written() {
    use orchestrator_core::{
        Error, EventEnvelope, EventStore, ExpectedVersion, MaxEventSize, ReadAll,
    };
    use orchestrator_store::file::{FileEventStore, FileStoreOptions};
    for limit in [MaxEventSize::DEFAULT, MaxEventSize::MAX] {
        let dir = tempfile::tempdir().unwrap();
        let options = FileStoreOptions::default().max_event_size(limit);
        let store = FileEventStore::open_with(dir.path(), options.clone()).unwrap();
        let small = || EventEnvelope::new("doc.saved", &serde_json::json!({ "n": 1 })).unwrap();
        store
            .append("docs", ExpectedVersion::Any, vec![small()])
            .await
            .unwrap();
        let huge = EventEnvelope::from_bytes(
            "doc.saved",
            "application/octet-stream",
            vec![7_u8; 70 * 1024 * 1024],
        )
        .unwrap();
        match store
            .append("docs", ExpectedVersion::Any, vec![small(), huge])
            .await
        {
            Err(Error::TooLarge { size, limit: l }) => {
                assert_eq!(l, limit.bytes());
                assert!(size > 70 * 1024 * 1024, "{size}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        store
            .append("docs", ExpectedVersion::Exact(1), vec![small()])
            .await
            .expect("nothing of the refused batch was written");
        drop(store);
        let reopened = FileEventStore::open_with(dir.path(), options).unwrap();
        let events = reopened.read_all(ReadAll::from(1, 10)).await.unwrap();
        assert_eq!(events.len(), 2);
    }
}

/// A long read comes back whole and in log order; a record corrupted on disk after it was
/// read once (the store keeps its read buffer between reads) is reported with its offset by
/// the next read, wherever it is in the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_reads_come_back_in_order_and_see_corruption_after_an_earlier_read() {
    use std::os::unix::fs::FileExt as _;

    for victim in [0, 100, 999] {
        let dir = tempfile::tempdir().unwrap();
        let store = FileEventStore::open(dir.path()).unwrap();
        let mut appended = Vec::new();
        for batch in 0..10u64 {
            let events: Vec<_> = (0..100).map(|n| event(batch * 100 + n)).collect();
            appended.extend(events.iter().map(|e| e.id().clone()));
            store
                .append(&format!("s-{}", batch % 3), Any, events)
                .await
                .unwrap();
        }
        let read = all(&store).await;
        let ids: Vec<_> = read.iter().map(|e| e.id().clone()).collect();
        assert_eq!(ids, appended, "every event, in the order appended");
        let positions: Vec<_> = read.iter().filter_map(|e| e.global_position()).collect();
        assert_eq!(positions, (1..=1000).collect::<Vec<u64>>());

        let segment = segments(dir.path())[0].clone();
        let offset = frame_offsets(&segment)[victim];
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segment)
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset + 20).unwrap();
        file.write_all_at(&[byte[0] ^ 0x5a], offset + 20).unwrap();
        let error = store
            .read_all(ReadAll::from(1, 1000))
            .await
            .expect_err("a corrupt record is not read");
        assert!(
            matches!(
                Error::from_core(&error),
                Some(Error::Corrupt { offset: at, reason, .. })
                    if *at == offset && reason.contains("checksum")
            ),
            "record {victim}: {error}"
        );
    }
}
