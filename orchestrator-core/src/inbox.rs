//! Inboxes: the ids of the events a subscription has handled, so that a redelivery is
//! skipped — the de-duplication half of "exactly-once effect" on an at-least-once transport.
//!
//! An [`Inbox`] keeps, per consumer group (a subscription's name), the ids of the events
//! whose handler succeeded, within a [retention window](InboxRetention). The bus asks it
//! before calling a handler ([`seen`](Inbox::seen)) and tells it after the handler succeeded
//! ([`record`](Inbox::record)), then acknowledges the delivery.
//!
//! # What an inbox guarantees, and where it stops
//!
//! - An event whose handler succeeded **and** whose id was recorded is skipped when it is
//!   delivered to the same group again while its id is within the retention window.
//! - A crash (or a failed `record`) between the handler's success and the record means the
//!   event is handled once more when it is redelivered: the handler's own side effects are
//!   at-least-once, unless they are written in the same transaction as the id — which no
//!   backend here offers yet. Handlers whose effects are idempotent (an upsert keyed by the
//!   event id, say) get an exactly-once *effect*.
//! - A redelivery after the id left the window (older than [`InboxRetention::max_age`], or
//!   pushed out by [`InboxRetention::max_ids`] newer ids) is handled again.
//! - Two deliveries of one id handled *at the same time* (concurrency above 1, not ordered
//!   by key) may both run: the inbox de-duplicates redeliveries, it is not a lock.
//! - A [non-durable](Inbox::durable) inbox ([`InMemoryInbox`]) forgets everything when the
//!   process stops.
//!
//! Stores hand out the inbox that fits them through
//! [`EventStore::inbox`](crate::EventStore::inbox): files beside the embedded store's
//! segments, keys beside the Redis store's streams.
//!
//! ```
//! use orchestrator_core::inbox::{InMemoryInbox, Inbox, InboxRetention};
//! use orchestrator_core::EventId;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator_core::Result<()> {
//! let inbox = InMemoryInbox::new(InboxRetention::last(10_000));
//! let id = EventId::new();
//! assert!(!inbox.seen("billing", &id).await?);
//! inbox.record("billing", &id).await?; // after the handler succeeded
//! assert!(inbox.seen("billing", &id).await?);
//! assert!(!inbox.seen("shipping", &id).await?, "each group has its own ids");
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::clock::{Clock, SystemClock};
use crate::envelope::EventId;
use crate::error::{Error, Result};

/// The ids of the events each consumer group has handled, within a retention window; see
/// the [module docs](self) for what it guarantees.
///
/// Implementations: [`InMemoryInbox`] (not durable), `FileInbox` in `orchestrator-store`,
/// `RedisInbox` in `orchestrator-backends`. Every one passes the conformance suite of
/// `orchestrator_core::testkit::inbox` (feature `testkit`).
#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Where the ids are kept, for logs ("files under `/var/app/inbox`", …).
    fn describe(&self) -> String;

    /// Whether the ids survive a restart of the process.
    fn durable(&self) -> bool;

    /// How long ids are kept.
    fn retention(&self) -> InboxRetention;

    /// Whether `id` was recorded for `group` and is still within the retention window.
    ///
    /// An error (the backend is unreachable, the group name is invalid) says nothing either
    /// way; the bus then fails the attempt as retryable rather than risk a second handling.
    async fn seen(&self, group: &str, id: &EventId) -> Result<bool>;

    /// Records that `group` handled `id`. Recording an id already within the window
    /// changes nothing. Ids beyond the retention window may be dropped here.
    async fn record(&self, group: &str, id: &EventId) -> Result<()>;
}

/// How long an [`Inbox`] keeps ids: the newest `max_ids` per group, none older than
/// `max_age` — whichever bound is reached first. At least one bound is always set.
///
/// The default keeps the last 100,000 ids of each group, for at most 7 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxRetention {
    max_ids: Option<usize>,
    max_age: Option<Duration>,
}

impl Default for InboxRetention {
    fn default() -> Self {
        Self {
            max_ids: Some(100_000),
            max_age: Some(Duration::from_secs(7 * 24 * 60 * 60)),
        }
    }
}

impl InboxRetention {
    /// Keeps the newest `ids` ids of each group (at least 1), however old.
    pub fn last(ids: usize) -> Self {
        Self {
            max_ids: Some(ids.max(1)),
            max_age: None,
        }
    }

    /// Keeps ids recorded within `age` (at least 1 ms), however many.
    pub fn within(age: Duration) -> Self {
        Self {
            max_ids: None,
            max_age: Some(age.max(Duration::from_millis(1))),
        }
    }

    /// Also bounds the count: keeps at most the newest `ids` ids (at least 1).
    pub fn and_max_ids(mut self, ids: usize) -> Self {
        self.max_ids = Some(ids.max(1));
        self
    }

    /// Also bounds the age: forgets ids recorded more than `age` ago (at least 1 ms).
    pub fn and_max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age.max(Duration::from_millis(1)));
        self
    }

    /// How many ids of a group are kept at most, if bounded.
    pub fn max_ids(&self) -> Option<usize> {
        self.max_ids
    }

    /// How long an id is kept at most, if bounded.
    pub fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    /// The oldest record time still within the window at `now` (`None`: no age bound).
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let age = chrono::Duration::from_std(self.max_age?).ok()?;
        now.checked_sub_signed(age)
    }

    /// Whether an id recorded at `recorded` is past the age bound at `now`.
    pub fn expired(&self, recorded: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.cutoff(now).is_some_and(|cutoff| recorded < cutoff)
    }
}

