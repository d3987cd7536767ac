//! Where read models keep their documents: the [`ReadModelStore`] trait, its optional
//! [`ReadModelTransaction`]s, and the [`InMemoryReadModelStore`].
//!
//! A read model (see `orchestrator-cqrs`) applies events to JSON documents by key and
//! records the global position of the last event applied. Where the store can group writes
//! into a transaction ([`ReadModelStore::begin`] returns one), each event's writes commit
//! together with the position that says the event was applied: after a crash, the documents
//! and the position agree, so the projection resumes right after the last event whose
//! writes are there — **exactly once**. A store without transactions takes the writes one by
//! one and the position after them: after a crash between the two, the event is applied
//! again (at least once).
//!
//! ```
//! use orchestrator_core::read_model::{InMemoryReadModelStore, ReadModelStore};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator_core::Result<()> {
//! let store = InMemoryReadModelStore::new();
//! let tx = store.begin().await?.expect("the in-memory store has transactions");
//! tx.put("orders", json!(1)).await?;
//! tx.set_position(7).await?;
//! assert_eq!(store.get("orders").await?, None); // not committed yet
//! tx.commit().await?;
//! assert_eq!(store.get("orders").await?, Some(json!(1)));
//! assert_eq!(store.position().await?, Some(7));
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// Where a read model keeps its documents: JSON values by key, plus the position of the last
/// event applied.
#[async_trait]
pub trait ReadModelStore: Send + Sync + 'static {
    /// The document at `key`.
    async fn get(&self, key: &str) -> Result<Option<Value>>;
    /// Stores `value` at `key`, replacing what was there.
    async fn put(&self, key: &str, value: Value) -> Result<()>;
    /// Removes the document at `key`, returning it.
    async fn remove(&self, key: &str) -> Result<Option<Value>>;
    /// Every document, sorted by key.
    async fn list(&self) -> Result<Vec<(String, Value)>>;
    /// Removes every document and forgets the position (before a rebuild).
    async fn clear(&self) -> Result<()>;
    /// The global position of the last event applied, if the store records it (`None`: the
    /// projection's checkpoint decides where to resume).
    async fn position(&self) -> Result<Option<u64>>;
    /// Records the position of the last event applied (a lower one than recorded is
    /// ignored).
    async fn set_position(&self, position: u64) -> Result<()>;

    /// Starts a transaction: a view of the documents whose writes become visible together,
    /// at [`commit`](ReadModelTransaction::commit), or not at all. `None` (the default): the
    /// store has no transactions, and writes apply one by one as they are made.
    async fn begin(&self) -> Result<Option<Arc<dyn ReadModelTransaction>>> {
        Ok(None)
    }
}

/// A transaction of a [`ReadModelStore`]: the documents as the store holds them plus the
/// transaction's own writes, which nobody else sees until [`commit`](Self::commit) makes
/// them visible all at once, with the position set through it.
///
/// [`position`](ReadModelStore::position) reads the position as of the start of the
/// transaction (plus a position set through it). Where other writers may run the same read
/// model at once, a store should make a transaction's position final for its duration (e.g.
/// by locking it), so that a writer that finds the event already applied can step aside.
/// A transaction dropped without `commit` or `rollback` is rolled back; using it after
/// either is an error. [`begin`](ReadModelStore::begin) on a transaction starts no nested
/// one.
#[async_trait]
pub trait ReadModelTransaction: ReadModelStore {
    /// Makes every write of the transaction visible at once, with its position.
    async fn commit(&self) -> Result<()>;
    /// Discards the transaction's writes.
    async fn rollback(&self) -> Result<()>;
}

/// Typed access to a [`ReadModelStore`]'s documents.
pub trait ReadModelStoreExt: ReadModelStore {
    /// The document at `key`, decoded into `T`.
    fn get_as<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        async move {
            match self.get(key).await? {
                None => Ok(None),
                Some(value) => serde_json::from_value(value)
                    .map(Some)
                    .map_err(|e| Error::decode(key, format!("document does not fit: {e}"))),
            }
        }
    }

    /// Stores `value`, encoded as JSON, at `key`.
    fn put_as<T: Serialize + Sync>(
        &self,
        key: &str,
        value: &T,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let value = serde_json::to_value(value)
                .map_err(|e| Error::encode(format!("document does not serialize: {e}")))?;
            self.put(key, value).await
        }
    }
}

impl<S: ReadModelStore + ?Sized> ReadModelStoreExt for S {}

/// A [`ReadModelStore`] in memory (the default). Clones share the documents.
///
/// Its transactions keep their writes aside and apply them under the documents' lock at
/// commit: an event whose apply fails half-way leaves nothing behind. (Nothing in memory
/// survives a crash: a read model kept here is rebuilt from the first event at every start.)
#[derive(Debug, Clone, Default)]
pub struct InMemoryReadModelStore {
    inner: Arc<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    documents: RwLock<BTreeMap<String, Value>>,
    position: AtomicU64,
}

impl InMemoryReadModelStore {
    /// An empty store at position 0.
    pub fn new() -> Self {
        Self::default()
    }

