//! `trace <correlation id>`: a request's causation tree in the terminal.
//!
//! The tree is rebuilt from the store: every event whose correlation id (or own id) is the
//! one asked for, placed under the event its causation id names; saga logs whose saga id is
//! the one asked for (saga records carry their saga id as correlation id) are shown step by
//! step. Times are offsets from the first event found. Through `--server`, the server's
//! `trace` query finds the events and the sagas, whose logs are read with `stream`.

use std::collections::{BTreeMap, HashMap, HashSet};

use clap::Args;
use orchestrator::core::EventEnvelope;
use orchestrator::saga::STREAM_PREFIX;
use serde_json::{Value, json};

use crate::output::{event_json, payload, print_json, time};
use crate::remote::{self, Server};
use crate::sagas::{millis, record_step};
use crate::streams::for_each_event;
use crate::{Access, CliResult, Context};

/// `trace <id>`.
#[derive(Debug, Args)]
pub(crate) struct TraceArgs {
    /// A correlation id, the id of the event that started a request, or a saga id.
    id: String,
}

/// The events of one trace, in global order, split into plain events and saga logs.
#[derive(Default)]
struct Found {
    events: Vec<EventEnvelope>,
    sagas: BTreeMap<String, Vec<EventEnvelope>>,
}

/// Whether `event` belongs to the trace of `wanted`.
fn in_trace(event: &EventEnvelope, wanted: &str) -> bool {
    event.correlation_id() == Some(wanted) || event.id().as_str() == wanted
}

impl Found {
    /// Files `event` under its saga, or with the plain events.
    fn add(&mut self, event: EventEnvelope) {
        match event
            .stream_id()
            .and_then(|s| s.strip_prefix(STREAM_PREFIX))
        {
            Some(saga) => self.sagas.entry(saga.to_owned()).or_default().push(event),
            None => self.events.push(event),
        }
    }
}

/// How many records of one saga's log a trace through the server reads at most.
const SAGA_LOG_LIMIT: usize = 100_000;

/// The trace's events and saga logs through the server: the `trace` query, then each
/// saga's log stream.
async fn found_through(server: &Server, wanted: &str) -> CliResult<Found> {
    let data = server
        .query(
            &format!(
                "query($id: String!) {{ trace(correlationId: $id) {{ nodes {{ event {{ {} }} }} \
                 sagaIds }} }}",
                remote::EVENT_FIELDS
            ),
            json!({ "id": wanted }),
        )
        .await?;
    let trace = remote::field(server, &data, "trace")?;
    let mut found = Found::default();
    for node in remote::list(server, trace, "nodes")? {
        found.add(remote::event(
            server,
            remote::field(server, node, "event")?,
        )?);
    }
    // Depth first from the server; in global order, as read from the store, here.
    found.events.sort_by_key(EventEnvelope::global_position);
    for saga in remote::list(server, trace, "sagaIds")? {
        let saga = saga
            .as_str()
            .ok_or_else(|| format!("a saga id of the trace is not a string: {saga}"))?;
        let log = crate::streams::read_stream(
            server,
            &format!("{STREAM_PREFIX}{saga}"),
            1,
            SAGA_LOG_LIMIT,
        )
        .await?;
        log.into_iter()
            .filter(|record| in_trace(record, wanted))
            .for_each(|record| found.add(record));
    }
    Ok(found)
}

