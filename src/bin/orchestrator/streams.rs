//! `streams list|show`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use clap::Subcommand;
use orchestrator::core::{EventEnvelope, EventStore, ReadAll};
use serde_json::{Value, json};

use crate::output::{event_json, event_line, print_json, time};
use crate::remote::{self, Server};
use crate::{Access, CliResult, Context};

/// How many events one read of the store asks for.
pub(crate) const PAGE: usize = 1024;

#[derive(Debug, Subcommand)]
pub(crate) enum StreamsCommand {
    /// Every stream: how many events, its version, its event types, when it last changed.
    List,
    /// The events of one stream, in order.
    Show {
        /// The stream id (`order.placed`, `user-123`, `saga-<id>`, …).
        stream: String,
        /// Start at this stream version.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// What `streams list` knows of a stream.
struct StreamSummary {
    events: u64,
    version: u64,
    types: BTreeSet<String>,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
}

/// Calls `visit` with every stored event, in global order.
pub(crate) async fn for_each_event(
    store: &dyn EventStore,
    mut visit: impl FnMut(EventEnvelope),
) -> CliResult {
    let mut from = 1;
    loop {
        let page = store.read_all(ReadAll::from(from, PAGE)).await?;
        let next = page
            .last()
            .and_then(EventEnvelope::global_position)
            .map(|p| p + 1);
        let full = page.len() == PAGE;
        page.into_iter().for_each(&mut visit);
        match next {
            Some(next) if full => from = next,
            _ => return Ok(()),
        }
    }
}

pub(crate) async fn run(cx: &Context, command: StreamsCommand) -> CliResult {
    if let Some(server) = &cx.server {
        return through(cx, server, command).await;
    }
    let orchestrator = cx.connect(true, Access::Read).await?;
    let store = orchestrator.store().as_ref();
    match command {
        StreamsCommand::List => {
            let mut streams: BTreeMap<String, StreamSummary> = BTreeMap::new();
            for_each_event(store, |event| {
                let Some(stream) = event.stream_id() else {
                    return;
                };
                let summary = streams
                    .entry(stream.to_owned())
                    .or_insert_with(|| StreamSummary {
                        events: 0,
                        version: 0,
                        types: BTreeSet::new(),
                        first: event.time(),
                        last: event.time(),
                    });
                summary.events += 1;
                summary.version = summary.version.max(event.stream_version().unwrap_or(0));
                summary.types.insert(event.event_type().to_owned());
                summary.last = summary.last.max(event.time());
            })
            .await?;
            print_streams(cx, &streams)
        }
        StreamsCommand::Show {
            stream,
            from,
            limit,
        } => {
            let events = store.read_stream(&stream, from, limit).await?;
            print_stream(cx, &stream, from, &events)
        }
    }
}

/// How many streams, or events of a stream, one query through the server asks for (under
/// every server's page cap).
const SERVER_PAGE: usize = 100;

/// `streams` through the server's `streams` and `stream` queries.
async fn through(cx: &Context, server: &Server, command: StreamsCommand) -> CliResult {
    match command {
        StreamsCommand::List => {
            let mut streams = BTreeMap::new();
            let mut after: Option<String> = None;
            loop {
                let data = server
                    .query(
                        "query($first: Int, $after: String) { streams(first: $first, after: \
                         $after) { streams { id events version eventTypes firstEventAt \
                         lastEventAt } pageInfo { endCursor hasNextPage } } }",
                        json!({ "first": SERVER_PAGE, "after": after }),
                    )
                    .await?;
                let page = remote::field(server, &data, "streams")?;
                for value in remote::list(server, page, "streams")? {
                    let types = remote::list(server, value, "eventTypes")?
                        .iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect();
                    streams.insert(
                        remote::text(server, value, "id")?.to_owned(),
                        StreamSummary {
                            events: remote::number(server, value, "events")?,
                            version: remote::number(server, value, "version")?,
                            types,
                            first: remote::time(server, value, "firstEventAt")?,
                            last: remote::time(server, value, "lastEventAt")?,
                        },
                    );
                }
                let info = remote::field(server, page, "pageInfo")?;
                if info["hasNextPage"] != Value::Bool(true) {
                    break;
                }
                after = Some(remote::text(server, info, "endCursor")?.to_owned());
            }
            print_streams(cx, &streams)
        }
        StreamsCommand::Show {
            stream,
            from,
            limit,
        } => {
            let events = read_stream(server, &stream, from, limit).await?;
            print_stream(cx, &stream, from, &events)
        }
    }
}

/// Up to `limit` events of `stream` from version `from`, through the server.
pub(crate) async fn read_stream(
    server: &Server,
    stream: &str,
    from: u64,
    limit: usize,
) -> CliResult<Vec<EventEnvelope>> {
    let query = format!(
        "query($id: String!, $from: Int, $first: Int) {{ stream(id: $id, fromVersion: $from, \
         first: $first) {{ events {{ {} }} }} }}",
        remote::EVENT_FIELDS
    );
    let mut events: Vec<EventEnvelope> = Vec::new();
    let mut next = from.max(1);
    while events.len() < limit {
        let first = (limit - events.len()).min(SERVER_PAGE);
        let data = server
            .query(
                &query,
                json!({ "id": stream, "from": next, "first": first }),
            )
            .await?;
        let page = remote::list(server, remote::field(server, &data, "stream")?, "events")?;
        for value in page {
            let event = remote::event(server, value)?;
            next = event.stream_version().map_or(next + 1, |v| v + 1);
            events.push(event);
        }
        if page.len() < first {
            break;
        }
    }
    Ok(events)
}

fn print_streams(cx: &Context, streams: &BTreeMap<String, StreamSummary>) -> CliResult {
    if cx.json {
        let list: Vec<Value> = streams
            .iter()
            .map(|(stream, s)| {
                json!({
                    "stream": stream,
                    "events": s.events,
                    "version": s.version,
                    "event_types": s.types,
                    "first_event_at": time(s.first),
                    "last_event_at": time(s.last),
                })
            })
            .collect();
        return print_json(&Value::Array(list));
    }
    if streams.is_empty() {
        println!("no streams");
        return Ok(());
    }
    let width = streams.keys().map(String::len).max().unwrap_or(6).max(6);
    println!(
        "{:width$}  {:>7}  {:>7}  {:24}  EVENT TYPES",
        "STREAM", "EVENTS", "VERSION", "LAST EVENT"
    );
    for (stream, s) in streams {
        let types: Vec<&str> = s.types.iter().map(String::as_str).collect();
        println!(
            "{stream:width$}  {:>7}  {:>7}  {:24}  {}",
            s.events,
            s.version,
            time(s.last),
            types.join(", ")
        );
    }
    Ok(())
}

fn print_stream(cx: &Context, stream: &str, from: u64, events: &[EventEnvelope]) -> CliResult {
    if cx.json {
        let events = events
            .iter()
            .map(event_json)
            .collect::<CliResult<Vec<_>>>()?;
        return print_json(&Value::Array(events));
    }
    if events.is_empty() {
        println!("stream `{stream}` has no events from version {from}");
    }
    for event in events {
        println!("{}", event_line(event));
    }
    Ok(())
}
