//! A process publishing through `EventOrchestrator` as fast as it can (64 tasks) is killed
//! with SIGKILL at random moments, again and again; each new process carries on where the
//! store says. In the end every event a publisher was told was stored must be in the store,
//! and every event in the store must have been delivered to a subscriber at least once.
//!
//! This is the store-first promise: `publish` returns once the event is appended, and the
//! outbox relay delivers what the store holds, from its checkpoint, after any crash.
//!
//! Targets (store + transport):
//! - `file-memory`: the file store and the in-process transport. The subscriber lives in the
//!   publishing process, so what a kill takes out of the in-process queues must come back
//!   from the relay's checkpoint (which waits for the handlers to settle).
//! - `file-redis`: the file store and the Redis transport; the subscriber (a named consumer
//!   group) lives in this parent process, which is never killed.
//! - `redis-redis`: the Redis store and transport, the relay elected by the store's lease.
//! - `postgres-redis`: the PostgreSQL store (a schema of the run's own) and the Redis
//!   transport, the relay elected by the store's lease row.
//! - `postgres-postgres`: store and transport on PostgreSQL, in one schema of the run's own.
//!
//! Every publish that returns appends the event's id to an `acked` file, every handled event
//! its id to a `handled` file (one `O_APPEND` write each). The child process is this binary
//! again (`faults publisher-child <target> <dir> <prefix> <publish|drain>`).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator::prelude::*;
use orchestrator::{RelayOptions, RelayState};
use serde_json::json;

use crate::child::{ChildProcess, Lines, read_ids, say};
use crate::{Failure, Report, Res, ensure};

/// The child's command-line name.
pub(crate) const CHILD: &str = "publisher-child";
/// Tasks publishing at once in a child.
const PUBLISHERS: usize = 64;
/// The event type published.
const EVENT_TYPE: &str = "crash.event";
/// The named subscription that records deliveries.
const GROUP: &str = "crash-check";
/// How long a child publishes before it is killed: a random time in this range (ms).
const KILL_AFTER_MS: std::ops::Range<u64> = 50..600;

/// Where a target keeps its store and carries its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    FileMemory,
    FileRedis,
    RedisRedis,
    PostgresRedis,
    PostgresPostgres,
}

impl Target {
    fn parse(name: &str) -> Result<Self, Failure> {
        match name {
            "file-memory" => Ok(Self::FileMemory),
            "file-redis" => Ok(Self::FileRedis),
            "redis-redis" => Ok(Self::RedisRedis),
            "postgres-redis" => Ok(Self::PostgresRedis),
            "postgres-postgres" => Ok(Self::PostgresPostgres),
            other => Err(Failure::Failed(
                format!(
                    "unknown target `{other}` (file-memory, file-redis, redis-redis, \
                     postgres-redis, postgres-postgres)"
                )
                .into(),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::FileMemory => "file-memory",
            Self::FileRedis => "file-redis",
            Self::RedisRedis => "redis-redis",
            Self::PostgresRedis => "postgres-redis",
            Self::PostgresPostgres => "postgres-postgres",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::FileMemory => "file store + in-process transport",
            Self::FileRedis => "file store + Redis transport",
            Self::RedisRedis => "Redis store + Redis transport",
            Self::PostgresRedis => "PostgreSQL store + Redis transport",
            Self::PostgresPostgres => "PostgreSQL store + PostgreSQL transport",
        }
    }

    /// Whether the subscriber lives in the publishing process.
    fn handles_in_child(self) -> bool {
        self == Self::FileMemory
    }
}

/// The Redis configuration of a run: the shared Redis, under a prefix of the run's own.
#[cfg(feature = "redis")]
fn redis_config(prefix: &str) -> Res<orchestrator::backends::redis::RedisConfig> {
    let url =
        std::env::var("ORCHESTRATOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    Ok(orchestrator::backends::redis::RedisConfig::new(&url)?.with_prefix(prefix.to_owned()))
}

/// The PostgreSQL configuration of a run: the shared server, in a schema named after the
/// run's prefix.
#[cfg(feature = "postgres")]
fn postgres_config(prefix: &str) -> Res<orchestrator::backends::postgres::PostgresConfig> {
    let url = std::env::var("ORCHESTRATOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Ok(orchestrator::backends::postgres::PostgresConfig::new(&url)?.with_schema(schema)?)
}

/// The store of a target.
async fn store(target: Target, dir: &Path, prefix: &str) -> Result<Arc<dyn EventStore>, Failure> {
    let _ = prefix;
    match target {
        Target::FileMemory | Target::FileRedis => Ok(Arc::new(
            FileEventStore::open(dir.join("store")).map_err(|e| Failure::Failed(e.into()))?,
        )),
        #[cfg(feature = "redis")]
        Target::RedisRedis => {
            let config = redis_config(prefix)?;
            let store = orchestrator::backends::redis::RedisEventStore::connect(config)
                .await
                .map_err(|e| Failure::CannotRun(format!("Redis: {e}")))?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "redis"))]
        Target::RedisRedis => Err(crate::not_built("redis")),
        #[cfg(feature = "postgres")]
        Target::PostgresRedis | Target::PostgresPostgres => {
            let config = postgres_config(prefix)?;
            let store = orchestrator::backends::postgres::PostgresEventStore::connect(config)
                .await
                .map_err(|e| Failure::CannotRun(format!("PostgreSQL: {e}")))?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "postgres"))]
        Target::PostgresRedis | Target::PostgresPostgres => Err(crate::not_built("postgres")),
    }
}

