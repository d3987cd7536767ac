//! `FileInbox` on real files: the inbox conformance suite, surviving a reopen, torn and
//! damaged lines, compaction to the retention window, and the file store's inbox.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orchestrator_core::testkit::inbox::run_all;
use orchestrator_core::{EventId, EventStore, Inbox, InboxRetention, ManualClock};
use orchestrator_store::FileEventStore;
use orchestrator_store::inbox::{FileInbox, InboxSync};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_inbox_conforms() {
    let root = tempfile::tempdir().unwrap();
    let case = AtomicUsize::new(0);
    run_all(|retention, clock| {
        let dir = root
            .path()
            .join(case.fetch_add(1, Ordering::Relaxed).to_string());
        async move {
            FileInbox::open(dir)
                .unwrap()
                .with_retention(retention)
                .with_clock(clock)
        }
    })
    .await;
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_ids_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<EventId> = (0..10).map(|_| EventId::new()).collect();
    let inbox = FileInbox::open(dir.path()).unwrap();
    for id in &ids {
        inbox.record("billing", id).await.unwrap();
    }
    drop(inbox);

    let inbox = FileInbox::open(dir.path()).unwrap();
    assert!(inbox.durable());
    for id in &ids {
        assert!(inbox.seen("billing", id).await.unwrap());
        assert!(!inbox.seen("shipping", id).await.unwrap());
    }
    assert!(!inbox.seen("billing", &EventId::new()).await.unwrap());
    // One header and one line per id: recording again after the reopen wrote nothing.
    inbox.record("billing", &ids[0]).await.unwrap();
    assert_eq!(lines_of(&inbox.path_of("billing")).len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_ignored_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (EventId::new(), EventId::new(), EventId::new());
    let inbox = FileInbox::open(dir.path()).unwrap();
    inbox.record("g", &a).await.unwrap();
    inbox.record("g", &b).await.unwrap();
    let path = inbox.path_of("g");
    drop(inbox);
    // What a kill -9 in the middle of writing the line of `c` leaves.
    let whole = std::fs::read(&path).unwrap();
    let mut torn = String::new();
    torn.push_str(&format!("1767225600000 \"{}", &c.as_str()[..10]));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(torn.as_bytes())
        .unwrap();

    let inbox = FileInbox::open(dir.path()).unwrap();
    assert!(inbox.seen("g", &a).await.unwrap());
    assert!(inbox.seen("g", &b).await.unwrap());
    assert!(
        !inbox.seen("g", &c).await.unwrap(),
        "the torn record counts"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        whole,
        "the torn tail is cut off"
    );
    // The next record starts a line of its own.
    inbox.record("g", &c).await.unwrap();
    drop(inbox);
    let inbox = FileInbox::open(dir.path()).unwrap();
    for id in [&a, &b, &c] {
        assert!(inbox.seen("g", id).await.unwrap());
    }
    assert_eq!(lines_of(&path).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_header_starts_the_log_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = FileInbox::open(dir.path()).unwrap();
    let path = inbox.path_of("g");
    std::fs::write(&path, b"orchestrator-inb").unwrap();
    let id = EventId::new();
    assert!(!inbox.seen("g", &id).await.unwrap());
    inbox.record("g", &id).await.unwrap();
    drop(inbox);
    let inbox = FileInbox::open(dir.path()).unwrap();
    assert!(inbox.seen("g", &id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_line_is_skipped_and_the_others_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<EventId> = (0..3).map(|_| EventId::new()).collect();
    let inbox = FileInbox::open(dir.path()).unwrap();
    for id in &ids {
        inbox.record("g", id).await.unwrap();
    }
    let path = inbox.path_of("g");
    drop(inbox);
    let mut lines = lines_of(&path);
    // Flip one character of the middle id: its checksum no longer matches.
    lines[2] = lines[2].replacen('-', "+", 1);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();

    let inbox = FileInbox::open(dir.path()).unwrap();
    assert!(inbox.seen("g", &ids[0]).await.unwrap());
    assert!(!inbox.seen("g", &ids[1]).await.unwrap());
    assert!(inbox.seen("g", &ids[2]).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_another_group_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = FileInbox::open(dir.path()).unwrap();
    inbox.record("a", &EventId::new()).await.unwrap();
    let (a, b) = (inbox.path_of("a"), inbox.path_of("b"));
    drop(inbox);
    std::fs::copy(&a, &b).unwrap();
    let inbox = FileInbox::open(dir.path()).unwrap();
    let error = inbox.seen("b", &EventId::new()).await.unwrap_err();
    assert!(
        error.to_string().contains("belongs to the inbox group"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_to_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        FileInbox::open(dir.path())
            .unwrap()
            .with_retention(InboxRetention::last(3))
            .with_sync(InboxSync::Never)
    };
    let inbox = open();
    let ids: Vec<EventId> = (0..3000).map(|_| EventId::new()).collect();
    for id in &ids {
        inbox.record("g", id).await.unwrap();
    }
    let path = inbox.path_of("g");
    let lines = lines_of(&path).len();
    assert!(
        lines <= 1 + 1024,
        "{lines} lines for a window of 3: not compacted"
    );
    drop(inbox);

    let inbox = open();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(inbox.seen("g", id).await.unwrap(), i >= 2997, "id {i}");
    }
    assert!(!dir.path().join("g.inbox.tmp").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ages_are_kept_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(chrono::Utc::now());
    let open = || {
        FileInbox::open(dir.path())
            .unwrap()
            .with_retention(InboxRetention::within(Duration::from_secs(60)))
            .with_clock(Arc::new(clock.clone()))
    };
    let (old, young) = (EventId::new(), EventId::new());
    let inbox = open();
    inbox.record("g", &old).await.unwrap();
    clock.advance(Duration::from_secs(30));
    inbox.record("g", &young).await.unwrap();
    drop(inbox);
    clock.advance(Duration::from_secs(31));
    let inbox = open();
    assert!(!inbox.seen("g", &old).await.unwrap(), "kept past its age");
    assert!(inbox.seen("g", &young).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_store_hands_out_a_durable_inbox_in_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let id = EventId::new();
    let store = FileEventStore::open(dir.path()).unwrap();
    let inbox = store.inbox().expect("the file store keeps an inbox");
    assert!(inbox.durable());
    assert!(inbox.describe().contains("inbox"), "{}", inbox.describe());
    inbox.record("billing", &id).await.unwrap();
    assert!(
        store.inbox().unwrap().seen("billing", &id).await.unwrap(),
        "every call hands out the same inbox"
    );
    assert!(dir.path().join("inbox").is_dir());
    drop((inbox, store));

    let store = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(
        store.recovery_report().events,
        0,
        "the inbox is not a segment"
    );
    assert!(store.inbox().unwrap().seen("billing", &id).await.unwrap());
}
