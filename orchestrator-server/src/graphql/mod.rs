//! The GraphQL API: schema, state, mutations.

mod error;
mod query;
mod subscription;
mod tree;
mod types;

use async_graphql::{Context, Json, Object, Schema};
use chrono::{DateTime, Utc};
use orchestrator::core::{EventEnvelope, TopicPattern};
use orchestrator::{EventOrchestrator, RelayState, ReplayFilter};
use serde_json::Value;

use self::error::{ApiError, ApiResult};
use self::query::QueryRoot;
use self::subscription::SubscriptionRoot;
use self::types::{DeadLetterInfo, PublishedEvent};
use crate::config::ServerConfig;

/// The page size when `first` is not given (capped by the server's maximum).
const DEFAULT_PAGE: usize = 50;

/// The schema this server serves.
pub(crate) type ApiSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// What the resolvers read: the orchestrator and the server's limits.
pub(crate) struct ApiState {
    pub(crate) orchestrator: EventOrchestrator,
    pub(crate) read_only: bool,
    pub(crate) max_page_size: usize,
    pub(crate) subscription_window: u64,
    pub(crate) max_scan: usize,
}

impl ApiState {
    /// `first` checked against the cap, or the default page size.
    pub(crate) fn page_size(&self, first: Option<u64>) -> Result<usize, ApiError> {
        let Some(first) = first else {
            return Ok(DEFAULT_PAGE.min(self.max_page_size));
        };
        match usize::try_from(first) {
            Ok(0) => Err(ApiError::BadInput("`first` must be at least 1".to_owned())),
            Ok(first) if first <= self.max_page_size => Ok(first),
            _ => Err(ApiError::PageTooLarge {
                asked: usize::try_from(first).unwrap_or(usize::MAX),
                max: self.max_page_size,
            }),
        }
    }
}

/// The schema over `orchestrator`, with `config`'s limits.
pub(crate) fn schema(orchestrator: EventOrchestrator, config: &ServerConfig) -> ApiSchema {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(ApiState {
            orchestrator,
            read_only: config.read_only,
            max_page_size: config.max_page_size,
            subscription_window: config.subscription_window,
            max_scan: config.max_scan,
        })
        .limit_depth(config.max_depth)
        .limit_complexity(config.max_complexity)
        .finish()
}

/// The schema in GraphQL SDL, as checked in at `orchestrator-server/schema.graphql`.
///
/// ```
/// let sdl = orchestrator_server::schema_sdl();
/// assert!(sdl.contains("reprocessDeadLetter"));
/// ```
pub fn schema_sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .finish()
        .sdl()
}

/// The name of a relay state, as the API and `/readyz` report it.
pub(crate) fn relay_state_name(state: &RelayState) -> &'static str {
    match state {
        RelayState::Idle => "idle",
        RelayState::Standby => "standby",
        RelayState::Relaying => "relaying",
        RelayState::Retrying(_) => "retrying",
        RelayState::Stopped => "stopped",
        _ => "unknown",
    }
}

/// The mutations.
pub(crate) struct MutationRoot;

/// Changes: publishing an event, replaying stored events, and the dead-letter queue's
/// reprocess and discard (each refused with `READ_ONLY` on a read-only server).
#[Object(name = "Mutation")]
impl MutationRoot {
    /// Publishes an event through the orchestrator, as `EventOrchestrator::publish` does:
    /// validated against its registered schema, appended to `stream` (default: the stream
    /// named after its type), then delivered to subscribers by the outbox relay. Returns
    /// once it is stored.
    async fn publish_event(
        &self,
        ctx: &Context<'_>,
        #[graphql(name = "type", desc = "The event type, dot-separated: `order.placed`.")]
        event_type: String,
        #[graphql(desc = "The payload.")] data: Json<Value>,
        #[graphql(desc = "The stream to append to.")] stream: Option<String>,
        #[graphql(desc = "The correlation id (none: the event starts a causation tree).")]
        correlation_id: Option<String>,
        #[graphql(desc = "The id of the event (or command) that caused this one.")]
        causation_id: Option<String>,
    ) -> ApiResult<PublishedEvent> {
        let state = writable(ctx)?;
        let mut event = EventEnvelope::new(&event_type, &data.0)
            .map_err(|e| ApiError::BadInput(e.to_string()))?;
        if let Some(stream) = &stream {
            event = event.with_stream_id(stream.clone());
        }
        if let Some(id) = correlation_id {
            event = event.with_correlation_id(id);
        }
        if let Some(id) = causation_id {
            event = event.with_causation_id(id);
        }
        let id = state
            .orchestrator
            .publish(event)
            .await
            .map_err(|error| match error {
                orchestrator::Error::Core(
                    error @ orchestrator::core::Error::InvalidInput { .. },
                ) => ApiError::BadInput(error.to_string()),
                error => ApiError::backend(error),
            })?;
        tracing::info!(event = %id, event_type = %event_type, "event published through the server");
        Ok(PublishedEvent {
            id: id.to_string(),
            stream: stream.unwrap_or_else(|| event_type.clone()),
            event_type,
        })
    }

