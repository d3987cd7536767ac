//! The maximum event size on this crate's stores: an event over a configured 1 KiB limit is
//! refused before anything is written, and a batch with one writes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orchestrator_core::testkit::store::oversize_events_are_refused;
use orchestrator_core::{EventStore, MaxEventSize, ReadAll};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::file::{FileEventStore, FileStoreOptions};

fn limit() -> MaxEventSize {
    MaxEventSize::new(1024).unwrap()
}

#[tokio::test]
async fn the_in_memory_store_refuses_oversize_events() {
    let store = InMemoryEventStore::new().with_max_event_size(limit());
    oversize_events_are_refused(&store, limit()).await;
}

#[tokio::test]
async fn the_file_store_refuses_oversize_events_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions::default().max_event_size(limit());
    let store = FileEventStore::open_with(dir.path(), options).unwrap();
    oversize_events_are_refused(&store, limit()).await;
    let written = store.read_all(ReadAll::from(1, 100)).await.unwrap();
    drop(store);
    // What was written before and after the refused batches reads back after a restart.
    let reopened = FileEventStore::open(dir.path()).unwrap();
    assert_eq!(
        reopened.read_all(ReadAll::from(1, 100)).await.unwrap(),
        written
    );
    assert_eq!(written.len(), 2);
}
