//! Projections: named read models fed from the global order, with a durable checkpoint kept
//! in the store itself.
//!
//! A [`Projection`] applies events; a [`ProjectionRunner`] feeds it. The runner
//!
//! 1. loads the checkpoint — the last event of the stream `$checkpoint-<name>` (see
//!    [`checkpoint_stream`]), so it works on **any** [`EventStore`](orchestrator_core::EventStore)
//!    — or the position the projection reports it has stored itself
//!    ([`Projection::stored_position`]), which wins;
//! 2. subscribes from the next position: the subscription delivers the stored events (catch
//!    up) and then new ones (live), with no gap and no duplicate at the hand-over, in
//!    position order, as every store's conformance suite checks — so appends racing the
//!    runner cannot make it skip an event; it also drops any event at or before the last
//!    one it applied, so nothing is applied twice within a run;
//! 3. applies each event, retrying failures per the [`RetryPolicy`]
//!    (on the injected [`Clock`]); a permanent failure, or one that
//!    outlasts the policy, **parks** the projection: it stops, its status shows
//!    [`ProjectionState::Parked`] with the failing event, the error and the attempts, and a
//!    restart begins with that event again;
//! 4. writes the checkpoint **after** applying: every [`ProjectionOptions::checkpoint_every`]
//!    events, whenever it has caught up (nothing more is ready), when parking and when
//!    stopped.
//!
//! Events of system streams (ids starting with `$`, checkpoints included) are never applied.
//!
//! # Delivery: at-least-once, or exactly-once with your help
//!
//! After a clean [`stop`](ProjectionHandle::stop), the checkpoint is the last event applied,
//! so a restart applies nothing twice. After a crash, the events applied since the last
//! checkpoint (fewer than `checkpoint_every`, plus the one being applied) are applied again:
//! **at-least-once**. Two ways to make that harmless:
//!
//! - make [`Projection::apply`] idempotent (an upsert keyed by the event id, say); or
//! - store `event.global_position()` in the same transaction as the projection's state,
//!   and return it from [`Projection::stored_position`]: the runner then resumes right
//!   after it, which is **exactly-once** as far as that state is concerned.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use async_trait::async_trait;
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, HandlerError};
//! use orchestrator_store::InMemoryEventStore;
//! use orchestrator_store::projection::{Projection, ProjectionRunner};
//!
//! #[derive(Default)]
//! struct OrderCount(Mutex<u64>);
//!
//! #[async_trait]
//! impl Projection for OrderCount {
//!     async fn apply(&self, _event: EventEnvelope) -> Result<(), HandlerError> {
//!         *self.0.lock().unwrap() += 1;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_core::Result<()> {
//! let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
//! let count = Arc::new(OrderCount::default());
//! let written = store
//!     .append("order-1", ExpectedVersion::Any, vec![EventEnvelope::new("order.placed", &1)?])
//!     .await?;
//! let handle = ProjectionRunner::new(store.clone(), "order-count", count.clone()).spawn();
//! handle.wait_for_position(written.last_position).await?;
//! let status = handle.stop().await;
//! assert_eq!((status.position, status.checkpoint), (1, 1));
//! assert_eq!(*count.0.lock().unwrap(), 1);
//! # Ok(())
//! # }
//! ```

mod checkpoint;
mod runner;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_core::{
    Clock, EventEnvelope, EventFilter, EventHandler, HandlerError, RetryPolicy, SystemClock,
};

pub use checkpoint::{CHECKPOINT_EVENT_TYPE, Checkpoints, checkpoint_stream, load_checkpoint};
pub use runner::{ProjectionHandle, ProjectionRunner};

/// A read model fed by a [`ProjectionRunner`].
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Applies one stored event (its `global_position()` is set). A retryable error is
    /// retried per the runner's policy; a permanent one parks the projection.
    async fn apply(&self, event: EventEnvelope) -> Result<(), HandlerError>;

    /// Forgets all state, before a rebuild. The default does nothing.
    async fn reset(&self) -> Result<(), HandlerError> {
        Ok(())
    }

    /// The global position of the last event whose effect the projection stored together
    /// with its state, if it keeps one (for exactly-once; see the [module docs](self)).
    /// The default, `None`, leaves it to the runner's checkpoint.
    async fn stored_position(&self) -> Result<Option<u64>, HandlerError> {
        Ok(None)
    }
}

/// Any [`EventHandler`] as a projection (no reset, no stored position).
#[derive(Debug, Clone)]
pub struct HandlerProjection<H>(pub H);

#[async_trait]
impl<H: EventHandler> Projection for HandlerProjection<H> {
    async fn apply(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        self.0.handle(event).await
    }
}

/// How a runner feeds its projection.
#[derive(Clone)]
#[non_exhaustive]
pub struct ProjectionOptions {
    /// Which events the projection sees (all by default).
    pub filter: EventFilter,
    /// How failures are retried before the projection parks.
    pub retry: RetryPolicy,
    /// The clock retry delays are slept on.
    pub clock: Arc<dyn Clock>,
    /// Write the checkpoint after this many events at most (100 by default; it is also
    /// written whenever the runner has caught up, parks or stops).
    pub checkpoint_every: u64,
}

impl fmt::Debug for ProjectionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionOptions")
            .field("filter", &self.filter)
            .field("retry", &self.retry)
            .field("clock", &self.clock)
            .field("checkpoint_every", &self.checkpoint_every)
            .finish()
    }
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        Self {
            filter: EventFilter::all(),
            retry: RetryPolicy::default(),
            clock: Arc::new(SystemClock),
            checkpoint_every: 100,
        }
    }
}

impl ProjectionOptions {
    /// Only events passing `filter`.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Retries failures with `policy`.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sleeps retry delays on `clock`.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Writes the checkpoint after at most `events` events (at least 1).
    pub fn checkpoint_every(mut self, events: u64) -> Self {
        self.checkpoint_every = events.max(1);
        self
    }
}

/// What a runner is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProjectionState {
    /// Loading the checkpoint.
    Starting,
    /// Applying stored events.
    CatchingUp,
    /// Caught up; applying new events as they come.
    Live,
    /// Waiting to retry a failed event.
    Retrying {
        /// Attempts made so far.
        attempt: u32,
        /// The last error.
        error: String,
    },
    /// Stopped at a failing event, shown in [`ProjectionStatus::parked`].
    Parked,
    /// Stopped by a store error (reading, subscribing or writing the checkpoint).
    Failed {
        /// The error.
        error: String,
    },
    /// Stopped on request.
    Stopped,
}

/// The event a projection parked on.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// The event.
    pub event: EventEnvelope,
    /// The last error.
    pub error: String,
    /// Whether the last error was retryable (the policy ran out) or permanent.
    pub retryable: bool,
    /// Attempts made.
    pub attempts: u32,
}

/// A runner's status, as [`ProjectionHandle::status`] shows it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// What it is doing.
    pub state: ProjectionState,
    /// The global position of the last event applied (or resumed after).
    pub position: u64,
    /// The position of the last checkpoint written.
    pub checkpoint: u64,
    /// Events applied by this run.
    pub applied: u64,
    /// The failing event, once parked (kept after a stop).
    pub parked: Option<Box<ParkedEvent>>,
}

impl ProjectionStatus {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: ProjectionState::Starting,
            position: 0,
            checkpoint: 0,
            applied: 0,
            parked: None,
        }
    }

    /// Whether the runner has ended (parked, failed or stopped).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.state,
            ProjectionState::Parked | ProjectionState::Failed { .. } | ProjectionState::Stopped
        )
    }
}
