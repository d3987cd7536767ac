//! Replaying stored events to the current subscribers.

use chrono::{DateTime, Utc};
use orchestrator_core::EventFilter;
use orchestrator_store::replay::{Replay, ReplayProgress};
use tracing::Instrument as _;

use super::EventOrchestrator;

/// A progress callback of a replay.
type OnProgress = Box<dyn Fn(&ReplayProgress) + Send + Sync>;
use crate::error::Result;

/// Which stored events [`EventOrchestrator::replay_events`] delivers again.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use orchestrator::prelude::*;
///
/// // Every `order.completed` of the last hour.
/// let filter = ReplayFilter::event_type("order.completed")
///     .from_time(SystemTime::now() - Duration::from_secs(3600));
/// // A plain event type works too: `replay_events("user.created")`.
/// let all_users: ReplayFilter = "user.created".into();
/// # let _ = (filter, all_users);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayFilter {
    filter: EventFilter,
    from_position: u64,
    until_position: Option<u64>,
}

impl ReplayFilter {
    /// Every stored event (saga logs excepted, unless their types are named).
    pub fn all() -> Self {
        Self::default()
    }

    /// Every stored event of `event_type`.
    pub fn event_type(event_type: impl Into<String>) -> Self {
        Self::all().and_event_type(event_type)
    }

    /// Also events of `event_type`.
    pub fn and_event_type(mut self, event_type: impl Into<String>) -> Self {
        self.filter = self.filter.event_type(event_type);
        self
    }

    /// Only events whose time is at or after `time` (a [`std::time::SystemTime`] or a
    /// `chrono::DateTime<Utc>`).
    pub fn from_time(mut self, time: impl Into<DateTime<Utc>>) -> Self {
        self.filter = self.filter.from_time(time.into());
        self
    }

    /// Only events whose time is before `time` (exclusive).
    pub fn to_time(mut self, time: impl Into<DateTime<Utc>>) -> Self {
        self.filter = self.filter.to_time(time.into());
        self
    }

    /// Only events of streams whose id starts with `prefix`.
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.filter = self.filter.stream_prefix(prefix);
        self
    }

    /// Starts at this global position (inclusive).
    pub fn from_position(mut self, position: u64) -> Self {
        self.from_position = position;
        self
    }

    /// Stops after this global position (inclusive).
    pub fn until_position(mut self, position: u64) -> Self {
        self.until_position = Some(position);
        self
    }

    /// The store's [`Replay`] for this filter.
    pub fn to_replay(&self) -> Replay {
        let replay = Replay::all()
            .filter(self.filter.clone())
            .from_position(self.from_position);
        match self.until_position {
            Some(position) => replay.until_position(position),
            None => replay,
        }
    }

    /// Whether `event` is a saga-log record this filter did not ask for by type.
    fn skips(&self, event: &orchestrator_core::EventEnvelope) -> bool {
        event
            .stream_id()
            .is_some_and(|s| s.starts_with(orchestrator_saga::STREAM_PREFIX))
            && orchestrator_saga::LOG_EVENT_TYPES.contains(&event.event_type())
            && !self
                .filter
                .event_types
                .iter()
                .any(|t| t == event.event_type())
    }
}

impl From<&str> for ReplayFilter {
    fn from(event_type: &str) -> Self {
        Self::event_type(event_type)
    }
}

impl From<String> for ReplayFilter {
    fn from(event_type: String) -> Self {
        Self::event_type(event_type)
    }
}

impl EventOrchestrator {
    /// Delivers the stored events `filter` selects again, in global order, to the current
    /// subscribers (through the transport, so every consumer group subscribed to their
    /// types gets them, in this process or another); returns how many were delivered.
    ///
    /// Events keep their ids, positions and trace context, so handlers (and the bus's
    /// idempotent consumer) can tell a replay from a new event. Events appended while the
    /// replay runs are not included; saga logs are left out unless the filter names their
    /// types.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use orchestrator::prelude::*;
    /// use serde_json::json;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator::Result<()> {
    /// let orchestrator = EventOrchestrator::new();
    /// orchestrator.publish_event("order.completed", json!({"order_id": "o-1"})).await?;
    /// let replayed = orchestrator
    ///     .replay_events(
    ///         ReplayFilter::event_type("order.completed")
    ///             .from_time(SystemTime::now() - Duration::from_secs(3600)),
    ///     )
    ///     .await?;
    /// assert_eq!(replayed, 1);
    /// # Ok(()) }
    /// ```
    pub async fn replay_events(&self, filter: impl Into<ReplayFilter>) -> Result<u64> {
        self.replay(filter.into(), None).await
    }

    /// [`replay_events`](Self::replay_events), reporting progress after every page read.
    pub async fn replay_events_with_progress(
        &self,
        filter: impl Into<ReplayFilter>,
        progress: impl Fn(&ReplayProgress) + Send + Sync + 'static,
    ) -> Result<u64> {
        let progress: OnProgress = Box::new(progress);
        self.replay(filter.into(), Some(progress)).await
    }

    async fn replay(&self, filter: ReplayFilter, progress: Option<OnProgress>) -> Result<u64> {
        let mut replay = filter.to_replay();
        if let Some(progress) = progress {
            replay = replay.on_progress(move |p| progress(p));
        }
        let span = tracing::info_span!("orchestrator.replay", filter = ?filter.filter);
        let mut delivered = 0;
        replay
            .to_sink(self.store.as_ref(), |event| {
                let skip = filter.skips(&event);
                if !skip {
                    delivered += 1;
                }
                let bus = &self.bus;
                async move {
                    if !skip {
                        bus.publish(event).await?;
                    }
                    Ok(())
                }
            })
            .instrument(span)
            .await?;
        Ok(delivered)
    }
}
