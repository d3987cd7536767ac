//! The bus's metrics, through the `metrics` facade (install any recorder to collect them).
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `orchestrator_bus_published_total` | counter | `event_type` |
//! | `orchestrator_bus_delivered_total` | counter | `event_type`, `subscription` |
//! | `orchestrator_bus_handler_errors_total` | counter | `event_type`, `subscription` |
//! | `orchestrator_bus_retries_total` | counter | `event_type`, `subscription` |
//! | `orchestrator_bus_dead_lettered_total` | counter | `event_type`, `subscription` |
//! | `orchestrator_bus_filtered_total` | counter | `event_type`, `subscription` |
//! | `orchestrator_bus_duplicates_total` | counter | `event_type`, `subscription` |
//! | `orchestrator_bus_handler_duration_seconds` | histogram | `event_type`, `subscription` |
//! | `orchestrator_bus_in_flight` | gauge | `subscription` |
//!
//! Handles are registered once per subscription and event type and cached, so the hot path
//! does not build label sets.

use crate::fasthash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use metrics::{Counter, Gauge, Histogram};

/// `orchestrator_bus_published_total`
pub const PUBLISHED: &str = "orchestrator_bus_published_total";
/// `orchestrator_bus_delivered_total`
pub const DELIVERED: &str = "orchestrator_bus_delivered_total";
/// `orchestrator_bus_handler_errors_total`
pub const HANDLER_ERRORS: &str = "orchestrator_bus_handler_errors_total";
/// `orchestrator_bus_retries_total`
pub const RETRIES: &str = "orchestrator_bus_retries_total";
/// `orchestrator_bus_dead_lettered_total`
pub const DEAD_LETTERED: &str = "orchestrator_bus_dead_lettered_total";
/// `orchestrator_bus_filtered_total`
pub const FILTERED: &str = "orchestrator_bus_filtered_total";
/// `orchestrator_bus_duplicates_total`
pub const DUPLICATES: &str = "orchestrator_bus_duplicates_total";
/// `orchestrator_bus_handler_duration_seconds`
pub const HANDLER_DURATION: &str = "orchestrator_bus_handler_duration_seconds";
/// `orchestrator_bus_in_flight`
pub const IN_FLIGHT: &str = "orchestrator_bus_in_flight";

/// Counts a skipped duplicate (the dedup middleware has no cached handles).
pub(crate) fn duplicate(subscription: &str, event_type: &str) {
    metrics::counter!(DUPLICATES, "event_type" => event_type.to_owned(), "subscription" => subscription.to_owned())
        .increment(1);
}

/// Publish counters by event type.
pub(crate) struct PublishMetrics {
    /// Unique to this bus in the process (keys the per-thread cache).
    id: u64,
    by_type: RwLock<FxHashMap<Arc<str>, Counter>>,
}

impl Default for PublishMetrics {
    fn default() -> Self {
        Self {
            id: NEXT_PUBLISH_METRICS_ID.fetch_add(1, Ordering::Relaxed),
            by_type: RwLock::default(),
        }
    }
}

/// Numbers [`PublishMetrics`] for the per-thread cache.
static NEXT_PUBLISH_METRICS_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The counter a thread used last: a publisher sending one type again and again skips
    /// the lock and the map.
    static LAST_PUBLISHED: std::cell::RefCell<Option<(u64, Arc<str>, Counter)>> =
        const { std::cell::RefCell::new(None) };
}

impl PublishMetrics {
    /// The counter of `event_type`. Types not seen before are first checked as topics by
    /// `check` (an error is returned as is): a type with a counter is a valid topic.
    pub(crate) fn counter(
        &self,
        event_type: &str,
        check: impl FnOnce(&str) -> orchestrator_core::Result<()>,
    ) -> orchestrator_core::Result<Counter> {
        let last = LAST_PUBLISHED.with(|last| {
            let last = last.borrow();
            let (id, cached, counter) = last.as_ref()?;
            (*id == self.id && crate::fasthash::same_str(cached, event_type))
                .then(|| counter.clone())
        });
        if let Some(counter) = last {
            return Ok(counter);
        }
        // The map only ever gains entries; a poisoned lock still holds valid handles.
        let known = self
            .by_type
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get_key_value(event_type)
            .map(|(k, c)| (Arc::clone(k), c.clone()));
        let (key, counter) = match known {
            Some(known) => known,
            None => {
                check(event_type)?;
                let counter = metrics::counter!(PUBLISHED, "event_type" => event_type.to_owned());
                // The interned string: the same address as the envelopes' type, so the
                // per-thread check above matches without comparing bytes.
                let key = orchestrator_core::intern_event_type(event_type);
                let mut map = self.by_type.write().unwrap_or_else(PoisonError::into_inner);
                if map.len() < MAX_TYPES {
                    map.insert(Arc::clone(&key), counter.clone());
                }
                (key, counter)
            }
        };
        LAST_PUBLISHED.with(|last| *last.borrow_mut() = Some((self.id, key, counter.clone())));
        Ok(counter)
    }
}

/// Caps how many event types' handles are cached, against unbounded label sets.
const MAX_TYPES: usize = 1024;

/// The handles of one subscription and event type.
pub(crate) struct Handles {
    pub(crate) delivered: Counter,
    pub(crate) errors: Counter,
    pub(crate) retries: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) filtered: Counter,
    pub(crate) duration: Histogram,
}

/// One subscription's metrics.
pub(crate) struct SubscriptionMetrics {
    subscription: String,
    pub(crate) in_flight: Gauge,
    by_type: Mutex<FxHashMap<Arc<str>, Arc<Handles>>>,
}

impl SubscriptionMetrics {
    pub(crate) fn new(subscription: &str) -> Self {
        Self {
            subscription: subscription.to_owned(),
            in_flight: metrics::gauge!(IN_FLIGHT, "subscription" => subscription.to_owned()),
            by_type: Mutex::new(FxHashMap::default()),
        }
    }

    pub(crate) fn for_type(&self, event_type: &str) -> Arc<Handles> {
        // The map only ever gains entries; a poisoned lock still holds valid handles.
        let mut map = self.by_type.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = map.get(event_type) {
            return Arc::clone(h);
        }
        let labels = [
            ("event_type", event_type.to_owned()),
            ("subscription", self.subscription.clone()),
        ];
        let handles = Arc::new(Handles {
            delivered: metrics::counter!(DELIVERED, &labels),
            errors: metrics::counter!(HANDLER_ERRORS, &labels),
            retries: metrics::counter!(RETRIES, &labels),
            dead_lettered: metrics::counter!(DEAD_LETTERED, &labels),
            filtered: metrics::counter!(FILTERED, &labels),
            duration: metrics::histogram!(HANDLER_DURATION, &labels),
        });
        if map.len() < MAX_TYPES {
            map.insert(Arc::from(event_type), Arc::clone(&handles));
        }
        handles
    }
}
