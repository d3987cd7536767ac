//! `tail`, `publish` and `replay`.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use orchestrator::bus::SubscriptionConfig;
use orchestrator::connect::Backend;
use orchestrator::core::{EventEnvelope, EventFilter, HandlerError, TopicPattern};
use orchestrator::store::FileEventStore;
use orchestrator::store::replay::is_system_event;
use orchestrator::{EventOrchestrator, ReplayFilter};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::output::{event_json, event_line, print_json};
use crate::remote::{self, Server};
use crate::{Access, CliResult, Context, time};

/// `tail <pattern>`.
#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// The event type or pattern: `user.created`, `user.*`, `order.#`, `#` for everything.
    pattern: String,
    /// Start with the events already stored (when tailing the store, or through --server).
    #[arg(long)]
    from_start: bool,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// The consumer group to tail as, when tailing a broker transport: a durable group that
    /// outlives this command and resumes where it stopped. Without it the tail is
    /// ephemeral: its group is removed when the command ends (or, if it is killed, by the
    /// broker after a while). Not through --server, whose subscriptions read the store.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
}

/// `publish <type> <json>`.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The event type, dot-separated: `user.created`.
    event_type: String,
    /// The payload, as JSON: '{"user_id": "123"}'.
    data: String,
    /// The stream to append to (default: the stream named after the event type).
    #[arg(long)]
    stream: Option<String>,
    /// The correlation id (default: none, so the event starts a causation tree).
    #[arg(long)]
    correlation_id: Option<String>,
    /// The id of the event (or command) that caused this one.
    #[arg(long)]
    causation_id: Option<String>,
}

/// `replay --type T --from TIME`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Only events of this type (repeat for several; none: every event).
    #[arg(long = "type", value_name = "TYPE")]
    event_types: Vec<String>,
    /// Only events at or after this time: RFC 3339, a date, or a span ago (`2h`, `7d`).
    #[arg(long, value_name = "TIME", value_parser = time::parse)]
    from: Option<chrono::DateTime<chrono::Utc>>,
    /// Only events before this time.
    #[arg(long, value_name = "TIME", value_parser = time::parse)]
    to: Option<chrono::DateTime<chrono::Utc>>,
}

/// How long `publish` waits for the relay to put the event on a broker.
const RELAY_WAIT: Duration = Duration::from_secs(15);

pub(crate) async fn publish(cx: &Context, args: PublishArgs) -> CliResult {
    let data: Value = serde_json::from_str(&args.data)
        .map_err(|e| format!("the event data is not valid JSON: {e}"))?;
    let mut event = EventEnvelope::new(&args.event_type, &data)?;
    if let Some(stream) = args.stream {
        event = event.with_stream_id(stream);
    }
    if let Some(id) = args.correlation_id {
        event = event.with_correlation_id(id);
    }
    if let Some(id) = args.causation_id {
        event = event.with_causation_id(id);
    }
    if let Some(server) = &cx.server {
        return publish_through(cx, server, &event).await;
    }
    let orchestrator = cx.connect(true, Access::Write).await?;
    let id = event.id().clone();
    let delivered = if cx.relays(Access::Write) {
        // Stored first; then on the broker before this process exits, unless another
        // process relays this store (it holds the relay's lease) and publishes it.
        match tokio::time::timeout(RELAY_WAIT, orchestrator.publish_and_wait(event)).await {
            Ok(published) => {
                published?;
                "on the transport"
            }
            Err(_) if orchestrator.relay_status().state == orchestrator::RelayState::Standby => {
                "stored; another process relays this store and publishes it"
            }
            Err(_) => {
                return Err(format!(
                    "event {id} is stored, but was not on the transport after {RELAY_WAIT:?}: \
                     {:?}; it is published when this store's relay next runs",
                    orchestrator.relay_status()
                )
                .into());
            }
        }
    } else {
        orchestrator.publish(event).await?;
        "stored; the application's relay delivers it to its subscribers"
    };
    orchestrator.shutdown(Duration::from_secs(5)).await;
    if cx.json {
        print_json(
            &json!({ "id": id.to_string(), "type": args.event_type, "outcome": delivered }),
        )?;
    } else {
        println!("published {} {id} ({delivered})", args.event_type);
    }
    Ok(())
}

