//! Snapshots: an aggregate's state saved at a stream version, so loading it reads only the
//! events after that version.
//!
//! A [`SnapshotStore`] keeps the latest [`Snapshot`] of each stream:
//! [`InMemorySnapshotStore`] beside the in-memory event store, [`FileSnapshotStore`] (a
//! directory of checksummed files, replaced atomically) beside the embedded one. Both work
//! with any event store: snapshots are a cache of what the events already say.
//!
//! [`load_aggregate`] loads the latest snapshot and applies the events after it; a snapshot
//! whose [`Aggregate::STATE_VERSION`] differs from the code's, or that no longer decodes, is
//! ignored (with a warning) and the state is folded from the first event. A
//! [`SnapshotPolicy`] says when to take the next snapshot, e.g. every 100 events.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, SystemClock};
//! use orchestrator_store::InMemoryEventStore;
//! use orchestrator_store::snapshot::{InMemorySnapshotStore, SnapshotPolicy, load_aggregate};
//! use orchestrator_store::temporal::Aggregate;
//!
//! #[derive(Default, serde::Serialize, serde::Deserialize)]
//! struct Counter(u64);
//! impl Aggregate for Counter {
//!     fn apply(&mut self, _: &EventEnvelope) -> orchestrator_core::Result<()> {
//!         self.0 += 1;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_core::Result<()> {
//! let (store, snapshots) = (InMemoryEventStore::new(), InMemorySnapshotStore::new());
//! let policy = SnapshotPolicy::every_n_events(3);
//! for _ in 0..5 {
//!     store.append("c-1", ExpectedVersion::Any, vec![EventEnvelope::new("c.inc", &())?]).await?;
//! }
//! let loaded = load_aggregate::<Counter>(&store, &snapshots, "c-1").await?;
//! assert_eq!((loaded.state().0, loaded.events_read()), (5, 5));
//! assert!(policy.snapshot_if_due(&snapshots, "c-1", &loaded, &SystemClock).await?);
//!
//! store.append("c-1", ExpectedVersion::Any, vec![EventEnvelope::new("c.inc", &())?]).await?;
//! let loaded = load_aggregate::<Counter>(&store, &snapshots, "c-1").await?;
//! assert_eq!((loaded.state().0, loaded.events_read()), (6, 1)); // snapshot + 1 event
//! # Ok(())
//! # }
//! ```

mod file;
mod memory;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::codec::Bincode;
use orchestrator_core::{Clock, EventStore, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::temporal::{Aggregate, AsOf, Folded, fold_stream};

pub use file::FileSnapshotStore;
pub use memory::InMemorySnapshotStore;

/// An aggregate's state at one version of its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The stream.
    pub stream: String,
    /// The stream version the state includes (every event up to it).
    pub version: u64,
    /// The global position of the event at that version.
    pub position: u64,
    /// The aggregate's [`Aggregate::STATE_VERSION`] when the snapshot was taken.
    pub state_version: u32,
    /// The state, encoded with the core `Bincode` codec.
    pub state: Vec<u8>,
    /// When the snapshot was taken.
    pub taken_at: DateTime<Utc>,
}

impl Snapshot {
    /// A snapshot of a folded aggregate.
    pub fn of<A: Aggregate + Serialize>(
        stream: impl Into<String>,
        folded: &Folded<A>,
        taken_at: DateTime<Utc>,
    ) -> Result<Self> {
        Ok(Self {
            stream: stream.into(),
            version: folded.version,
            position: folded.position,
            state_version: A::STATE_VERSION,
            state: Bincode::encode_payload(&folded.state)?,
            taken_at,
        })
    }

    /// Decodes the state.
    pub fn decode<A: DeserializeOwned>(&self) -> Result<A> {
        Bincode::decode_payload(&self.state)
    }
}