/// The transport of a target (`None`: the in-process default).
async fn transport(target: Target, prefix: &str) -> Result<Option<Arc<dyn Transport>>, Failure> {
    let _ = prefix;
    match target {
        Target::FileMemory => Ok(None),
        #[cfg(feature = "redis")]
        Target::FileRedis | Target::RedisRedis | Target::PostgresRedis => {
            let config = redis_config(prefix)?;
            let transport = orchestrator::backends::redis::RedisTransport::connect(config)
                .await
                .map_err(|e| Failure::CannotRun(format!("Redis: {e}")))?;
            Ok(Some(Arc::new(transport)))
        }
        #[cfg(not(feature = "redis"))]
        Target::FileRedis | Target::RedisRedis | Target::PostgresRedis => {
            Err(crate::not_built("redis"))
        }
        #[cfg(feature = "postgres")]
        Target::PostgresPostgres => {
            let config = postgres_config(prefix)?;
            let transport = orchestrator::backends::postgres::PostgresTransport::connect(config)
                .await
                .map_err(|e| Failure::CannotRun(format!("PostgreSQL: {e}")))?;
            Ok(Some(Arc::new(transport)))
        }
        #[cfg(not(feature = "postgres"))]
        Target::PostgresPostgres => Err(crate::not_built("postgres")),
    }
}

/// Subscribes the recording handler (a named group: it outlives processes on a broker).
async fn record_deliveries(
    orchestrator: &EventOrchestrator,
    handled: Lines,
) -> Res<orchestrator::bus::Subscription> {
    Ok(orchestrator
        .subscribe_with(
            SubscriptionConfig::new(EVENT_TYPE).named(GROUP),
            move |event: EventEnvelope| {
                let handled = handled.clone();
                async move {
                    handled
                        .write(&event.id().to_string())
                        .map_err(|e| HandlerError::from_error(e, true))
                }
            },
        )
        .await?)
}

/// The child: publish until killed, or (`drain`) deliver what is stored and exit.
pub(crate) fn child(args: &[String]) -> Result<(), Failure> {
    let [target, dir, prefix, mode] = args else {
        return Err(Failure::Failed(
            "usage: publisher-child <target> <dir> <prefix> <publish|drain>".into(),
        ));
    };
    let target = Target::parse(target)?;
    let runtime = crate::runtime()?;
    runtime.block_on(run_child(target, Path::new(dir), prefix, mode == "drain"))
}

async fn run_child(target: Target, dir: &Path, prefix: &str, drain: bool) -> Result<(), Failure> {
    let mut builder = EventOrchestrator::builder().store(store(target, dir, prefix).await?);
    if let Some(transport) = transport(target, prefix).await? {
        builder = builder.transport(transport);
    }
    let orchestrator = builder
        .build()
        .await
        .map_err(|e| Failure::Failed(e.into()))?;
    let _subscription = if target.handles_in_child() {
        let handled = Lines::open(&dir.join("handled"))?;
        let subscription = record_deliveries(&orchestrator, handled).await?;
        orchestrator.start_relay();
        Some(subscription)
    } else {
        None
    };
    say("opened")?;
    if drain {
        return Ok(drain_child(&orchestrator).await?);
    }
    let acked = Lines::open(&dir.join("acked"))?;
    let mut tasks = Vec::new();
    for task in 0..PUBLISHERS {
        let (orchestrator, acked) = (orchestrator.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for seq in 0u64.. {
                let id = orchestrator
                    .publish_event(EVENT_TYPE, json!({ "task": task, "seq": seq }))
                    .await?;
                acked.write(&id.to_string())?;
            }
            Ok::<_, crate::BoxError>(())
        }));
    }
    // Runs until killed; a task that fails ends the child with its error.
    for task in tasks {
        task.await.map_err(|e| Failure::Failed(e.into()))??;
    }
    Ok(())
}

