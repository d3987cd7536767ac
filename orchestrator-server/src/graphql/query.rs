//! The query root.

use std::collections::{BTreeMap, BTreeSet};

use async_graphql::{Context, InputObject, Object};
use chrono::{DateTime, Utc};
use orchestrator::core::{DeadLetterQuery, EventEnvelope, EventFilter, ReadAll, TopicPattern};
use orchestrator::saga::{STREAM_PREFIX, SagaId};
use orchestrator::store::projection::{CHECKPOINT_EVENT_TYPE, checkpoint_stream};

use super::error::{ApiError, ApiResult};
use super::tree::causation_tree;
use super::types::{
    DeadLetterInfo, Event, EventPage, PageInfo, ProjectionInfo, RelayInfo, SagaDetail, SagaState,
    SagaSummary, SchemaInfo, StreamEvents, StreamPage, StreamSummary, SystemInfo, Trace,
};
use super::{ApiState, relay_state_name};

/// How many events one read of the store asks for when a query scans.
const SCAN_PAGE: usize = 512;
/// The most events one `events` query looks at before it returns what it found (with
/// `hasNextPage` and a cursor to go on from), so that a filter matching nothing cannot make
/// one request read the whole store.
const SCAN_BUDGET: usize = 20_000;
/// The most records of one saga's log `saga` reads.
const SAGA_LOG_LIMIT: usize = 10_000;

/// Which events `events` returns; every field is optional and they combine with AND.
#[derive(InputObject, Default)]
pub(crate) struct EventsFilter {
    /// Event types or patterns (`order.placed`, `order.*`, `order.#`); an event matching
    /// any of them passes.
    types: Option<Vec<String>>,
    /// Only events of this stream.
    stream: Option<String>,
    /// Only events of streams whose id starts with this.
    stream_prefix: Option<String>,
    /// Only events at or after this time.
    from_time: Option<DateTime<Utc>>,
    /// Only events before this time.
    to_time: Option<DateTime<Utc>>,
    /// Only events with this correlation id.
    correlation_id: Option<String>,
}

/// The queries.
pub(crate) struct QueryRoot;