/// Keeps the latest snapshot of each stream.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// Saves `snapshot`, replacing the stream's previous one unless that one is of a later
    /// version.
    async fn save(&self, snapshot: Snapshot) -> Result<()>;

    /// The stream's latest snapshot, if any.
    async fn load(&self, stream: &str) -> Result<Option<Snapshot>>;

    /// Forgets the stream's snapshot.
    async fn delete(&self, stream: &str) -> Result<()>;
}

/// An aggregate loaded from its latest snapshot and the events after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<A> {
    folded: Folded<A>,
    snapshot_version: Option<u64>,
}

impl<A> Loaded<A> {
    /// The state.
    pub fn state(&self) -> &A {
        &self.folded.state
    }

    /// The state, taken out.
    pub fn into_state(self) -> A {
        self.folded.state
    }

    /// The stream version the state includes (0: the stream has no events).
    pub fn version(&self) -> u64 {
        self.folded.version
    }

    /// The version of the snapshot it started from, if one was used.
    pub fn snapshot_version(&self) -> Option<u64> {
        self.snapshot_version
    }

    /// How many events were read and applied after the snapshot.
    pub fn events_read(&self) -> u64 {
        self.folded.events
    }

    /// The fold (state, version, position).
    pub fn folded(&self) -> &Folded<A> {
        &self.folded
    }
}

/// Loads `stream`'s aggregate: the latest usable snapshot, then the events after it.
pub async fn load_aggregate<A: Aggregate + DeserializeOwned>(
    store: &(impl EventStore + ?Sized),
    snapshots: &(impl SnapshotStore + ?Sized),
    stream: &str,
) -> Result<Loaded<A>> {
    let mut start = Folded::new(A::default());
    let mut snapshot_version = None;
    let snapshot = match snapshots.load(stream).await {
        Ok(snapshot) => snapshot,
        Err(e)
            if matches!(
                crate::Error::from_core(&e),
                Some(crate::Error::Corrupt { .. })
            ) =>
        {
            tracing::warn!(stream, "ignoring a damaged snapshot: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(snapshot) = snapshot {
        if snapshot.state_version != A::STATE_VERSION {
            tracing::warn!(
                stream,
                snapshot = snapshot.state_version,
                current = A::STATE_VERSION,
                "ignoring a snapshot of another state version"
            );
        } else {
            match snapshot.decode::<A>() {
                Ok(state) => {
                    start = Folded::new(state);
                    start.version = snapshot.version;
                    start.position = snapshot.position;
                    snapshot_version = Some(snapshot.version);
                }
                Err(e) => tracing::warn!(stream, "ignoring a snapshot that does not decode: {e}"),
            }
        }
    }
    let from = start.version + 1;
    let folded = fold_stream(
        store,
        stream,
        from,
        AsOf::Latest,
        start,
        |state: &mut A, e| state.apply(e),
    )
    .await?;
    Ok(Loaded {
        folded,
        snapshot_version,
    })
}

/// When to take a snapshot: once this many events have been applied since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    every: u64,
}

impl SnapshotPolicy {
    /// A snapshot every `n` events (at least 1).
    pub fn every_n_events(n: u64) -> Self {
        Self { every: n.max(1) }
    }

    /// Never a snapshot.
    pub fn never() -> Self {
        Self { every: u64::MAX }
    }

    /// Whether a stream at `version`, whose latest snapshot is at `snapshot_version`, is due.
    pub fn is_due(&self, snapshot_version: Option<u64>, version: u64) -> bool {
        version.saturating_sub(snapshot_version.unwrap_or(0)) >= self.every
    }

    /// Saves a snapshot of `loaded` if it is due; returns whether it did.
    pub async fn snapshot_if_due<A: Aggregate + Serialize>(
        &self,
        snapshots: &(impl SnapshotStore + ?Sized),
        stream: &str,
        loaded: &Loaded<A>,
        clock: &dyn Clock,
    ) -> Result<bool> {
        if !self.is_due(loaded.snapshot_version, loaded.version()) {
            return Ok(false);
        }
        snapshots
            .save(Snapshot::of(stream, &loaded.folded, clock.now())?)
            .await?;
        Ok(true)
    }
}