/// Checks a group name for an inbox: non-empty, no control characters.
pub fn validate_group(group: &str) -> Result<()> {
    if group.is_empty() {
        return Err(Error::invalid("inbox group", "must not be empty"));
    }
    if group.chars().any(char::is_control) {
        return Err(Error::invalid(
            "inbox group",
            format!("{group:?} contains control characters"),
        ));
    }
    Ok(())
}

/// The ids one group recorded, newest last, trimmed to a retention window: the in-memory
/// index of [`InMemoryInbox`], and of inboxes that keep a log elsewhere and an index in
/// memory (the file inbox).
#[derive(Debug, Clone)]
pub struct RecentIds {
    retention: InboxRetention,
    at: HashMap<EventId, DateTime<Utc>>,
    order: VecDeque<(EventId, DateTime<Utc>)>,
}

impl RecentIds {
    /// An empty set kept to `retention`.
    pub fn new(retention: InboxRetention) -> Self {
        Self {
            retention,
            at: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether `id` is in the set and within the window at `now`.
    pub fn contains(&self, id: &EventId, now: DateTime<Utc>) -> bool {
        self.at
            .get(id)
            .is_some_and(|recorded| !self.retention.expired(*recorded, now))
    }

    /// Adds `id` recorded at `at`, after dropping what the window no longer holds at `at`.
    /// Returns false (and changes nothing else) when `id` is already in the window.
    pub fn insert(&mut self, id: EventId, at: DateTime<Utc>) -> bool {
        self.trim(at);
        if self.at.contains_key(&id) {
            return false;
        }
        self.at.insert(id.clone(), at);
        self.order.push_back((id, at));
        self.trim(at);
        true
    }

    /// Drops the ids beyond the count bound and those past the age bound at `now`.
    pub fn trim(&mut self, now: DateTime<Utc>) {
        while let Some((id, recorded)) = self.order.front() {
            let over = self
                .retention
                .max_ids
                .is_some_and(|max| self.order.len() > max);
            if !over && !self.retention.expired(*recorded, now) {
                break;
            }
            self.at.remove(id);
            self.order.pop_front();
        }
    }

    /// How many ids the set holds (some may have expired since the last trim).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The ids with their record times, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&EventId, DateTime<Utc>)> {
        self.order.iter().map(|(id, at)| (id, *at))
    }
}

/// An [`Inbox`] in the process's memory: **not durable** — it forgets everything when the
/// process stops, so it de-duplicates redeliveries within one run only (a transport's
/// retries, a relay publishing again after a failed publish), not those after a restart.
/// What the bus's `SubscriptionConfig::idempotent(window)` uses, and the facade's inbox for
/// stores that keep none.
#[derive(Debug)]
pub struct InMemoryInbox {
    retention: InboxRetention,
    clock: Arc<dyn Clock>,
    groups: Mutex<HashMap<String, RecentIds>>,
}

impl Default for InMemoryInbox {
    fn default() -> Self {
        Self::new(InboxRetention::default())
    }
}

impl InMemoryInbox {
    /// An empty inbox keeping ids to `retention`, on the system clock.
    pub fn new(retention: InboxRetention) -> Self {
        Self {
            retention,
            clock: Arc::new(SystemClock),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Takes record times (and so ages) from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<String, RecentIds>> {
        // Every critical section is a lookup or an insert with a bounded trim, none of
        // which can panic half-way; a poisoned lock still guards consistent sets.
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Inbox for InMemoryInbox {
    fn describe(&self) -> String {
        "in-memory inbox (not durable: forgotten when the process stops)".to_owned()
    }

    fn durable(&self) -> bool {
        false
    }

    fn retention(&self) -> InboxRetention {
        self.retention
    }

    async fn seen(&self, group: &str, id: &EventId) -> Result<bool> {
        validate_group(group)?;
        let now = self.clock.now();
        Ok(self
            .groups()
            .get(group)
            .is_some_and(|ids| ids.contains(id, now)))
    }

    async fn record(&self, group: &str, id: &EventId) -> Result<()> {
        validate_group(group)?;
        let now = self.clock.now();
        let mut groups = self.groups();
        match groups.get_mut(group) {
            Some(ids) => {
                ids.insert(id.clone(), now);
            }
            None => {
                let mut ids = RecentIds::new(self.retention);
                ids.insert(id.clone(), now);
                groups.insert(group.to_owned(), ids);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_keep_the_newest_within_the_count() {
        let mut ids = RecentIds::new(InboxRetention::last(2));
        let now = Utc::now();
        let all: Vec<EventId> = (0..3).map(|_| EventId::new()).collect();
        for id in &all {
            assert!(ids.insert(id.clone(), now));
        }
        assert!(!ids.contains(&all[0], now), "pushed out of the window");
        assert!(ids.contains(&all[1], now) && ids.contains(&all[2], now));
        assert_eq!(ids.len(), 2);
        assert!(!ids.insert(all[2].clone(), now), "already in the window");
    }

    #[test]
    fn recent_ids_expire_by_age() {
        let mut ids = RecentIds::new(InboxRetention::within(Duration::from_secs(10)));
        let start = Utc::now();
        let old = EventId::new();
        ids.insert(old.clone(), start);
        let later = start + chrono::Duration::seconds(11);
        assert!(!ids.contains(&old, later), "past its age");
        assert!(
            ids.insert(old.clone(), later),
            "an expired id is recorded anew"
        );
        assert!(ids.contains(&old, later));
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn group_names_are_checked() {
        assert!(validate_group("").is_err());
        assert!(validate_group("a\nb").is_err());
        assert!(validate_group("billing").is_ok());
    }
}
