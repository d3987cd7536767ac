//! `sagas list|show`.

use clap::Subcommand;
use orchestrator::core::EventEnvelope;
use orchestrator::saga::{SagaId, SagaOrchestrator, SagaSnapshot};
use serde_json::{Value, json};

use crate::output::{print_json, time};
use crate::remote::{self, Server};
use crate::{Access, CliResult, Context};

/// How many records of one saga's log `sagas show` reads at most.
const LOG_LIMIT: usize = 100_000;

#[derive(Debug, Subcommand)]
pub(crate) enum SagasCommand {
    /// Every saga logged in the store, oldest first, with how it ended.
    List {
        /// Only unfinished sagas (running, compensating, or stopped by a crash).
        #[arg(long)]
        unfinished: bool,
    },
    /// One saga: status, steps, failure, compensations, context, and its log with timings.
    Show {
        /// The saga id (or its log stream, `saga-<id>`).
        id: String,
    },
}

/// A line of `sagas list`.
struct SagaRow {
    id: String,
    saga: String,
    /// How it ended, or `unfinished`.
    status: String,
    started_at: chrono::DateTime<chrono::Utc>,
}

pub(crate) async fn run(cx: &Context, command: SagasCommand) -> CliResult {
    if let Some(server) = &cx.server {
        return through(cx, server, command).await;
    }
    let orchestrator = cx.connect(true, Access::Read).await?;
    let sagas = SagaOrchestrator::new(orchestrator.store().clone());
    match command {
        SagasCommand::List { unfinished } => {
            let mut stored = sagas.list_stored().await?;
            if unfinished {
                stored.retain(|s| s.finished.is_none());
            }
            let rows: Vec<SagaRow> = stored
                .into_iter()
                .map(|s| SagaRow {
                    id: s.id.to_string(),
                    saga: s.saga,
                    status: s.finished.map_or("unfinished", |f| f.as_str()).to_owned(),
                    started_at: s.started_at,
                })
                .collect();
            print_list(cx, &rows)
        }
        SagasCommand::Show { id } => {
            let id: SagaId = id.parse()?;
            let snapshot = sagas.load(id).await?;
            let log = orchestrator
                .store()
                .read_stream(&id.stream(), 1, LOG_LIMIT)
                .await?;
            print_saga(cx, &snapshot_json(&snapshot, &log))
        }
    }
}

/// `sagas` through the server's `sagas` and `saga` queries.
async fn through(cx: &Context, server: &Server, command: SagasCommand) -> CliResult {
    match command {
        SagasCommand::List { unfinished } => {
            let data = server
                .query(
                    "query($unfinished: Boolean) { sagas(unfinished: $unfinished) { id saga \
                     statusName startedAt } }",
                    json!({ "unfinished": unfinished }),
                )
                .await?;
            let rows = remote::list(server, &data, "sagas")?
                .iter()
                .map(|s| {
                    Ok(SagaRow {
                        id: remote::text(server, s, "id")?.to_owned(),
                        saga: remote::text(server, s, "saga")?.to_owned(),
                        status: remote::text(server, s, "statusName")?.to_owned(),
                        started_at: remote::time(server, s, "startedAt")?,
                    })
                })
                .collect::<CliResult<Vec<_>>>()?;
            print_list(cx, &rows)
        }
        SagasCommand::Show { id } => {
            let data = server
                .query(
                    "query($id: String!) { saga(id: $id) { id saga statusName startedAt \
                     updatedAt completedSteps runningSteps failure { step attempts error \
                     timedOut } compensatedSteps compensationFailures { step attempts error } \
                     context log { type step time offsetMs sincePreviousMs } } }",
                    json!({ "id": id }),
                )
                .await?;
            let saga = remote::field(server, &data, "saga")?;
            if saga.is_null() {
                return Err(format!("saga {id} not found").into());
            }
            print_saga(cx, &detail_json(server, saga)?)
        }
    }
}

fn print_list(cx: &Context, rows: &[SagaRow]) -> CliResult {
    if cx.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "saga": s.saga,
                    "status": s.status,
                    "started_at": time(s.started_at),
                })
            })
            .collect();
        return print_json(&Value::Array(list));
    }
    if rows.is_empty() {
        println!("no sagas");
    }
    for s in rows {
        println!("{} {} {:20} {}", s.id, time(s.started_at), s.saga, s.status);
    }
    Ok(())
}

/// A time of the server's answer, written as the CLI writes times.
fn server_time(server: &Server, value: &Value, name: &str) -> CliResult<Value> {
    Ok(Value::String(time(remote::time(server, value, name)?)))
}