    // Each critical section is one map operation (or, at commit, a series of inserts and
    // removals that cannot panic): a poisoned lock holds a consistent map.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Value>> {
        self.inner
            .documents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Value>> {
        self.inner
            .documents
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ReadModelStore for InMemoryReadModelStore {
    async fn get(&self, key: &str) -> Result<Option<Value>> {
        Ok(self.read().get(key).cloned())
    }
    async fn put(&self, key: &str, value: Value) -> Result<()> {
        self.write().insert(key.to_owned(), value);
        Ok(())
    }
    async fn remove(&self, key: &str) -> Result<Option<Value>> {
        Ok(self.write().remove(key))
    }
    async fn list(&self) -> Result<Vec<(String, Value)>> {
        Ok(self
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    async fn clear(&self) -> Result<()> {
        self.write().clear();
        self.inner.position.store(0, Ordering::SeqCst);
        Ok(())
    }
    async fn position(&self) -> Result<Option<u64>> {
        Ok(Some(self.inner.position.load(Ordering::SeqCst)))
    }
    async fn set_position(&self, position: u64) -> Result<()> {
        self.inner.position.fetch_max(position, Ordering::SeqCst);
        Ok(())
    }
    async fn begin(&self) -> Result<Option<Arc<dyn ReadModelTransaction>>> {
        let began_at = self.inner.position.load(Ordering::SeqCst);
        Ok(Some(Arc::new(InMemoryTransaction {
            store: self.clone(),
            staged: Mutex::new(Some(Staged {
                cleared: false,
                writes: BTreeMap::new(),
                position: began_at,
            })),
        })))
    }
}

/// A transaction of an [`InMemoryReadModelStore`]: its writes, kept aside until commit.
struct InMemoryTransaction {
    store: InMemoryReadModelStore,
    /// `None` once committed or rolled back.
    staged: Mutex<Option<Staged>>,
}

struct Staged {
    /// Whether the transaction cleared the store first.
    cleared: bool,
    /// Each key written: its new document, or `None` when removed.
    writes: BTreeMap<String, Option<Value>>,
    position: u64,
}

impl InMemoryTransaction {
    /// Runs `f` on the staged writes; an error once committed or rolled back.
    fn staged<T>(&self, f: impl FnOnce(&mut Staged) -> T) -> Result<T> {
        // Each critical section is a few map operations that cannot panic half-way.
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        staged.as_mut().map(f).ok_or_else(finished)
    }

    /// Takes the staged writes, ending the transaction.
    fn finish(&self) -> Result<Staged> {
        self.staged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(finished)
    }
}

/// The error for a transaction used after its commit or rollback.
fn finished() -> Error {
    Error::invalid(
        "read model transaction",
        "used after its commit or rollback",
    )
}

#[async_trait]
impl ReadModelStore for InMemoryTransaction {
    async fn get(&self, key: &str) -> Result<Option<Value>> {
        self.staged(|staged| match staged.writes.get(key) {
            Some(written) => written.clone(),
            None if staged.cleared => None,
            None => self.store.read().get(key).cloned(),
        })
    }
    async fn put(&self, key: &str, value: Value) -> Result<()> {
        self.staged(|staged| {
            staged.writes.insert(key.to_owned(), Some(value));
        })
    }
    async fn remove(&self, key: &str) -> Result<Option<Value>> {
        let before = self.get(key).await?;
        self.staged(|staged| {
            staged.writes.insert(key.to_owned(), None);
        })?;
        Ok(before)
    }
    async fn list(&self) -> Result<Vec<(String, Value)>> {
        self.staged(|staged| {
            let mut all = if staged.cleared {
                BTreeMap::new()
            } else {
                self.store.read().clone()
            };
            for (key, written) in &staged.writes {
                match written {
                    Some(value) => all.insert(key.clone(), value.clone()),
                    None => all.remove(key),
                };
            }
            all.into_iter().collect()
        })
    }
    async fn clear(&self) -> Result<()> {
        self.staged(|staged| {
            staged.cleared = true;
            staged.writes.clear();
            staged.position = 0;
        })
    }
    async fn position(&self) -> Result<Option<u64>> {
        self.staged(|staged| Some(staged.position))
    }
    async fn set_position(&self, position: u64) -> Result<()> {
        self.staged(|staged| staged.position = staged.position.max(position))
    }
}

#[async_trait]
impl ReadModelTransaction for InMemoryTransaction {
    async fn commit(&self) -> Result<()> {
        let staged = self.finish()?;
        let mut documents = self.store.write();
        if staged.cleared {
            documents.clear();
            self.store.inner.position.store(0, Ordering::SeqCst);
        }
        for (key, written) in staged.writes {
            match written {
                Some(value) => documents.insert(key, value),
                None => documents.remove(&key),
            };
        }
        self.store
            .inner
            .position
            .fetch_max(staged.position, Ordering::SeqCst);
        Ok(())
    }
    async fn rollback(&self) -> Result<()> {
        self.finish().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn transactions_commit_all_or_nothing() {
        let store = InMemoryReadModelStore::new();
        store.put("kept", json!(1)).await.unwrap();
        let tx = store.begin().await.unwrap().unwrap();
        tx.put("new", json!(2)).await.unwrap();
        assert_eq!(tx.remove("kept").await.unwrap(), Some(json!(1)));
        assert_eq!(tx.get("kept").await.unwrap(), None);
        assert_eq!(tx.list().await.unwrap(), vec![("new".into(), json!(2))]);
        tx.set_position(4).await.unwrap();
        assert_eq!(store.get("kept").await.unwrap(), Some(json!(1)));
        assert_eq!(store.position().await.unwrap(), Some(0));
        tx.rollback().await.unwrap();
        assert!(tx.put("late", json!(0)).await.is_err());
        assert_eq!(store.list().await.unwrap(), vec![("kept".into(), json!(1))]);

        let tx = store.begin().await.unwrap().unwrap();
        tx.clear().await.unwrap();
        tx.put("after", json!(3)).await.unwrap();
        tx.set_position(9).await.unwrap();
        tx.commit().await.unwrap();
        assert!(tx.commit().await.is_err());
        assert_eq!(
            store.list().await.unwrap(),
            vec![("after".into(), json!(3))]
        );
        assert_eq!(store.position().await.unwrap(), Some(9));
    }
}
