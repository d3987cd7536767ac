//! The fault suite of orchestrator: shows that nothing is lost when things go wrong.
//!
//! `cargo xtask faults` runs each scenario as its own process of this binary and writes
//! the figures to `FAULTS.md`; each scenario can also be run by hand:
//!
//! ```text
//! faults restart <redis|rabbitmq|kafka> [--events N]   broker restart mid publish/consume
//! faults saga-crash [--sagas N] [--kills K]            SIGKILL a process running sagas, recover
//! faults writers <memory|file|redis|rabbitmq|kafka> [--writers W] [--appends N]
//!                                                      concurrent appends to one stream
//! faults slow-handler [--events N]                     a slow handler, bounded memory
//! faults soak-memory [--events N] [--cap C]            the default facade, capped store
//! faults publisher-crash <file-memory|file-redis|redis-redis> [--rounds N]
//!                                                      SIGKILL a publishing process, relay
//! faults publisher-outage <redis|rabbitmq> [--events N] a broker away while publishing
//! faults relay-failover redis [--children N]           SIGKILL the relaying process, again
//! faults saga-takeover redis [--sagas N] [--concurrent C] [--kill-after-ms T]
//!                                                      SIGKILL one of two saga processes
//! ```
//!
//! Each prints what it does on stderr and, last, one `result scenario=… key=value …` line on
//! stdout, which xtask reads. It exits with status 1 when a check fails, 2 when the
//! scenario cannot run here (a broker is unreachable, a backend feature is not compiled
//! in). Broker addresses come from `ORCHESTRATOR_REDIS_URL`, `ORCHESTRATOR_AMQP_URL` and
//! `ORCHESTRATOR_KAFKA_BROKERS`, as in the backend tests; spare brokers started by a
//! scenario have their process ids appended to the file named by
//! `ORCHESTRATOR_FAULTS_PIDS`, so that whoever runs the suite can stop them should this
//! process be killed.

mod child;
mod outage;
mod publisher_crash;
mod relay_failover;
mod report;
mod restart;
mod saga_crash;
mod saga_takeover;
mod slow_handler;
mod soak;
#[cfg(any(feature = "redis", feature = "rabbitmq", feature = "kafka"))]
mod spare;
mod writers;

use std::process::ExitCode;

pub(crate) use report::Report;

/// Errors of a scenario, for the person at the terminal.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A scenario's result.
pub(crate) type Res<T = ()> = Result<T, BoxError>;

/// Why a scenario did not pass.
#[derive(Debug)]
pub(crate) enum Failure {
    /// It cannot run on this machine; the text says why.
    CannotRun(String),
    /// A check failed or something broke.
    Failed(BoxError),
}

impl From<BoxError> for Failure {
    fn from(error: BoxError) -> Self {
        Failure::Failed(error)
    }
}

/// The answer for a backend whose feature this build lacks.
#[cfg_attr(
    all(feature = "redis", feature = "rabbitmq", feature = "kafka"),
    allow(dead_code)
)]
pub(crate) fn not_built(backend: &str) -> Failure {
    Failure::CannotRun(format!(
        "built without the `{backend}` feature of orchestrator-faults"
    ))
}

/// Fails with `message` unless `condition` holds.
pub(crate) fn ensure(condition: bool, message: impl FnOnce() -> String) -> Res {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

/// The value of `--name N` in `args`, or `default`.
fn number_option(args: &[String], name: &str, default: u64) -> Result<u64, Failure> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.replace('_', "").parse().ok())
            .ok_or_else(|| Failure::Failed(format!("{name} needs a number").into())),
        None => Ok(default),
    }
}

/// A runtime with two workers, as on the machines this suite targets.
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Failed(e.into()))
}

/// Runs the scenario named on the command line.
fn run(args: &[String]) -> Result<(), Failure> {
    let (scenario, rest) = args
        .split_first()
        .ok_or_else(|| Failure::Failed("usage: faults <scenario> … (see the crate docs)".into()))?;
    let target = rest.first().map(String::as_str).unwrap_or_default();
    match scenario.as_str() {
        "restart" => {
            let events = number_option(rest, "--events", 100_000)?;
            runtime()?.block_on(restart::run(target, events as usize))
        }
        "saga-crash" => {
            let sagas = number_option(rest, "--sagas", 100)?;
            let kills = number_option(rest, "--kills", 20)?;
            saga_crash::parent(sagas as usize, kills as usize)
        }
        saga_crash::CHILD => saga_crash::child(rest),
        "writers" => {
            let writers = number_option(rest, "--writers", 8)?;
            let appends = number_option(rest, "--appends", 10_000)?;
            runtime()?.block_on(writers::run(target, writers as usize, appends as usize))
        }
        "publisher-crash" => {
            let rounds = number_option(rest, "--rounds", 50)?;
            publisher_crash::parent(target, rounds as usize)
        }
        publisher_crash::CHILD => publisher_crash::child(rest),
        "publisher-outage" => {
            let events = number_option(rest, "--events", 20_000)?;
            runtime()?.block_on(outage::run(target, events as usize))
        }
        "relay-failover" => {
            let children = number_option(rest, "--children", 4)?;
            relay_failover::parent(target, children as usize)
        }
        relay_failover::CHILD => relay_failover::child(rest),
        "saga-takeover" => {
            let sagas = number_option(rest, "--sagas", 100)?;
            // The saga orchestrator's default: no saga waits for a slot.
            let concurrent = number_option(rest, "--concurrent", 1024)?;
            // 0: after a random number of the first process's starts.
            let kill_ms = number_option(rest, "--kill-after-ms", 0)?;
            let kill_at = (kill_ms > 0).then(|| std::time::Duration::from_millis(kill_ms));
            saga_takeover::parent(target, sagas as usize, concurrent as usize, kill_at)
        }
        saga_takeover::CHILD => saga_takeover::child(rest),
        "slow-handler" => {
            let events = number_option(rest, "--events", 1_000_000)?;
            runtime()?.block_on(slow_handler::run(events as usize))
        }
        "soak-memory" => {
            let events = number_option(rest, "--events", 1_000_000)?;
            let cap = number_option(rest, "--cap", 100_000)?;
            runtime()?.block_on(soak::run(events, cap))
        }
        other => Err(Failure::Failed(
            format!(
                "unknown scenario `{other}` (restart, saga-crash, writers, slow-handler, \
                 soak-memory, publisher-crash, publisher-outage, relay-failover, saga-takeover)"
            )
            .into(),
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::CannotRun(why)) => {
            eprintln!("faults: cannot run here: {why}");
            println!("result cannot-run reason={}", report::value(&why));
            ExitCode::from(2)
        }
        Err(Failure::Failed(error)) => {
            eprintln!("faults: FAILED: {error}");
            println!("result failed reason={}", report::value(&error.to_string()));
            ExitCode::FAILURE
        }
    }
}
