//! Temporal queries: what a stream, or a projection, looked like at a point in the past.
//!
//! A point is an [`AsOf`]: a global position (every event at or before it) or a time
//! (every event whose own time is at or before it). State is folded from the events with an
//! [`Aggregate`] or any function, so no state needs to have been kept for that point.
//!
//! - [`stream_state_at`] / [`fold_stream`]: one stream's state.
//! - [`fold_all`]: a read-model's state over the global order (any filter), as a pure fold.
//! - [`projection_state_at`]: resets a [`Projection`] and
//!   replays into it up to the point, for read models kept elsewhere.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
//! use orchestrator_store::InMemoryEventStore;
//! use orchestrator_store::temporal::{Aggregate, AsOf, stream_state_at};
//!
//! #[derive(Default)]
//! struct Balance(i64);
//! impl Aggregate for Balance {
//!     fn apply(&mut self, event: &EventEnvelope) -> orchestrator_core::Result<()> {
//!         self.0 += event.data::<i64>()?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_core::Result<()> {
//! let store = InMemoryEventStore::new();
//! for amount in [100, -30, 50] {
//!     store.append("account-1", ExpectedVersion::Any,
//!         vec![EventEnvelope::new("account.moved", &amount)?]).await?;
//! }
//! let then = stream_state_at::<Balance>(&store, "account-1", AsOf::Position(2)).await?;
//! assert_eq!((then.state.0, then.version), (70, 2));
//! let now = stream_state_at::<Balance>(&store, "account-1", AsOf::Latest).await?;
//! assert_eq!(now.state.0, 120);
//! # Ok(())
//! # }
//! ```

use chrono::{DateTime, Utc};
use orchestrator_core::{Error, EventEnvelope, EventFilter, EventStore, ReadAll, Result};

use crate::projection::Projection;
use crate::replay::{Replay, is_system_event};

/// How many events a fold reads per call to the store.
const PAGE: usize = 1024;

/// A point in a store's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Every event up to and including this global position.
    Position(u64),
    /// Every event whose time is at or before this time.
    Time(DateTime<Utc>),
    /// Every event stored now.
    Latest,
}

impl AsOf {
    /// Whether `event` (a stored one) belongs to the history up to this point.
    pub fn includes(&self, event: &EventEnvelope) -> bool {
        match self {
            Self::Position(p) => event.global_position().is_some_and(|e| e <= *p),
            Self::Time(t) => event.time() <= *t,
            Self::Latest => true,
        }
    }
}

/// State built by applying events one by one; used by temporal queries and snapshots.
pub trait Aggregate: Default + Send {
    /// The version of the state's shape. Bump it when the state's fields change, so that
    /// snapshots of the old shape are ignored rather than misread.
    const STATE_VERSION: u32 = 1;

    /// Applies one event; an error stops the fold.
    fn apply(&mut self, event: &EventEnvelope) -> Result<()>;
}

/// The result of a fold.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Folded<S> {
    /// The state.
    pub state: S,
    /// The events applied.
    pub events: u64,
    /// The stream version of the last event applied (0: none; for [`fold_all`], 0).
    pub version: u64,
    /// The global position of the last event applied (0: none).
    pub position: u64,
}

impl<S> Folded<S> {
    /// A fold that has applied nothing yet.
    pub fn new(state: S) -> Self {
        Self {
            state,
            events: 0,
            version: 0,
            position: 0,
        }
    }

    fn record(&mut self, event: &EventEnvelope) {
        self.events += 1;
        self.version = event.stream_version().unwrap_or(self.version);
        self.position = event.global_position().unwrap_or(self.position);
    }
}

/// The state of `stream` as of `as_of`, folded with the [`Aggregate`] `A`.
pub async fn stream_state_at<A: Aggregate>(
    store: &(impl EventStore + ?Sized),
    stream: &str,
    as_of: AsOf,
) -> Result<Folded<A>> {
    fold_stream(
        store,
        stream,
        1,
        as_of,
        Folded::new(A::default()),
        |state: &mut A, event| state.apply(event),
    )
    .await
}

/// Folds the events of `stream` from version `from_version` that are part of `as_of` into
/// `folded`, in stream order. (Used with `from_version` past a snapshot's version to
/// continue from it.)
pub async fn fold_stream<S, F>(
    store: &(impl EventStore + ?Sized),
    stream: &str,
    from_version: u64,
    as_of: AsOf,
    mut folded: Folded<S>,
    mut apply: F,
) -> Result<Folded<S>>
where
    F: FnMut(&mut S, &EventEnvelope) -> Result<()>,
{
    let mut next = from_version.max(1);
    loop {
        let page = store.read_stream(stream, next, PAGE).await?;
        let Some(last) = page.last().and_then(EventEnvelope::stream_version) else {
            return Ok(folded);
        };
        for event in &page {
            if let AsOf::Position(p) = as_of
                && event.global_position().is_some_and(|e| e > p)
            {
                // A stream's positions only grow: nothing later can be included.
                return Ok(folded);
            }
            if as_of.includes(event) {
                apply(&mut folded.state, event)?;
                folded.record(event);
            }
        }
        next = last + 1;
    }
}

/// Folds every event matching `filter` (system streams left out) that is part of `as_of`,
/// in global order: a read model's state at that point.
pub async fn fold_all<S, F>(
    store: &(impl EventStore + ?Sized),
    filter: EventFilter,
    as_of: AsOf,
    init: S,
    mut apply: F,
) -> Result<Folded<S>>
where
    F: FnMut(&mut S, &EventEnvelope) -> Result<()>,
{
    let head = store.head_position().await?;
    let end = match as_of {
        AsOf::Position(p) => p.min(head),
        AsOf::Time(_) | AsOf::Latest => head,
    };
    let mut folded = Folded::new(init);
    let mut next = 1;
    while next <= end {
        let page = store
            .read_all(ReadAll::from(next, PAGE).filter(filter.clone()))
            .await?;
        let Some(last) = page.last().and_then(EventEnvelope::global_position) else {
            break;
        };
        for event in &page {
            if event.global_position().is_some_and(|p| p > end) {
                return Ok(folded);
            }
            if as_of.includes(event) && !is_system_event(event) {
                apply(&mut folded.state, event)?;
                folded.record(event);
            }
        }
        next = last + 1;
    }
    Ok(folded)
}

/// Resets `projection` and replays into it every event matching `filter` up to `as_of`
/// (system streams left out): the projection then holds its state as of that point.
/// Returns how many events it applied.
pub async fn projection_state_at<P: Projection + ?Sized>(
    store: &(impl EventStore + ?Sized),
    projection: &P,
    filter: EventFilter,
    as_of: AsOf,
) -> Result<u64> {
    projection.reset().await.map_err(Error::Handler)?;
    let mut filter = filter;
    let mut replay = Replay::all();
    match as_of {
        AsOf::Position(p) => replay = replay.until_position(p),
        AsOf::Time(t) => {
            // `to_time` is exclusive; as-of times include events at that very instant.
            let to = t + chrono::Duration::nanoseconds(1);
            filter.to_time = Some(filter.to_time.map_or(to, |mine| mine.min(to)));
        }
        AsOf::Latest => {}
    }
    let replay = replay.filter(filter);
    replay
        .to_sink(store, |event| async move {
            projection.apply(event).await.map_err(Error::Handler)
        })
        .await
}
