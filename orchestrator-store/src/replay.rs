//! Replay: stored events, again, to a handler or to any async sink.
//!
//! A [`Replay`] selects events — all of them, those of some types, from a position or a
//! time, up to a position or a time — reads them in pages from any [`EventStore`] and hands
//! them, in global order, to an [`EventHandler`] ([`Replay::to_handler`]) or to any async
//! function ([`Replay::to_sink`], e.g. one that publishes onto the bus). It returns how many
//! events it delivered, and reports progress after every page through an optional callback.
//!
//! A replay ends at the head position it saw when it started: events appended meanwhile are
//! not included (subscribe for those). Events of system streams (ids starting with
//! [`SYSTEM_STREAM_PREFIX`], such as projection checkpoints) are left out unless asked for.
//! The first error — from the store, the handler or the sink — stops the replay and is
//! returned; the progress reported until then says how far it got.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
//! use orchestrator_store::InMemoryEventStore;
//! use orchestrator_store::replay::Replay;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_core::Result<()> {
//! let store = InMemoryEventStore::new();
//! for n in 0..10 {
//!     let kind = if n % 2 == 0 { "order.placed" } else { "order.shipped" };
//!     store.append("orders", ExpectedVersion::Any, vec![EventEnvelope::new(kind, &n)?]).await?;
//! }
//! let progress = Arc::new(Mutex::new(Vec::new()));
//! let seen = progress.clone();
//! let mut placed = Vec::new();
//! let count = Replay::of_type("order.placed")
//!     .from_position(3)
//!     .on_progress(move |p| seen.lock().unwrap().push(p.position))
//!     .to_sink(&store, |event| {
//!         placed.push(event.data::<u32>().unwrap());
//!         async { Ok(()) }
//!     })
//!     .await?;
//! assert_eq!(count, 4);
//! assert_eq!(placed, [2, 4, 6, 8]);
//! assert_eq!(progress.lock().unwrap().last(), Some(&10));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use orchestrator_core::{
    Error, EventEnvelope, EventFilter, EventHandler, EventStore, ReadAll, Result,
};

/// Streams whose id starts with this are the library's own (projection checkpoints); replays
/// and projections leave them out by default.
pub const SYSTEM_STREAM_PREFIX: &str = "$";

/// Whether `event` belongs to a system stream.
pub fn is_system_event(event: &EventEnvelope) -> bool {
    event
        .stream_id()
        .is_some_and(|s| s.starts_with(SYSTEM_STREAM_PREFIX))
}

/// How far a replay has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayProgress {
    /// Events delivered so far.
    pub processed: u64,
    /// The global position the replay has looked at (delivered or filtered out) up to.
    pub position: u64,
    /// The position the replay ends at (the head when it started, or the upper bound).
    pub end_position: u64,
    /// Whether this is the last report.
    pub done: bool,
}

impl ReplayProgress {
    /// The fraction of the position range covered, from 0.0 to 1.0.
    pub fn fraction(&self, from_position: u64) -> f64 {
        let start = from_position.max(1);
        if self.end_position < start {
            return 1.0;
        }
        let span = (self.end_position - start + 1) as f64;
        (self.position.saturating_sub(start - 1) as f64 / span).clamp(0.0, 1.0)
    }
}

type ProgressFn = Arc<dyn Fn(&ReplayProgress) + Send + Sync>;

/// Which events to replay, and how; see the [module docs](self).
#[derive(Clone)]
pub struct Replay {
    from_position: u64,
    until_position: Option<u64>,
    filter: EventFilter,
    page_size: usize,
    system_streams: bool,
    progress: Option<ProgressFn>,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("from_position", &self.from_position)
            .field("until_position", &self.until_position)
            .field("filter", &self.filter)
            .field("page_size", &self.page_size)
            .field("system_streams", &self.system_streams)
            .finish_non_exhaustive()
    }
}

impl Default for Replay {
    fn default() -> Self {
        Self::all()
    }
}

impl Replay {
    /// Every event, from the start.
    pub fn all() -> Self {
        Self {
            from_position: 1,
            until_position: None,
            filter: EventFilter::all(),
            page_size: 1024,
            system_streams: false,
            progress: None,
        }
    }

    /// Every event of one type.
    pub fn of_type(event_type: impl Into<String>) -> Self {
        Self::all().event_type(event_type)
    }

    /// Also events of this type (the first call restricts the replay to it).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.filter = self.filter.event_type(event_type);
        self
    }

    /// Starts at this global position (inclusive).
    pub fn from_position(mut self, position: u64) -> Self {
        self.from_position = position.max(1);
        self
    }

    /// Stops after this global position (inclusive).
    pub fn until_position(mut self, position: u64) -> Self {
        self.until_position = Some(position);
        self
    }

    /// Only events whose time is at or after `time`.
    pub fn from_time(mut self, time: DateTime<Utc>) -> Self {
        self.filter = self.filter.from_time(time);
        self
    }

    /// Only events whose time is before `time` (exclusive, like [`EventFilter::to_time`]).
    pub fn until_time(mut self, time: DateTime<Utc>) -> Self {
        self.filter = self.filter.to_time(time);
        self
    }

    /// Replaces the filter (types, time range, stream prefix) with `filter`.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Reads this many events per page (1024 by default; at least 1).
    pub fn page_size(mut self, events: usize) -> Self {
        self.page_size = events.max(1);
        self
    }

    /// Includes events of system streams (see [`SYSTEM_STREAM_PREFIX`]).
    pub fn include_system_streams(mut self, include: bool) -> Self {
        self.system_streams = include;
        self
    }

    /// Calls `report` after every page and once at the end.
    pub fn on_progress(mut self, report: impl Fn(&ReplayProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(report));
        self
    }

    /// The first position replayed.
    pub fn start_position(&self) -> u64 {
        self.from_position
    }

    /// Replays onto `handler`; a handler error stops the replay as [`Error::Handler`].
    pub async fn to_handler<S, H>(&self, store: &S, handler: &H) -> Result<u64>
    where
        S: EventStore + ?Sized,
        H: EventHandler + ?Sized,
    {
        self.to_sink(store, |event| async move {
            handler.handle(event).await.map_err(Error::Handler)
        })
        .await
    }

    /// Replays onto any async function of an event (publishing to the bus, writing to
    /// another store, …); its first error stops the replay.
    pub async fn to_sink<S, F, Fut>(&self, store: &S, mut sink: F) -> Result<u64>
    where
        S: EventStore + ?Sized,
        F: FnMut(EventEnvelope) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let head = store.head_position().await?;
        let end = self.until_position.map_or(head, |u| u.min(head));
        let mut progress = ReplayProgress {
            processed: 0,
            position: self.from_position - 1,
            end_position: end,
            done: false,
        };
        let mut next = self.from_position;
        while next <= end {
            let page = store
                .read_all(ReadAll::from(next, self.page_size).filter(self.filter.clone()))
                .await?;
            let Some(last) = page.last().and_then(EventEnvelope::global_position) else {
                break;
            };
            for event in page {
                let position = event.global_position().unwrap_or(next);
                if position > end {
                    next = u64::MAX;
                    break;
                }
                progress.position = position;
                if !self.system_streams && is_system_event(&event) {
                    continue;
                }
                sink(event).await?;
                progress.processed += 1;
            }
            next = next.max(last.saturating_add(1));
            self.report(&progress);
        }
        progress.position = end.max(progress.position);
        progress.done = true;
        self.report(&progress);
        Ok(progress.processed)
    }

    fn report(&self, progress: &ReplayProgress) {
        if let Some(report) = &self.progress {
            report(progress);
        }
    }
}