/// Read access to the orchestrator: events, streams, sagas, dead letters, traces, schemas,
/// the relay.
#[Object(name = "Query")]
impl QueryRoot {
    /// Events in global order, filtered, a page at a time: pass the previous page's
    /// `pageInfo.endCursor` as `after`. `first` defaults to 50 and may not exceed the
    /// server's maximum (`system.maxPageSize`; over it: `PAGE_TOO_LARGE`).
    async fn events(
        &self,
        ctx: &Context<'_>,
        filter: Option<EventsFilter>,
        first: Option<u64>,
        after: Option<String>,
    ) -> ApiResult<EventPage> {
        let state = ctx.data_unchecked::<ApiState>();
        let first = state.page_size(first)?;
        let after = parse_cursor(after.as_deref())?;
        let filter = filter.unwrap_or_default();
        let patterns = filter
            .types
            .iter()
            .flatten()
            .map(|p| {
                TopicPattern::parse(p)
                    .map_err(|e| ApiError::BadInput(format!("event type pattern `{p}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut store_filter = EventFilter::all();
        // The store filters exact types itself; patterns are matched here.
        if !patterns.is_empty() && patterns.iter().all(TopicPattern::is_exact) {
            for pattern in &patterns {
                store_filter = store_filter.event_type(pattern.as_str());
            }
        }
        store_filter.from_time = filter.from_time;
        store_filter.to_time = filter.to_time;
        store_filter.stream_prefix = filter.stream.clone().or(filter.stream_prefix.clone());
        let matches = |event: &EventEnvelope| {
            (patterns.is_empty() || patterns.iter().any(|p| p.matches(event.event_type())))
                && filter
                    .stream
                    .as_deref()
                    .is_none_or(|s| event.stream_id() == Some(s))
                && filter
                    .stream_prefix
                    .as_deref()
                    .is_none_or(|p| event.stream_id().is_some_and(|s| s.starts_with(p)))
                && filter
                    .correlation_id
                    .as_deref()
                    .is_none_or(|c| event.correlation_id() == Some(c))
        };

        // When the store's filter is the whole filter, one more than a page tells whether
        // another follows; otherwise read larger batches, as some events will be skipped.
        let filtered_here = (!patterns.is_empty() && store_filter.event_types.is_empty())
            || filter.stream.is_some()
            || filter.correlation_id.is_some();
        let read = if filtered_here {
            (first + 1).max(SCAN_PAGE)
        } else {
            first + 1
        };
        let store = state.orchestrator.store();
        let mut events = Vec::new();
        let mut last_seen = after;
        let mut scanned = 0;
        let has_next_page = 'scan: loop {
            let from = last_seen.map_or(1, |p| p + 1);
            let page = store
                .read_all(ReadAll::from(from, read).filter(store_filter.clone()))
                .await
                .map_err(ApiError::backend)?;
            let full = page.len() == read;
            for event in page {
                let position = event.global_position();
                if matches(&event) {
                    if events.len() == first {
                        // One more than asked for: there is a next page, starting here.
                        break 'scan true;
                    }
                    events.push(Event(event));
                }
                last_seen = position.or(last_seen);
                scanned += 1;
            }
            if !full {
                break false;
            }
            if scanned >= SCAN_BUDGET {
                break true;
            }
        };
        Ok(EventPage {
            events,
            page_info: PageInfo {
                end_cursor: last_seen.map(|p| p.to_string()),
                has_next_page,
            },
        })
    }

    /// The event at a global position, if there is one.
    async fn event_at(&self, ctx: &Context<'_>, position: u64) -> ApiResult<Option<Event>> {
        let store = ctx.data_unchecked::<ApiState>().orchestrator.store();
        let page = store
            .read_all(ReadAll::from(position, 1))
            .await
            .map_err(ApiError::backend)?;
        Ok(page
            .into_iter()
            .find(|e| e.global_position() == Some(position))
            .map(Event))
    }

    /// The event with this id, if the store has it (a scan of the store: prefer `eventAt`
    /// when the position is known).
    async fn event(&self, ctx: &Context<'_>, id: String) -> ApiResult<Option<Event>> {
        let state = ctx.data_unchecked::<ApiState>();
        let mut found = None;
        for_each_event(state, |event| {
            if event.id().as_str() == id {
                found = Some(event);
                return false;
            }
            true
        })
        .await?;
        Ok(found.map(Event))
    }

    /// Every stream, by id, a page at a time (`after`: the previous page's `endCursor`).
    async fn streams(
        &self,
        ctx: &Context<'_>,
        first: Option<u64>,
        after: Option<String>,
    ) -> ApiResult<StreamPage> {
        let state = ctx.data_unchecked::<ApiState>();
        let first = state.page_size(first)?;
        let mut streams: BTreeMap<String, StreamSummary> = BTreeMap::new();
        for_each_event(state, |event| {
            let Some(stream) = event.stream_id() else {
                return true;
            };
            if after.as_deref().is_some_and(|after| stream <= after) {
                return true;
            }
            let summary = streams
                .entry(stream.to_owned())
                .or_insert_with(|| StreamSummary {
                    id: stream.to_owned(),
                    events: 0,
                    version: 0,
                    event_types: Vec::new(),
                    first_event_at: event.time(),
                    last_event_at: event.time(),
                });
            summary.events += 1;
            summary.version = summary.version.max(event.stream_version().unwrap_or(0));
            if !summary.event_types.iter().any(|t| t == event.event_type()) {
                summary.event_types.push(event.event_type().to_owned());
            }
            summary.last_event_at = summary.last_event_at.max(event.time());
            true
        })
        .await?;
        let has_next_page = streams.len() > first;
        let streams: Vec<StreamSummary> = streams
            .into_values()
            .take(first)
            .map(|mut s| {
                s.event_types.sort();
                s
            })
            .collect();
        let end_cursor = streams.last().map(|s| s.id.clone()).or(after);
        Ok(StreamPage {
            streams,
            page_info: PageInfo {
                end_cursor,
                has_next_page,
            },
        })
    }

    /// One stream's version and events, from `fromVersion` (default 1).
    async fn stream(
        &self,
        ctx: &Context<'_>,
        id: String,
        from_version: Option<u64>,
        first: Option<u64>,
    ) -> ApiResult<StreamEvents> {
        let state = ctx.data_unchecked::<ApiState>();
        let first = state.page_size(first)?;
        let store = state.orchestrator.store();
        let version = store
            .stream_version(&id)
            .await
            .map_err(|e| ApiError::BadInput(e.to_string()))?;
        let events = store
            .read_stream(&id, from_version.unwrap_or(1).max(1), first)
            .await
            .map_err(ApiError::backend)?;
        Ok(StreamEvents {
            id,
            version,
            events: events.into_iter().map(Event).collect(),
        })
    }

    /// Every saga logged in the store, oldest first.
    async fn sagas(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Only sagas that have not finished.")] unfinished: Option<bool>,
    ) -> ApiResult<Vec<SagaSummary>> {
        let state = ctx.data_unchecked::<ApiState>();
        let stored = state
            .orchestrator
            .sagas()
            .list_stored()
            .await
            .map_err(ApiError::backend)?;
        Ok(stored
            .into_iter()
            .filter(|s| !unfinished.unwrap_or(false) || s.finished.is_none())
            .map(|s| {
                let (status, status_name) = match s.finished {
                    Some(status) => (SagaState::of(status.as_str()), status.as_str().to_owned()),
                    None => (SagaState::Unfinished, "unfinished".to_owned()),
                };
                SagaSummary {
                    id: s.id.to_string(),
                    saga: s.saga,
                    status,
                    status_name,
                    started_at: s.started_at,
                }
            })
            .collect())
    }

    /// One saga (by id, or by its log stream `saga-<id>`): status, steps with timings,
    /// failure, compensations.
    async fn saga(&self, ctx: &Context<'_>, id: String) -> ApiResult<Option<SagaDetail>> {
        let state = ctx.data_unchecked::<ApiState>();
        let id: SagaId = id
            .parse()
            .map_err(|e| ApiError::BadInput(format!("saga id `{id}`: {e}")))?;
        let snapshot = match state.orchestrator.sagas().load(id).await {
            Ok(snapshot) => snapshot,
            Err(orchestrator::saga::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(ApiError::backend(error).into()),
        };
        let log = state
            .orchestrator
            .store()
            .read_stream(&id.stream(), 1, SAGA_LOG_LIMIT)
            .await
            .map_err(ApiError::backend)?;
        Ok(Some(SagaDetail::new(snapshot, &log)))
    }

    /// Dead letters, oldest first, optionally of one event type or subscription.
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        event_type: Option<String>,
        subscription: Option<String>,
        offset: Option<u64>,
        first: Option<u64>,
    ) -> ApiResult<Vec<DeadLetterInfo>> {
        let state = ctx.data_unchecked::<ApiState>();
        let query = DeadLetterQuery {
            event_type,
            subscription,
            offset: usize::try_from(offset.unwrap_or(0)).unwrap_or(usize::MAX),
            limit: state.page_size(first)?,
        };
        let letters = state
            .orchestrator
            .dead_letters()
            .list(&query)
            .await
            .map_err(ApiError::backend)?;
        Ok(letters.into_iter().map(DeadLetterInfo).collect())
    }

    /// One dead letter, with its failure and attempt count.
    async fn dead_letter(
        &self,
        ctx: &Context<'_>,
        id: String,
    ) -> ApiResult<Option<DeadLetterInfo>> {
        let state = ctx.data_unchecked::<ApiState>();
        let letter = state
            .orchestrator
            .dead_letters()
            .queue()
            .get(&id)
            .await
            .map_err(ApiError::backend)?;
        Ok(letter.map(DeadLetterInfo))
    }

    /// The causation tree of a correlation id (or of the request an event id started):
    /// every event carrying it, placed under the event that caused it.
    async fn trace(&self, ctx: &Context<'_>, correlation_id: String) -> ApiResult<Trace> {
        let state = ctx.data_unchecked::<ApiState>();
        let mut events = Vec::new();
        let mut sagas = BTreeSet::new();
        for_each_event(state, |event| {
            let matches = event.correlation_id() == Some(correlation_id.as_str())
                || event.id().as_str() == correlation_id;
            if matches {
                match event
                    .stream_id()
                    .and_then(|s| s.strip_prefix(STREAM_PREFIX))
                {
                    Some(saga) => {
                        sagas.insert(saga.to_owned());
                    }
                    None => events.push(event),
                }
            }
            true
        })
        .await?;
        Ok(Trace {
            correlation_id,
            nodes: causation_tree(events),
            saga_ids: sagas.into_iter().collect(),
        })
    }

    /// Every event type with a registered schema, and its versions.
    async fn schemas(&self, ctx: &Context<'_>) -> Vec<SchemaInfo> {
        let state = ctx.data_unchecked::<ApiState>();
        state
            .orchestrator
            .schemas()
            .event_types()
            .into_iter()
            .map(|(event_type, versions)| SchemaInfo {
                event_type,
                latest_version: *versions.end(),
                versions: versions.collect(),
            })
            .collect()
    }

    /// The readers of the global log that checkpoint in the store (projections run by a
    /// `ProjectionRunner`, the outbox relay): each one's last checkpoint and how far it is
    /// behind the store's head.
    async fn projections(&self, ctx: &Context<'_>) -> ApiResult<Vec<ProjectionInfo>> {
        let store = ctx.data_unchecked::<ApiState>().orchestrator.store();
        let filter = EventFilter::all()
            .event_type(CHECKPOINT_EVENT_TYPE)
            .stream_prefix(checkpoint_stream(""));
        let mut latest: BTreeMap<String, (u64, DateTime<Utc>)> = BTreeMap::new();
        let mut from = 1;
        loop {
            let page = store
                .read_all(ReadAll::from(from, SCAN_PAGE).filter(filter.clone()))
                .await
                .map_err(ApiError::backend)?;
            let full = page.len() == SCAN_PAGE;
            for event in &page {
                let Ok(checkpoint) = event.data::<serde_json::Value>() else {
                    continue;
                };
                let name = checkpoint["projection"].as_str();
                let position = checkpoint["position"].as_u64();
                if let (Some(name), Some(position)) = (name, position) {
                    latest.insert(name.to_owned(), (position, event.time()));
                }
            }
            match page.last().and_then(EventEnvelope::global_position) {
                Some(last) if full => from = last + 1,
                _ => break,
            }
        }
        let head = store.head_position().await.map_err(ApiError::backend)?;
        Ok(latest
            .into_iter()
            .map(|(name, (checkpoint, at))| ProjectionInfo {
                name,
                checkpoint,
                lag: head.saturating_sub(checkpoint),
                checkpointed_at: at,
            })
            .collect())
    }

    /// What the outbox relay is doing, and how far it is behind the store.
    async fn relay(&self, ctx: &Context<'_>) -> ApiResult<RelayInfo> {
        let state = ctx.data_unchecked::<ApiState>();
        let status = state.orchestrator.relay_status();
        let head = state
            .orchestrator
            .store()
            .head_position()
            .await
            .map_err(ApiError::backend)?;
        Ok(RelayInfo {
            state: relay_state_name(&status.state).to_owned(),
            relayed_position: status.relayed_position,
            checkpoint: status.checkpoint,
            head_position: head,
            lag: head.saturating_sub(status.relayed_position),
            dead_lettered: status.dead_lettered,
            leased: status.lease.is_some(),
        })
    }

    /// The store and transport behind this server, and its limits.
    async fn system(&self, ctx: &Context<'_>) -> ApiResult<SystemInfo> {
        let state = ctx.data_unchecked::<ApiState>();
        let store = state.orchestrator.store();
        Ok(SystemInfo {
            store: store.name().to_owned(),
            durable: store.capabilities().durable,
            transport: state.orchestrator.transport().name().to_owned(),
            head_position: store.head_position().await.map_err(ApiError::backend)?,
            dead_letters: state
                .orchestrator
                .dead_letters()
                .count()
                .await
                .map_err(ApiError::backend)? as u64,
            read_only: state.read_only,
            max_page_size: state.max_page_size as u64,
        })
    }
}

/// A cursor is the decimal global position of the last event looked at.
fn parse_cursor(cursor: Option<&str>) -> Result<Option<u64>, ApiError> {
    cursor
        .map(|c| {
            c.parse::<u64>().map_err(|_| {
                ApiError::BadInput(format!(
                    "`after: \"{c}\"` is not a cursor: pass a `pageInfo.endCursor` of an earlier page"
                ))
            })
        })
        .transpose()
}

/// Calls `visit` with every stored event in global order, until it returns `false`; fails
/// with `SCAN_LIMIT` rather than read more than the server's `max_scan` events.
async fn for_each_event(
    state: &ApiState,
    mut visit: impl FnMut(EventEnvelope) -> bool,
) -> ApiResult<()> {
    let store = state.orchestrator.store();
    let mut from = 1;
    let mut scanned = 0usize;
    loop {
        let page = store
            .read_all(ReadAll::from(from, SCAN_PAGE))
            .await
            .map_err(ApiError::backend)?;
        let full = page.len() == SCAN_PAGE;
        let next = page
            .last()
            .and_then(EventEnvelope::global_position)
            .map(|p| p + 1);
        for event in page {
            if scanned == state.max_scan {
                return Err(ApiError::ScanLimit {
                    max: state.max_scan,
                }
                .into());
            }
            scanned += 1;
            if !visit(event) {
                return Ok(());
            }
        }
        match next {
            Some(next) if full => from = next,
            _ => return Ok(()),
        }
    }
}