pub(crate) async fn run(cx: &Context, args: TraceArgs) -> CliResult {
    let wanted = args
        .id
        .strip_prefix(STREAM_PREFIX)
        .unwrap_or(&args.id)
        .to_owned();
    let found = match &cx.server {
        Some(server) => found_through(server, &wanted).await?,
        None => {
            let orchestrator = cx.connect(true, Access::Read).await?;
            let mut found = Found::default();
            for_each_event(orchestrator.store().as_ref(), |event| {
                if in_trace(&event, &wanted) {
                    found.add(event);
                }
            })
            .await?;
            found
        }
    };
    let Some(start) = found
        .events
        .iter()
        .chain(found.sagas.values().flatten())
        .min_by_key(|e| e.time())
        .cloned()
    else {
        return Err(format!(
            "no event in the store has the correlation id or id `{}`, and no saga has it as id",
            args.id
        )
        .into());
    };

    let ids: HashSet<&str> = found.events.iter().map(|e| e.id().as_str()).collect();
    let mut children: HashMap<Option<&str>, Vec<&EventEnvelope>> = HashMap::new();
    for event in &found.events {
        let parent = event.causation_id().filter(|c| ids.contains(c));
        children.entry(parent).or_default().push(event);
    }
    if cx.json {
        let roots = nodes_json(&children, None, &start)?;
        let sagas: Vec<Value> = found
            .sagas
            .iter()
            .map(|(id, log)| saga_json(id, log, &start))
            .collect();
        return print_json(&json!({ "id": args.id, "events": roots, "sagas": sagas }));
    }
    println!(
        "trace {}: {} event(s), {} saga(s), from {}",
        args.id,
        found.events.len(),
        found.sagas.len(),
        time(start.time())
    );
    print_tree(&children, None, &start, "");
    for (id, log) in &found.sagas {
        print_saga(id, log, &start);
    }
    Ok(())
}

fn describe(event: &EventEnvelope, start: &EventEnvelope) -> String {
    let place = match (event.stream_id(), event.stream_version()) {
        (Some(stream), Some(version)) => format!(" [{stream}#{version}]"),
        _ => String::new(),
    };
    format!(
        "+{:.3} ms  {} {}{}  {}",
        millis(start, event),
        event.event_type(),
        event.id(),
        place,
        payload(event)
    )
}

fn print_tree(
    children: &HashMap<Option<&str>, Vec<&EventEnvelope>>,
    parent: Option<&str>,
    start: &EventEnvelope,
    indent: &str,
) {
    let Some(nodes) = children.get(&parent) else {
        return;
    };
    for (i, event) in nodes.iter().enumerate() {
        let last = i + 1 == nodes.len();
        let (branch, more) = match (parent, last) {
            (None, _) => ("", ""),
            (Some(_), true) => ("└─ ", "   "),
            (Some(_), false) => ("├─ ", "│  "),
        };
        println!("{indent}{branch}{}", describe(event, start));
        print_tree(
            children,
            Some(event.id().as_str()),
            start,
            &format!("{indent}{more}"),
        );
    }
}

fn nodes_json(
    children: &HashMap<Option<&str>, Vec<&EventEnvelope>>,
    parent: Option<&str>,
    start: &EventEnvelope,
) -> CliResult<Vec<Value>> {
    let Some(nodes) = children.get(&parent) else {
        return Ok(Vec::new());
    };
    nodes
        .iter()
        .map(|event| {
            Ok(json!({
                "offset_ms": millis(start, event),
                "event": event_json(event)?,
                "caused": nodes_json(children, Some(event.id().as_str()), start)?,
            }))
        })
        .collect()
}

/// The saga's name, from its `saga.started` record.
fn saga_name(log: &[EventEnvelope]) -> String {
    log.iter()
        .find_map(|r| {
            r.data::<Value>()
                .ok()?
                .get("saga")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn saga_json(id: &str, log: &[EventEnvelope], start: &EventEnvelope) -> Value {
    let mut previous = log.first();
    let steps: Vec<Value> = log
        .iter()
        .map(|record| {
            let step = json!({
                "type": record.event_type(),
                "step": record_step(record),
                "offset_ms": millis(start, record),
                "since_previous_ms": previous.map_or(0.0, |p| millis(p, record)),
            });
            previous = Some(record);
            step
        })
        .collect();
    json!({ "saga_id": id, "saga": saga_name(log), "log": steps })
}

fn print_saga(id: &str, log: &[EventEnvelope], start: &EventEnvelope) {
    println!("saga {} {id}", saga_name(log));
    let mut previous = log.first();
    for record in log {
        println!(
            "   +{:.3} ms  {:28} {:16} (+{:.3} ms)",
            millis(start, record),
            record.event_type(),
            record_step(record).unwrap_or_default(),
            previous.map_or(0.0, |p| millis(p, record))
        );
        previous = Some(record);
    }
}