/// The server's `SagaDetail` as `sagas show --json` prints it (the shape of
/// [`snapshot_json`]).
fn detail_json(server: &Server, saga: &Value) -> CliResult<Value> {
    let failure = |f: &Value, timed_out: bool| {
        let mut failure = json!({
            "step": f["step"], "attempts": f["attempts"], "error": f["error"],
        });
        if timed_out {
            failure["timed_out"] = f["timedOut"].clone();
        }
        failure
    };
    let log = remote::list(server, saga, "log")?
        .iter()
        .map(|entry| {
            Ok(json!({
                "type": entry["type"],
                "step": entry["step"],
                "time": server_time(server, entry, "time")?,
                "offset_ms": entry["offsetMs"],
                "since_previous_ms": entry["sincePreviousMs"],
            }))
        })
        .collect::<CliResult<Vec<_>>>()?;
    Ok(json!({
        "id": remote::text(server, saga, "id")?,
        "saga": remote::text(server, saga, "saga")?,
        "status": remote::text(server, saga, "statusName")?,
        "started_at": server_time(server, saga, "startedAt")?,
        "updated_at": server_time(server, saga, "updatedAt")?,
        "completed_steps": remote::field(server, saga, "completedSteps")?,
        "running_steps": remote::field(server, saga, "runningSteps")?,
        "failure": match remote::field(server, saga, "failure")? {
            Value::Null => Value::Null,
            f => failure(f, true),
        },
        "compensated_steps": remote::field(server, saga, "compensatedSteps")?,
        "compensation_failures": remote::list(server, saga, "compensationFailures")?
            .iter()
            .map(|f| failure(f, false))
            .collect::<Vec<_>>(),
        "context": remote::field(server, saga, "context")?,
        "log": log,
    }))
}

/// The step (or branch, or wait) a log record is about, if any.
pub(crate) fn record_step(record: &EventEnvelope) -> Option<String> {
    let data: Value = record.data().ok()?;
    data.get("step")
        .or_else(|| data.get("branch"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Milliseconds from `from` to `to`.
pub(crate) fn millis(from: &EventEnvelope, to: &EventEnvelope) -> f64 {
    (to.time() - from.time())
        .num_microseconds()
        .map_or(0.0, |us| us as f64 / 1000.0)
}

fn log_json(log: &[EventEnvelope]) -> Vec<Value> {
    let Some(first) = log.first() else {
        return Vec::new();
    };
    let mut previous = first;
    log.iter()
        .map(|record| {
            let entry = json!({
                "type": record.event_type(),
                "step": record_step(record),
                "time": time(record.time()),
                "offset_ms": millis(first, record),
                "since_previous_ms": millis(previous, record),
            });
            previous = record;
            entry
        })
        .collect()
}

fn snapshot_json(snapshot: &SagaSnapshot, log: &[EventEnvelope]) -> Value {
    json!({
        "id": snapshot.id.to_string(),
        "saga": snapshot.saga,
        "status": snapshot.status.as_str(),
        "started_at": time(snapshot.started_at),
        "updated_at": time(snapshot.updated_at),
        "completed_steps": snapshot.completed_steps,
        "running_steps": snapshot.running_steps,
        "failure": snapshot.failure.as_ref().map(|f| json!({
            "step": f.step, "attempts": f.attempts, "error": f.error, "timed_out": f.timed_out,
        })),
        "compensated_steps": snapshot.compensated_steps,
        "compensation_failures": snapshot.compensation_failures.iter().map(|f| json!({
            "step": f.step, "attempts": f.attempts, "error": f.error,
        })).collect::<Vec<_>>(),
        "context": snapshot.context,
        "log": log_json(log),
    })
}

/// Prints a saga as [`snapshot_json`] describes it: as JSON, or as text.
fn print_saga(cx: &Context, saga: &Value) -> CliResult {
    if cx.json {
        return print_json(saga);
    }
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let steps = |value: &Value| {
        value
            .as_array()
            .map(|steps| steps.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    println!("saga        {} {}", text(&saga["saga"]), text(&saga["id"]));
    println!("status      {}", text(&saga["status"]));
    println!("started     {}", text(&saga["started_at"]));
    println!("updated     {}", text(&saga["updated_at"]));
    println!("completed   {}", steps(&saga["completed_steps"]));
    if saga["running_steps"]
        .as_array()
        .is_some_and(|running| !running.is_empty())
    {
        println!("running     {}", steps(&saga["running_steps"]));
    }
    let failure = &saga["failure"];
    if !failure.is_null() {
        println!(
            "failed at   {} after {} attempt(s): {}",
            text(&failure["step"]),
            failure["attempts"],
            text(&failure["error"])
        );
    }
    if saga["compensated_steps"]
        .as_array()
        .is_some_and(|compensated| !compensated.is_empty())
    {
        println!("compensated {}", steps(&saga["compensated_steps"]));
    }
    for failure in saga["compensation_failures"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "compensation of {} failed after {} attempt(s): {}",
            text(&failure["step"]),
            failure["attempts"],
            text(&failure["error"])
        );
    }
    println!("context     {}", saga["context"]);
    println!("log:");
    for entry in saga["log"].as_array().into_iter().flatten() {
        println!(
            "  +{:>9.3} ms  {:28} {:16} (+{:.3} ms)",
            entry["offset_ms"].as_f64().unwrap_or_default(),
            entry["type"].as_str().unwrap_or_default(),
            entry["step"].as_str().unwrap_or_default(),
            entry["since_previous_ms"].as_f64().unwrap_or_default(),
        );
    }
    Ok(())
}
