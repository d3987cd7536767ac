//! The subscription root: live events over WebSocket (graphql-transport-ws).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::{Context, Result, Subscription};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt as _};
use orchestrator::bus::DeadLetters;
use orchestrator::core::{
    DeadLetter, DeadLetterQuery, EventEnvelope, EventFilter, EventStore, EventStream, TopicPattern,
};
use orchestrator::saga::{STREAM_PREFIX, SagaId};

use super::ApiState;
use super::error::ApiError;
use super::types::{DeadLetterInfo, Event, SagaUpdate};

/// How often, at most, a live subscription compares its position with the store's head
/// when fewer than half a window of events went by.
const LAG_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The subscriptions.
pub(crate) struct SubscriptionRoot;

/// Live data over WebSocket (`/graphql/ws`, protocol graphql-transport-ws).
#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// Stored events whose type matches one of `types` (patterns: `order.*`, `order.#`;
    /// none: every event), in global order: from `fromPosition` (the events already
    /// stored first, then new ones as they are stored, with no gap and no duplicate at the
    /// hand-over), or, without it, only events stored from now on.
    ///
    /// A client that falls more than the server's window behind the store's head once it
    /// has caught up gets an error with the code `SLOW_CONSUMER` (and the position to
    /// resume from), and the subscription ends.
    async fn events(
        &self,
        ctx: &Context<'_>,
        types: Option<Vec<String>>,
        from_position: Option<u64>,
    ) -> Result<impl Stream<Item = Result<Event>>> {
        let patterns = types
            .iter()
            .flatten()
            .map(|p| {
                TopicPattern::parse(p)
                    .map_err(|e| ApiError::BadInput(format!("event type pattern `{p}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let follow = Follow::start(ctx, EventFilter::all(), patterns, from_position).await?;
        Ok(follow.stream().map(|item| item.map(Event)))
    }

    /// Saga transitions as they are logged (started, step completed, retrying, failed,
    /// compensation, finished with its status), of every saga or of the one `sagaId`
    /// names, from `fromPosition` or from now on; bounded like `events`.
    async fn saga_updates(
        &self,
        ctx: &Context<'_>,
        saga_id: Option<String>,
        from_position: Option<u64>,
    ) -> Result<impl Stream<Item = Result<SagaUpdate>>> {
        let prefix = match saga_id {
            Some(id) => id
                .parse::<SagaId>()
                .map_err(|e| ApiError::BadInput(format!("saga id `{id}`: {e}")))?
                .stream(),
            None => STREAM_PREFIX.to_owned(),
        };
        let filter = EventFilter::all().stream_prefix(prefix);
        let follow = Follow::start(ctx, filter, Vec::new(), from_position).await?;
        Ok(follow
            .stream()
            .map(|item| item.map(|record| SagaUpdate::new(&record))))
    }

    /// Dead letters as they are parked, oldest first: those parked from now on, and with
    /// `since`, those already parked whose last failure was at or after it. The queue has
    /// no change feed, so the server lists it every `pollMs` milliseconds (default 1000, at
    /// least 50) and sends what is new; a queue longer than the server's scan limit is seen
    /// up to it.
    async fn dead_letter_arrivals(
        &self,
        ctx: &Context<'_>,
        since: Option<DateTime<Utc>>,
        poll_ms: Option<u64>,
    ) -> Result<impl Stream<Item = Result<DeadLetterInfo>>> {
        let state = ctx.data_unchecked::<ApiState>();
        let dead_letters = state.orchestrator.dead_letters();
        let seen = DeadLetterWatch::list(&dead_letters, state.max_scan)
            .await?
            .into_iter()
            .filter(|letter| since.is_none_or(|since| letter.last_failure_at < since))
            .map(|letter| letter.id)
            .collect();
        let every = poll_ms.map_or(DEFAULT_DLQ_POLL, Duration::from_millis);
        let mut ticker = tokio::time::interval(every.max(MIN_DLQ_POLL));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watch = DeadLetterWatch {
            dead_letters,
            seen,
            arrived: VecDeque::new(),
            ticker,
            max: state.max_scan,
            ended: false,
        };
        Ok(futures::stream::unfold(watch, |mut watch| async move {
            let item = watch.next().await?;
            Some((item, watch))
        }))
    }
}

/// The fastest a `deadLetterArrivals` subscription may poll.
const MIN_DLQ_POLL: Duration = Duration::from_millis(50);
/// How often a `deadLetterArrivals` subscription polls unless told otherwise.
const DEFAULT_DLQ_POLL: Duration = Duration::from_secs(1);

/// Dead letters parked after a `deadLetterArrivals` subscription began, found by polling:
/// the queue has no change feed.
struct DeadLetterWatch {
    dead_letters: DeadLetters,
    /// The ids listed at the last poll: what is not among them is new.
    seen: HashSet<String>,
    arrived: VecDeque<DeadLetter>,
    ticker: tokio::time::Interval,
    max: usize,
    ended: bool,
}

impl DeadLetterWatch {
    async fn list(dead_letters: &DeadLetters, max: usize) -> Result<Vec<DeadLetter>> {
        let query = DeadLetterQuery {
            limit: max,
            ..DeadLetterQuery::default()
        };
        Ok(dead_letters.list(&query).await.map_err(ApiError::backend)?)
    }

    async fn next(&mut self) -> Option<Result<DeadLetterInfo>> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(letter) = self.arrived.pop_front() {
                return Some(Ok(DeadLetterInfo(letter)));
            }
            self.ticker.tick().await;
            let letters = match Self::list(&self.dead_letters, self.max).await {
                Ok(letters) => letters,
                Err(error) => {
                    self.ended = true;
                    return Some(Err(error));
                }
            };
            let mut seen = HashSet::with_capacity(letters.len());
            for letter in letters {
                seen.insert(letter.id.clone());
                if !self.seen.contains(&letter.id) {
                    self.arrived.push_back(letter);
                }
            }
            self.seen = seen;
        }
    }
}

/// One client's subscription: the store's catch-up-then-live stream, filtered, watched for
/// lag.
struct Follow {
    events: EventStream,
    store: Arc<dyn EventStore>,
    patterns: Vec<TopicPattern>,
    window: u64,
    /// The head when the subscription began: once past it, the client is live.
    caught_up_at: u64,
    live: bool,
    since_check: u64,
    checked_at: Instant,
    ended: bool,
}

impl Follow {
    /// Subscribes to the store from `from_position`, or from the event after the head.
    async fn start(
        ctx: &Context<'_>,
        filter: EventFilter,
        patterns: Vec<TopicPattern>,
        from_position: Option<u64>,
    ) -> Result<Self> {
        let state = ctx.data_unchecked::<ApiState>();
        let store = Arc::clone(state.orchestrator.store());
        let head = store.head_position().await.map_err(ApiError::backend)?;
        let events = store
            .subscribe(from_position.unwrap_or(head + 1), filter)
            .await
            .map_err(ApiError::backend)?;
        Ok(Self {
            events,
            store,
            patterns,
            window: state.subscription_window,
            caught_up_at: head,
            live: false,
            since_check: 0,
            checked_at: Instant::now(),
            ended: false,
        })
    }

    /// The matching events, then the error that ended the subscription, if one did.
    fn stream(self) -> impl Stream<Item = Result<EventEnvelope>> {
        futures::stream::unfold(self, |mut follow| async move {
            let item = follow.next().await?;
            Some((item, follow))
        })
    }

    /// The next matching event, the error that ends the subscription, or `None` once it
    /// ended.
    async fn next(&mut self) -> Option<Result<EventEnvelope>> {
        if self.ended {
            return None;
        }
        loop {
            let event = match self.events.next().await? {
                Ok(event) => event,
                Err(error) => {
                    self.ended = true;
                    return Some(Err(ApiError::backend(error).into()));
                }
            };
            let position = event.global_position().unwrap_or(0);
            if let Some(error) = self.lag(position).await {
                self.ended = true;
                return Some(Err(error.into()));
            }
            if self.matches(&event) {
                return Some(Ok(event));
            }
        }
    }

    fn matches(&self, event: &EventEnvelope) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(event.event_type()))
    }

    /// `SLOW_CONSUMER` when the client, live, is more than the window behind the head.
    /// Catching up is not falling behind: those events are read from the store at the
    /// client's pace, and nothing is buffered for it.
    async fn lag(&mut self, position: u64) -> Option<ApiError> {
        if !self.live {
            self.live = position >= self.caught_up_at;
            return None;
        }
        self.since_check += 1;
        if self.since_check < (self.window / 2).max(1)
            && self.checked_at.elapsed() < LAG_CHECK_INTERVAL
        {
            return None;
        }
        self.since_check = 0;
        self.checked_at = Instant::now();
        let head = match self.store.head_position().await {
            Ok(head) => head,
            Err(error) => return Some(ApiError::backend(error)),
        };
        let behind = head.saturating_sub(position);
        (behind > self.window).then_some(ApiError::SlowConsumer {
            behind,
            window: self.window,
            resume_from: position,
        })
    }
}
