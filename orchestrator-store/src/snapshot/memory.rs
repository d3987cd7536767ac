//! Snapshots kept in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use orchestrator_core::Result;

use super::{Snapshot, SnapshotStore};

/// A [`SnapshotStore`] in memory, beside the in-memory event store. Clones share the
/// snapshots.
#[derive(Debug, Clone, Default)]
pub struct InMemorySnapshotStore {
    snapshots: Arc<Mutex<HashMap<String, Snapshot>>>,
}

impl InMemorySnapshotStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    // Each critical section is one map operation: a panic cannot leave the map
    // half-updated, so a poisoned lock is safe to use.
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Snapshot>> {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl SnapshotStore for InMemorySnapshotStore {
    async fn save(&self, snapshot: Snapshot) -> Result<()> {
        let mut map = self.map();
        let newer = map
            .get(&snapshot.stream)
            .is_none_or(|old| old.version <= snapshot.version);
        if newer {
            map.insert(snapshot.stream.clone(), snapshot);
        }
        Ok(())
    }

    async fn load(&self, stream: &str) -> Result<Option<Snapshot>> {
        Ok(self.map().get(stream).cloned())
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        self.map().remove(stream);
        Ok(())
    }
}
