//! Every store of this crate against the shared event store conformance suite: the
//! in-memory store, the embedded file store (each sync policy, small segments, one store
//! shared by every case) and the schema-validating wrapper.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use orchestrator_core::testkit::store::run_all;
use orchestrator_core::{
    AppendResult, Error, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion,
    ReadAll, Result, StoreCapabilities,
};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use orchestrator_store::schema::{SchemaRegistry, ValidatingStore};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_memory_store_conforms() {
    run_all(|| async { InMemoryEventStore::new() }).await;
}

#[tokio::test(flavor = "current_thread")]
async fn in_memory_store_conforms_on_one_thread() {
    run_all(|| async { InMemoryEventStore::new() }).await;
}

/// The cases must not assume an empty store: hand every case the same one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_shared_in_memory_store_conforms() {
    let shared = InMemoryEventStore::new();
    run_all(|| {
        let store = shared.clone();
        async move { store }
    })
    .await;
}

/// A store that claims neither expected versions, atomic batches nor `read_stream`, to check
/// that the suite holds such a store to what it claims (and skips the rest).
struct AppendOnlyStore(InMemoryEventStore);

fn unsupported(operation: &'static str) -> Error {
    Error::Unsupported {
        backend: "append-only",
        operation,
        hint: "use ExpectedVersion::Any and read_all",
    }
}

#[async_trait]
impl EventStore for AppendOnlyStore {
    fn name(&self) -> &'static str {
        "append-only"
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities::new(false, false, false, false)
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        if expected != ExpectedVersion::Any {
            orchestrator_core::store::validate_stream_id(stream)?;
            return Err(unsupported("expected version"));
        }
        self.0.append(stream, expected, events).await
    }

    async fn read_stream(&self, _: &str, _: u64, _: usize) -> Result<Vec<EventEnvelope>> {
        Err(unsupported("read_stream"))
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        self.0.read_all(query).await
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        self.0.stream_version(stream).await
    }

    async fn head_position(&self) -> Result<u64> {
        self.0.head_position().await
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        self.0.subscribe(from_position, filter).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_with_fewer_capabilities_conforms() {
    run_all(|| async { AppendOnlyStore(InMemoryEventStore::new()) }).await;
}

fn file_store(root: &tempfile::TempDir, options: FileStoreOptions) -> FileEventStore {
    let dir = root.path().join(uuid_like());
    let store = FileEventStore::open_with(dir, options).unwrap();
    assert!(store.capabilities().durable);
    store
}

fn uuid_like() -> String {
    format!("{:016x}", fastrand::u64(..))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_store_conforms() {
    let root = tempfile::tempdir().unwrap();
    run_all(|| async { file_store(&root, FileStoreOptions::default()) }).await;
}

/// Small segments (so cases roll over many times), a sync interval, one store for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_shared_file_store_with_small_segments_conforms() {
    let root = tempfile::tempdir().unwrap();
    let options = FileStoreOptions::default()
        .max_segment_bytes(4096)
        .fsync(FsyncPolicy::Interval(Duration::from_millis(2)));
    let shared = file_store(&root, options);
    run_all(|| {
        let store = shared.clone();
        async move { store }
    })
    .await;
    assert!(shared.stats().segments_created > 10, "{:?}", shared.stats());
}

#[tokio::test(flavor = "current_thread")]
async fn file_store_without_sync_conforms_on_one_thread() {
    let root = tempfile::tempdir().unwrap();
    let options = FileStoreOptions::default().fsync(FsyncPolicy::Never);
    run_all(|| async { file_store(&root, options.clone()) }).await;
}

/// With nothing registered, the validating wrapper must be invisible.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validating_store_conforms() {
    run_all(|| async {
        ValidatingStore::new(InMemoryEventStore::new(), Arc::new(SchemaRegistry::new()))
    })
    .await;
}