/// Waits until the relay has published (and, in process, the handlers settled) everything
/// stored when this child started, then shuts down.
async fn drain_child(orchestrator: &EventOrchestrator) -> Res {
    let head = orchestrator.store().head_position().await?;
    orchestrator.start_relay();
    let started = Instant::now();
    loop {
        let status = orchestrator.relay_status();
        if status.checkpoint >= head {
            break;
        }
        ensure(started.elapsed() < Duration::from_secs(120), || {
            format!("the relay did not checkpoint position {head} within 120 s: {status:?}")
        })?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = orchestrator.shutdown(Duration::from_secs(10)).await;
    ensure(report.unfinished.is_empty(), || {
        format!(
            "handlers left unfinished at shutdown: {:?}",
            report.unfinished
        )
    })?;
    say("done")
}

/// Runs one child; kills it `kill_after` after it opened the store, or lets it finish.
fn run_child_process(
    exe: &Path,
    target: Target,
    dir: &Path,
    prefix: &str,
    kill_after: Option<Duration>,
) -> Res {
    let mode = if kill_after.is_some() {
        "publish"
    } else {
        "drain"
    };
    let mut child = ChildProcess::spawn(
        exe,
        [
            OsStr::new(CHILD),
            OsStr::new(target.name()),
            dir.as_os_str(),
            OsStr::new(prefix),
            OsStr::new(mode),
        ],
    )?;
    child.expect("opened", Duration::from_secs(60))?;
    match kill_after {
        Some(delay) => {
            std::thread::sleep(delay);
            if let Some(status) = child.try_wait()? {
                return Err(format!("a publishing child ended on its own ({status})").into());
            }
            child.kill()
        }
        None => {
            let status = child.wait(Duration::from_secs(300))?;
            ensure(status.success(), || {
                format!("the draining child failed ({status})")
            })?;
            ensure(child.finish().iter().any(|(_, l)| l == "done"), || {
                "the draining child did not say done".to_owned()
            })
        }
    }
}

/// The parent: kill publishing children at random moments, let a last one drain, check.
pub(crate) fn parent(target: &str, rounds: usize) -> Result<(), Failure> {
    let target = Target::parse(target)?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let dir = std::env::temp_dir().join(format!("orchestrator-faults-publisher-{id}"));
    let prefix = format!("faults-publisher-{id}:");
    std::fs::create_dir_all(&dir).map_err(|e| Failure::Failed(e.into()))?;
    let result = crate::runtime()?.block_on(scenario(target, &dir, &prefix, rounds));
    let _ = std::fs::remove_dir_all(&dir);
    #[cfg(feature = "redis")]
    if matches!(
        target,
        Target::FileRedis | Target::RedisRedis | Target::PostgresRedis
    ) {
        let cleanup = crate::runtime()?.block_on(async {
            let transport =
                orchestrator::backends::redis::RedisTransport::connect(redis_config(&prefix)?)
                    .await?;
            transport.delete_all().await?;
            Ok::<_, crate::BoxError>(())
        });
        if let Err(e) = cleanup {
            eprintln!("publisher-crash: could not delete the run's Redis keys: {e}");
        }
    }
    #[cfg(feature = "postgres")]
    if matches!(target, Target::PostgresRedis | Target::PostgresPostgres) {
        let cleanup = crate::runtime()?.block_on(async {
            orchestrator::backends::postgres::PostgresEventStore::connect(postgres_config(
                &prefix,
            )?)
            .await?
            .drop_schema()
            .await?;
            Ok::<_, crate::BoxError>(())
        });
        if let Err(e) = cleanup {
            eprintln!("publisher-crash: could not drop the run's PostgreSQL schema: {e}");
        }
    }
    result
}

async fn scenario(target: Target, dir: &Path, prefix: &str, rounds: usize) -> Result<(), Failure> {
    let seed = fastrand::u64(..);
    fastrand::seed(seed);
    let exe = std::env::current_exe().map_err(|e| Failure::Failed(e.into()))?;
    eprintln!(
        "publisher-crash: {}: {PUBLISHERS} tasks publish as fast as they can; {rounds} SIGKILLs \
         at random moments ({}–{} ms after start), then one process drains; seed {seed}",
        target.describe(),
        KILL_AFTER_MS.start,
        KILL_AFTER_MS.end
    );
    // On a broker, this process holds the subscriber: it is never killed.
    let parent_handled: PathBuf = dir.join("handled-by-parent");
    let watcher = if target.handles_in_child() {
        None
    } else {
        let transport = transport(target, prefix)
            .await?
            .ok_or_else(|| Failure::Failed("a broker target without a transport".into()))?;
        let orchestrator = EventOrchestrator::builder()
            .transport(transport)
            .relay(RelayOptions::disabled())
            .build()
            .await
            .map_err(|e| Failure::Failed(e.into()))?;
        let subscription = record_deliveries(&orchestrator, Lines::open(&parent_handled)?).await?;
        Some((orchestrator, subscription))
    };
    let started = Instant::now();
    for _ in 0..rounds {
        let delay = Duration::from_millis(fastrand::u64(KILL_AFTER_MS));
        let (exe, dir, prefix) = (exe.clone(), dir.to_owned(), prefix.to_owned());
        tokio::task::spawn_blocking(move || {
            run_child_process(&exe, target, &dir, &prefix, Some(delay))
        })
        .await
        .map_err(|e| Failure::Failed(e.into()))??;
    }
    let (exe2, dir2, prefix2) = (exe.clone(), dir.to_owned(), prefix.to_owned());
    tokio::task::spawn_blocking(move || run_child_process(&exe2, target, &dir2, &prefix2, None))
        .await
        .map_err(|e| Failure::Failed(e.into()))??;

    // What the store holds.
    let store = store(target, dir, prefix).await?;
    let mut stored = BTreeSet::new();
    let mut from = 1;
    loop {
        let page = store
            .read_all(ReadAll::from(from, 10_000).filter(EventFilter::all().event_type(EVENT_TYPE)))
            .await
            .map_err(|e| Failure::Failed(e.into()))?;
        let Some(last) = page.last().and_then(EventEnvelope::global_position) else {
            break;
        };
        stored.extend(page.iter().map(|e| e.id().to_string()));
        from = last + 1;
    }
    drop(store);

    let handled_path = if target.handles_in_child() {
        dir.join("handled")
    } else {
        parent_handled
    };
    // On a broker the last deliveries may still be on their way to the parent: wait while
    // they keep coming, and give up after 60 s without one.
    let mut progress = (Instant::now(), 0);
    let handled = loop {
        let handled = read_ids(&handled_path)?;
        if stored.iter().all(|id| handled.contains_key(id)) {
            break handled;
        }
        if handled.len() > progress.1 {
            progress = (Instant::now(), handled.len());
        } else if progress.0.elapsed() > Duration::from_secs(60) {
            break handled;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some((orchestrator, subscription)) = watcher {
        subscription.unsubscribe().await;
        orchestrator.shutdown(Duration::from_secs(5)).await;
        ensure(
            orchestrator.relay_status().state == RelayState::Stopped,
            || "the parent's relay ran".to_owned(),
        )?;
    }
    let took = started.elapsed();
    let acked = read_ids(&dir.join("acked"))?;
    let lost_acked: Vec<&String> = acked.keys().filter(|id| !stored.contains(*id)).collect();
    let undelivered: Vec<&String> = stored
        .iter()
        .filter(|id| !handled.contains_key(*id))
        .collect();
    let duplicates: usize = handled.values().map(|n| n - 1).sum();
    let unknown = handled.keys().filter(|id| !stored.contains(*id)).count();
    eprintln!(
        "  {rounds} kills; {} publishes acknowledged, {} events stored, {} delivered ({} distinct, \
         {duplicates} redeliveries), {} acknowledged but not stored, {} stored but never \
         delivered; {:.1?}",
        acked.len(),
        stored.len(),
        handled.values().sum::<usize>(),
        handled.len(),
        lost_acked.len(),
        undelivered.len(),
        took
    );
    ensure(lost_acked.is_empty(), || {
        format!(
            "{} acknowledged publishes are not in the store, e.g. {:?}",
            lost_acked.len(),
            lost_acked.first()
        )
    })?;
    ensure(undelivered.is_empty(), || {
        format!(
            "{} stored events were never delivered, e.g. {:?}",
            undelivered.len(),
            undelivered.first()
        )
    })?;
    ensure(unknown == 0, || {
        format!("{unknown} delivered events are not in the store")
    })?;
    ensure(!stored.is_empty(), || "nothing was published".to_owned())?;
    let mut line = Report::new("publisher-crash", target.name());
    line.add("rounds", rounds)
        .add("acked", acked.len())
        .add("stored", stored.len())
        .add("delivered", handled.len())
        .add("redeliveries", duplicates)
        .add("missing", undelivered.len() + lost_acked.len())
        .add("seed", seed)
        .add("seconds", format!("{:.1}", took.as_secs_f64()));
    line.print();
    Ok(())
}
