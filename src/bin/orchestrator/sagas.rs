//! `sagas list|show`.

use clap::Subcommand;
use orchestrator::core::EventEnvelope;
use orchestrator::saga::{SagaId, SagaOrchestrator, SagaSnapshot};
use serde_json::{Value, json};

use crate::output::{print_json, time};
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

pub(crate) async fn run(cx: &Context, command: SagasCommand) -> CliResult {
    let orchestrator = cx.connect(true, Access::Read).await?;
    let sagas = SagaOrchestrator::new(orchestrator.store().clone());
    match command {
        SagasCommand::List { unfinished } => {
            let mut stored = sagas.list_stored().await?;
            if unfinished {
                stored.retain(|s| s.finished.is_none());
            }
            if cx.json {
                let list: Vec<Value> = stored
                    .iter()
                    .map(|s| {
                        json!({
                            "id": s.id.to_string(),
                            "saga": s.saga,
                            "status": s.finished.map_or("unfinished", |f| f.as_str()),
                            "started_at": time(s.started_at),
                        })
                    })
                    .collect();
                return print_json(&Value::Array(list));
            }
            if stored.is_empty() {
                println!("no sagas");
            }
            for s in &stored {
                println!(
                    "{} {} {:20} {}",
                    s.id,
                    time(s.started_at),
                    s.saga,
                    s.finished.map_or("unfinished", |f| f.as_str())
                );
            }
        }
        SagasCommand::Show { id } => {
            let id: SagaId = id.parse()?;
            let snapshot = sagas.load(id).await?;
            let log = orchestrator
                .store()
                .read_stream(&id.stream(), 1, LOG_LIMIT)
                .await?;
            if cx.json {
                return print_json(&snapshot_json(&snapshot, &log));
            }
            print_snapshot(&snapshot, &log);
        }
    }
    Ok(())
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

fn print_snapshot(snapshot: &SagaSnapshot, log: &[EventEnvelope]) {
    println!("saga        {} {}", snapshot.saga, snapshot.id);
    println!("status      {}", snapshot.status);
    println!("started     {}", time(snapshot.started_at));
    println!("updated     {}", time(snapshot.updated_at));
    println!("completed   {}", snapshot.completed_steps.join(", "));
    if !snapshot.running_steps.is_empty() {
        println!("running     {}", snapshot.running_steps.join(", "));
    }
    if let Some(failure) = &snapshot.failure {
        println!(
            "failed at   {} after {} attempt(s): {}",
            failure.step, failure.attempts, failure.error
        );
    }
    if !snapshot.compensated_steps.is_empty() {
        println!("compensated {}", snapshot.compensated_steps.join(", "));
    }
    for failure in &snapshot.compensation_failures {
        println!(
            "compensation of {} failed after {} attempt(s): {}",
            failure.step, failure.attempts, failure.error
        );
    }
    println!("context     {}", snapshot.context);
    println!("log:");
    for entry in log_json(log) {
        println!(
            "  +{:>9.3} ms  {:28} {:16} (+{:.3} ms)",
            entry["offset_ms"].as_f64().unwrap_or_default(),
            entry["type"].as_str().unwrap_or_default(),
            entry["step"].as_str().unwrap_or_default(),
            entry["since_previous_ms"].as_f64().unwrap_or_default(),
        );
    }
}
