//! The query cache, and how read models' projections invalidate it.
//!
//! Invalidation works by versions rather than by finding entries: a fixed table of
//! counters, each standing for the tags hashed to it (an event type, a stream, a read
//! model, …). A projection that applies an event bumps the counters of the event's tags;
//! a cached result remembers the counters of its dependencies' tags as they were **before**
//! its handler ran, and is served only while they are unchanged. So an event applied while
//! a handler was still reading makes that result stale at once — no race between caching a
//! result and invalidating it — and invalidation costs a few atomic increments per event,
//! whatever the number of cached entries. Two tags sharing a counter only cost each other
//! some cache hits. A stale entry is dropped at its next lookup (a miss), or by the cache's
//! capacity and time-to-live.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use orchestrator_core::{Clock, EventEnvelope};
use serde_json::Value;

/// How many version counters the table has.
const SLOTS: usize = 4096;

/// Capacity and time-to-live of the query cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueryCacheConfig {
    /// At most this many results are kept (the least useful are evicted first).
    pub capacity: u64,
    /// A result is served for at most this long after it was computed (measured on the
    /// query bus's clock).
    pub ttl: Duration,
}

impl Default for QueryCacheConfig {
    /// 10,000 results for 30 seconds.
    fn default() -> Self {
        Self {
            capacity: 10_000,
            ttl: Duration::from_secs(30),
        }
    }
}

impl QueryCacheConfig {
    /// At most `capacity` results, each for at most `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self { capacity, ttl }
    }
}

/// What a cached result depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Tag<'a> {
    /// Every event applied by any read model.
    Any,
    /// Every event applied by this read model.
    ReadModel(&'a str),
    /// Events of this type.
    Type(&'a str),
    /// Events of this stream.
    Stream(&'a str),
    /// Events of this type in this stream.
    TypeInStream(&'a str, &'a str),
}

impl Tag<'_> {
    fn slot(&self) -> usize {
        let mut hasher = DefaultHasher::new();
        self.hash(&mut hasher);
        // The modulo keeps the value below SLOTS, which fits any usize.
        usize::try_from(hasher.finish() % SLOTS as u64).unwrap_or(0)
    }
}

/// The version counters.
pub(crate) struct Versions {
    slots: Box<[AtomicU64]>,
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The counters a cached result saw: (slot, version) pairs.
pub(crate) type Seen = Vec<(usize, u64)>;

impl Versions {
    fn bump(&self, tag: Tag<'_>) {
        self.slots[tag.slot()].fetch_add(1, Ordering::SeqCst);
    }

    /// Bumps every tag `event` (just applied by `read_model`) belongs to.
    pub(crate) fn event_applied(&self, read_model: &str, event: &EventEnvelope) {
        let event_type = event.event_type();
        self.bump(Tag::Any);
        self.bump(Tag::ReadModel(read_model));
        self.bump(Tag::Type(event_type));
        if let Some(stream) = event.stream_id() {
            self.bump(Tag::Stream(stream));
            self.bump(Tag::TypeInStream(event_type, stream));
        }
    }

    /// The current versions of `tags`.
    pub(crate) fn seen(&self, tags: &[Tag<'_>]) -> Seen {
        tags.iter()
            .map(|tag| {
                let slot = tag.slot();
                (slot, self.slots[slot].load(Ordering::SeqCst))
            })
            .collect()
    }

    /// Whether none of the counters in `seen` moved.
    fn unchanged(&self, seen: &Seen) -> bool {
        seen.iter()
            .all(|&(slot, version)| self.slots[slot].load(Ordering::SeqCst) == version)
    }
}

/// A cached result.
pub(crate) struct Cached {
    value: Value,
    stored_at: DateTime<Utc>,
    seen: Seen,
}

/// What a lookup found.
pub(crate) enum Lookup {
    Hit(Value),
    /// A miss, with its reason (a metric label).
    Miss(&'static str),
}

/// The query results cache.
pub(crate) struct QueryCache {
    entries: moka::future::Cache<String, Arc<Cached>>,
    ttl: chrono::Duration,
    clock: Arc<dyn Clock>,
    versions: Arc<Versions>,
}

impl QueryCache {
    pub(crate) fn new(
        config: QueryCacheConfig,
        clock: Arc<dyn Clock>,
        versions: Arc<Versions>,
    ) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(config.capacity)
                // Reclaims memory on the real clock; serving is decided on `clock` below.
                .time_to_live(config.ttl)
                .build(),
            ttl: chrono::Duration::from_std(config.ttl).unwrap_or(chrono::Duration::MAX),
            clock,
            versions,
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Lookup {
        let Some(cached) = self.entries.get(key).await else {
            return Lookup::Miss("absent");
        };
        let reason = if self.clock.now() - cached.stored_at >= self.ttl {
            "expired"
        } else if !self.versions.unchanged(&cached.seen) {
            "invalidated"
        } else {
            return Lookup::Hit(cached.value.clone());
        };
        self.entries.invalidate(key).await;
        Lookup::Miss(reason)
    }

    /// Caches `value`, computed by a handler that started when the versions were `seen`.
    pub(crate) async fn insert(&self, key: String, value: Value, seen: Seen) {
        let cached = Cached {
            value,
            stored_at: self.clock.now(),
            seen,
        };
        self.entries.insert(key, Arc::new(cached)).await;
    }

    /// The number of results held, after pending evictions.
    pub(crate) async fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks().await;
        self.entries.entry_count()
    }

    /// Forgets every result.
    pub(crate) fn clear(&self) {
        self.entries.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_move_only_their_tags() {
        let versions = Versions::default();
        let user_1 = [Tag::TypeInStream("user.renamed", "user-1")];
        let user_2 = [Tag::TypeInStream("user.renamed", "user-2")];
        let (seen_1, seen_2) = (versions.seen(&user_1), versions.seen(&user_2));
        let event = EventEnvelope::new("user.renamed", &1)
            .unwrap()
            .with_stream_id("user-1");
        versions.event_applied("users", &event);
        assert!(!versions.unchanged(&seen_1));
        // Distinct tags may share a slot by chance; these two do not.
        assert_ne!(user_1[0].slot(), user_2[0].slot());
        assert!(versions.unchanged(&seen_2));
    }
}
