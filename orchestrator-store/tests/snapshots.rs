//! Snapshots: load = latest snapshot + the events after it, the every-N policy, and the
//! in-memory and file snapshot stores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use orchestrator_core::ExpectedVersion::Any;
use orchestrator_core::{EventEnvelope, EventStore, ManualClock};
use orchestrator_store::file::FileEventStore;
use orchestrator_store::snapshot::{
    FileSnapshotStore, InMemorySnapshotStore, Snapshot, SnapshotPolicy, SnapshotStore,
    load_aggregate,
};
use orchestrator_store::temporal::{Aggregate, Folded};
use orchestrator_store::{Error, InMemoryEventStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Cart {
    items: Vec<String>,
}

impl Aggregate for Cart {
    fn apply(&mut self, event: &EventEnvelope) -> orchestrator_core::Result<()> {
        self.items.push(event.data()?);
        Ok(())
    }
}

/// The same cart with another state shape: its snapshots must not be read as `Cart`'s.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CartV2 {
    count: u64,
}

impl Aggregate for CartV2 {
    const STATE_VERSION: u32 = 2;
    fn apply(&mut self, _: &EventEnvelope) -> orchestrator_core::Result<()> {
        self.count += 1;
        Ok(())
    }
}

async fn add(store: &dyn EventStore, stream: &str, item: &str) {
    let e = EventEnvelope::new("cart.item-added", &item).unwrap();
    store.append(stream, Any, vec![e]).await.unwrap();
}

/// Appends 25 items one by one, loading the cart before each and snapshotting every 10
/// events: every load reads only the events after the last snapshot.
async fn load_uses_the_latest_snapshot(store: &dyn EventStore, snapshots: &dyn SnapshotStore) {
    let clock = ManualClock::starting_at_epoch();
    let policy = SnapshotPolicy::every_n_events(10);
    let mut saved = 0;
    for n in 0..25 {
        let loaded = load_aggregate::<Cart>(store, snapshots, "cart-1")
            .await
            .unwrap();
        assert_eq!(loaded.version(), n);
        assert_eq!(loaded.state().items.len() as u64, n);
        let since = n - loaded.snapshot_version().unwrap_or(0);
        assert_eq!(loaded.events_read(), since, "at version {n}");
        assert!(
            since <= 10,
            "at version {n}: {since} events since the snapshot"
        );
        if policy
            .snapshot_if_due(snapshots, "cart-1", &loaded, &clock)
            .await
            .unwrap()
        {
            saved += 1;
        }
        add(store, "cart-1", &format!("item-{n}")).await;
    }
    assert_eq!(saved, 2, "snapshots at versions 10 and 20");
    let latest = snapshots.load("cart-1").await.unwrap().unwrap();
    assert_eq!((latest.version, latest.state_version), (20, 1));
    let loaded = load_aggregate::<Cart>(store, snapshots, "cart-1")
        .await
        .unwrap();
    assert_eq!(
        (loaded.snapshot_version(), loaded.events_read()),
        (Some(20), 5)
    );
    let expected: Vec<_> = (0..25).map(|n| format!("item-{n}")).collect();
    assert_eq!(loaded.into_state().items, expected);

    // Another state shape ignores the snapshot and folds every event.
    let other = load_aggregate::<CartV2>(store, snapshots, "cart-1")
        .await
        .unwrap();
    assert_eq!((other.snapshot_version(), other.state().count), (None, 25));
}

#[tokio::test]
async fn in_memory_snapshots() {
    load_uses_the_latest_snapshot(&InMemoryEventStore::new(), &InMemorySnapshotStore::new()).await;
}

#[tokio::test]
async fn file_snapshots_beside_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path().join("events")).unwrap();
    let snapshots = FileSnapshotStore::open(dir.path().join("snapshots")).unwrap();
    load_uses_the_latest_snapshot(&store, &snapshots).await;
    drop((store, snapshots));

    let store = FileEventStore::open(dir.path().join("events")).unwrap();
    let snapshots = FileSnapshotStore::open(dir.path().join("snapshots")).unwrap();
    let loaded = load_aggregate::<Cart>(&store, &snapshots, "cart-1")
        .await
        .unwrap();
    assert_eq!(
        (loaded.snapshot_version(), loaded.events_read()),
        (Some(20), 5)
    );
}

fn snapshot(stream: &str, version: u64) -> Snapshot {
    let mut folded = Folded::new(Cart {
        items: vec![format!("v{version}")],
    });
    folded.version = version;
    Snapshot::of(stream, &folded, chrono::DateTime::UNIX_EPOCH).unwrap()
}

#[tokio::test]
async fn an_older_snapshot_never_replaces_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<Arc<dyn SnapshotStore>> = vec![
        Arc::new(InMemorySnapshotStore::new()),
        Arc::new(FileSnapshotStore::open(dir.path()).unwrap()),
    ];
    let long = "x".repeat(500);
    for snapshots in stores {
        for stream in ["s/1 ü", long.as_str()] {
            snapshots.save(snapshot(stream, 5)).await.unwrap();
            snapshots.save(snapshot(stream, 3)).await.unwrap();
            let kept = snapshots.load(stream).await.unwrap().unwrap();
            assert_eq!((kept.version, kept.stream.as_str()), (5, stream));
            assert_eq!(kept.decode::<Cart>().unwrap().items, ["v5"]);
            snapshots.save(snapshot(stream, 8)).await.unwrap();
            assert_eq!(snapshots.load(stream).await.unwrap().unwrap().version, 8);
            snapshots.delete(stream).await.unwrap();
            assert_eq!(snapshots.load(stream).await.unwrap(), None);
            snapshots.delete(stream).await.unwrap();
        }
        assert_eq!(snapshots.load("never").await.unwrap(), None);
    }
}

#[tokio::test]
async fn a_damaged_snapshot_file_is_reported_and_then_ignored_by_loading() {
    let dir = tempfile::tempdir().unwrap();
    let store = InMemoryEventStore::new();
    let snapshots = FileSnapshotStore::open(dir.path()).unwrap();
    for n in 0..3 {
        add(&store, "c", &format!("i{n}")).await;
    }
    let loaded = load_aggregate::<Cart>(&store, &snapshots, "c")
        .await
        .unwrap();
    let clock = ManualClock::starting_at_epoch();
    assert!(
        SnapshotPolicy::every_n_events(1)
            .snapshot_if_due(&snapshots, "c", &loaded, &clock)
            .await
            .unwrap()
    );
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();

    let err = snapshots.load("c").await.unwrap_err();
    assert!(
        matches!(Error::from_core(&err), Some(Error::Corrupt { .. })),
        "{err}"
    );
    let loaded = load_aggregate::<Cart>(&store, &snapshots, "c")
        .await
        .unwrap();
    assert_eq!((loaded.snapshot_version(), loaded.events_read()), (None, 3));
    // A new snapshot replaces the damaged one.
    assert!(
        SnapshotPolicy::every_n_events(1)
            .snapshot_if_due(&snapshots, "c", &loaded, &clock)
            .await
            .unwrap()
    );
    assert_eq!(snapshots.load("c").await.unwrap().unwrap().version, 3);
}

#[test]
fn the_policy_counts_events_since_the_last_snapshot() {
    let every = SnapshotPolicy::every_n_events(100);
    assert!(!every.is_due(None, 99));
    assert!(every.is_due(None, 100));
    assert!(!every.is_due(Some(100), 150));
    assert!(every.is_due(Some(100), 200));
    assert!(!SnapshotPolicy::never().is_due(None, u64::MAX - 1));
}