/// `publish` through the server: its orchestrator stores the event, and its relay delivers
/// it.
async fn publish_through(cx: &Context, server: &Server, event: &EventEnvelope) -> CliResult {
    let data: Value = event.data()?;
    let published = server
        .query(
            "mutation($type: String!, $data: JSON!, $stream: String, $correlationId: String, \
             $causationId: String) { publishEvent(type: $type, data: $data, stream: $stream, \
             correlationId: $correlationId, causationId: $causationId) { id type stream } }",
            json!({
                "type": event.event_type(),
                "data": data,
                "stream": event.stream_id(),
                "correlationId": event.correlation_id(),
                "causationId": event.causation_id(),
            }),
        )
        .await?;
    let published = remote::field(server, &published, "publishEvent")?;
    let id = remote::text(server, published, "id")?;
    let outcome = "stored by the server's orchestrator; its relay delivers it to subscribers";
    if cx.json {
        print_json(&json!({ "id": id, "type": event.event_type(), "outcome": outcome }))
    } else {
        println!("published {} {id} ({outcome})", event.event_type());
        Ok(())
    }
}

pub(crate) async fn tail(cx: &Context, args: TailArgs) -> CliResult {
    let pattern = TopicPattern::parse(&args.pattern)?;
    if let Some(server) = &cx.server {
        return tail_through(cx, server, &args, &pattern).await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<EventEnvelope>();
    let mut printed = 0;
    let limit = args.count.unwrap_or(u64::MAX);
    if cx.in_process_transport() {
        // Nothing else publishes on this process's transport: follow the store.
        let orchestrator = follow_store(cx).await?;
        let store = orchestrator.store();
        let from = if args.from_start {
            0
        } else {
            store.head_position().await? + 1
        };
        if !cx.json {
            eprintln!(
                "tailing `{}` in the store{} (Ctrl-C to stop)",
                args.pattern,
                if args.from_start {
                    " from the start"
                } else {
                    ""
                }
            );
        }
        let mut events = store.subscribe(from, EventFilter::all()).await?;
        while printed < limit {
            let Some(event) = events.next().await else {
                break;
            };
            let event = event?;
            if is_system_event(&event) || !pattern.matches(event.event_type()) {
                continue;
            }
            print_event(cx, &event)?;
            printed += 1;
        }
        return Ok(());
    }
    let orchestrator = cx.connect(false, Access::Read).await?;
    let config = match &args.group {
        Some(group) => SubscriptionConfig::new(&args.pattern).named(group.clone()),
        None => SubscriptionConfig::new(&args.pattern)
            .named(format!(
                "orchestrator-cli-tail-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ))
            .ephemeral(),
    };
    let group = config.given_name().unwrap_or_default().to_owned();
    if !cx.json {
        eprintln!(
            "tailing `{}` on {} as group `{group}` (Ctrl-C to stop)",
            args.pattern,
            orchestrator.transport().name()
        );
    }
    let _subscription = orchestrator
        .subscribe_with(config, move |event: EventEnvelope| {
            let tx = tx.clone();
            async move {
                tx.send(event)
                    .map_err(|_| HandlerError::retryable("the tail has stopped"))
            }
        })
        .await?;
    while printed < limit {
        let Some(event) = rx.recv().await else {
            break;
        };
        print_event(cx, &event)?;
        printed += 1;
    }
    Ok(())
}

/// `tail` through the server: its `events` subscription, from the event after the head
/// (or from the start), catching up and then live.
async fn tail_through(
    cx: &Context,
    server: &Server,
    args: &TailArgs,
    pattern: &TopicPattern,
) -> CliResult {
    if args.group.is_some() {
        return Err(remote::unsupported(
            "tail --group",
            "the server's subscriptions read its store, not a broker's consumer group; tail \
             without --group (it resumes from nothing: use --from-start to see what is stored)",
        )
        .into());
    }
    // From the head seen now, so that nothing stored after the "tailing" line is missed.
    let from = if args.from_start {
        1
    } else {
        let system = server
            .query("{ system { headPosition } }", Value::Null)
            .await?;
        remote::number(
            server,
            remote::field(server, &system, "system")?,
            "headPosition",
        )? + 1
    };
    let query = format!(
        "subscription($types: [String!], $from: Int) {{ events(types: $types, fromPosition: \
         $from) {{ {} }} }}",
        remote::EVENT_FIELDS
    );
    let subscribe =
        |from: u64| server.subscribe(&query, json!({ "types": [pattern.as_str()], "from": from }));
    let mut events = subscribe(from).await?;
    if !cx.json {
        eprintln!(
            "tailing `{}` through {}{} (Ctrl-C to stop)",
            args.pattern,
            server.url(),
            if args.from_start {
                " from the start"
            } else {
                ""
            }
        );
    }
    let limit = args.count.unwrap_or(u64::MAX);
    let mut printed = 0;
    while printed < limit {
        let data = match events.next().await {
            Ok(Some(data)) => data,
            Ok(None) => {
                return Err(
                    format!("the server at {} ended the subscription", server.url()).into(),
                );
            }
            // The server ends a subscription that fell too far behind (this terminal, or
            // what reads it, was slow) and says where to go on from: go on from there.
            Err(remote::RemoteError::GraphQl {
                code: Some(code),
                resume_from: Some(position),
                ..
            }) if code == "SLOW_CONSUMER" => {
                if !cx.json {
                    eprintln!("(fell behind the server's window: going on from @{position})");
                }
                events = subscribe(position).await?;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let event = remote::event(server, remote::field(server, &data, "events")?)?;
        if is_system_event(&event) || !pattern.matches(event.event_type()) {
            continue;
        }
        print_event(cx, &event)?;
        printed += 1;
    }
    Ok(())
}

/// How often `tail` looks for events a running application appended to a `file://` store.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// An orchestrator on the store to tail. A `file://` store is opened read-only (the
/// application writing it may be running) and refreshed in the background, so that its
/// subscriptions see what that application appends.
async fn follow_store(cx: &Context) -> CliResult<EventOrchestrator> {
    let url = cx.store_url()?;
    let Ok(Backend::File(dir)) = Backend::parse(url) else {
        return cx.connect(true, Access::Read).await;
    };
    let store = tokio::task::spawn_blocking(move || FileEventStore::open_read_only(dir))
        .await
        .map_err(|e| format!("opening the store failed: {e}"))??;
    let orchestrator = cx
        .connect_with(Arc::new(store.clone()), url, Access::Read)
        .await?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            let refresh = store.clone();
            let refreshed = match tokio::task::spawn_blocking(move || refresh.refresh()).await {
                Ok(refreshed) => refreshed.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = refreshed {
                // The tail waits on the store, which would never move again: end it here.
                eprintln!("error: reading new events from the store failed: {error}");
                std::process::exit(1);
            }
        }
    });
    Ok(orchestrator)
}

fn print_event(cx: &Context, event: &EventEnvelope) -> CliResult {
    if cx.json {
        // One JSON document per line, for `jq` and friends.
        println!("{}", serde_json::to_string(&event_json(event)?)?);
    } else {
        println!("{}", event_line(event));
    }
    Ok(())
}

pub(crate) async fn replay(cx: &Context, args: ReplayArgs) -> CliResult {
    let mut filter = ReplayFilter::all();
    for event_type in &args.event_types {
        filter = filter.and_event_type(event_type);
    }
    if let Some(from) = args.from {
        filter = filter.from_time(from);
    }
    if let Some(to) = args.to {
        filter = filter.to_time(to);
    }
    if let Some(server) = &cx.server {
        return replay_through(cx, server, &args).await;
    }
    let orchestrator = cx.connect(true, Access::Read).await?;
    if cx.in_process_transport() {
        eprintln!(
            "note: the transport is memory:, which no other process subscribes to; pass \
             --transport redis://…, amqp://… or kafka://… to reach the subscribers"
        );
    }
    let bar = Arc::new(ProgressBar::new(0));
    bar.set_style(
        ProgressStyle::with_template("replaying {bar:40} {pos}/{len} positions ({msg})")
            .map_err(|e| format!("progress bar template: {e}"))?,
    );
    let reporter = Arc::clone(&bar);
    let start = filter.to_replay().start_position();
    let replayed = orchestrator
        .replay_events_with_progress(filter, move |progress| {
            let span = progress
                .end_position
                .saturating_sub(start.saturating_sub(1));
            reporter.set_length(span);
            reporter.set_position(progress.position.saturating_sub(start.saturating_sub(1)));
            reporter.set_message(format!("{} delivered", progress.processed));
        })
        .await;
    bar.finish_and_clear();
    let replayed = replayed?;
    if cx.json {
        print_json(&json!({ "replayed": replayed }))?;
    } else {
        println!("replayed {replayed} events");
    }
    Ok(())
}

/// `replay` through the server: its orchestrator delivers the events to its transport's
/// subscribers (an embedded application's own, with the in-process transport).
async fn replay_through(cx: &Context, server: &Server, args: &ReplayArgs) -> CliResult {
    if !cx.json {
        eprintln!("replaying through {} …", server.url());
    }
    let replayed = server
        .query(
            "mutation($types: [String!], $from: DateTime, $to: DateTime) { \
             replayEvents(types: $types, fromTime: $from, toTime: $to) }",
            json!({
                "types": (!args.event_types.is_empty()).then_some(&args.event_types),
                "from": args.from.map(|t| t.to_rfc3339()),
                "to": args.to.map(|t| t.to_rfc3339()),
            }),
        )
        .await?;
    let replayed = remote::number(server, &replayed, "replayEvents")?;
    if cx.json {
        print_json(&json!({ "replayed": replayed }))
    } else {
        println!("replayed {replayed} events");
        Ok(())
    }
}