    /// Delivers stored events again to the transport's subscribers, in global order
    /// (`EventOrchestrator::replay_events`): those of `types` (exact event types; none:
    /// every event) stored at or after `fromTime` and before `toTime`. Returns how many
    /// were delivered once they all were.
    async fn replay_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Only events of these types.")] types: Option<Vec<String>>,
        #[graphql(desc = "Only events at or after this time.")] from_time: Option<DateTime<Utc>>,
        #[graphql(desc = "Only events before this time.")] to_time: Option<DateTime<Utc>>,
    ) -> ApiResult<u64> {
        let state = writable(ctx)?;
        let mut filter = ReplayFilter::all();
        for event_type in types.into_iter().flatten() {
            match TopicPattern::parse(&event_type) {
                Ok(pattern) if pattern.is_exact() => {}
                _ => {
                    return Err(ApiError::BadInput(format!(
                        "`{event_type}` is not an event type: replay takes exact types \
                         (`order.placed`), not patterns"
                    ))
                    .into());
                }
            }
            filter = filter.and_event_type(event_type);
        }
        if let Some(from) = from_time {
            filter = filter.from_time(from);
        }
        if let Some(to) = to_time {
            filter = filter.to_time(to);
        }
        let replayed = state
            .orchestrator
            .replay_events(filter)
            .await
            .map_err(ApiError::backend)?;
        tracing::info!(replayed, "events replayed through the server");
        Ok(replayed)
    }

    /// Delivers a dead letter's event again to the subscription that failed it (attempt
    /// count reset) and removes it from the queue. Returns the letter as it was.
    async fn reprocess_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: String,
    ) -> ApiResult<DeadLetterInfo> {
        let state = writable(ctx)?;
        let dead_letters = state.orchestrator.dead_letters();
        let letter = dead_letters
            .queue()
            .get(&id)
            .await
            .map_err(ApiError::backend)?
            .ok_or_else(|| ApiError::NotFound(format!("dead letter `{id}`")))?;
        dead_letters
            .reprocess(&id)
            .await
            .map_err(ApiError::backend)?;
        tracing::info!(dead_letter = %id, subscription = %letter.subscription, "dead letter reprocessed through the server");
        Ok(DeadLetterInfo(letter))
    }

    /// Removes a dead letter for good. Returns it.
    async fn discard_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: String,
    ) -> ApiResult<DeadLetterInfo> {
        let state = writable(ctx)?;
        let dead_letters = state.orchestrator.dead_letters();
        if dead_letters
            .queue()
            .get(&id)
            .await
            .map_err(ApiError::backend)?
            .is_none()
        {
            return Err(ApiError::NotFound(format!("dead letter `{id}`")).into());
        }
        let letter = dead_letters.discard(&id).await.map_err(ApiError::backend)?;
        tracing::info!(dead_letter = %id, subscription = %letter.subscription, "dead letter discarded through the server");
        Ok(DeadLetterInfo(letter))
    }
}

/// The state, unless the server is read-only.
fn writable<'a>(ctx: &Context<'a>) -> Result<&'a ApiState, ApiError> {
    let state = ctx.data_unchecked::<ApiState>();
    if state.read_only {
        return Err(ApiError::ReadOnly);
    }
    Ok(state)
}
