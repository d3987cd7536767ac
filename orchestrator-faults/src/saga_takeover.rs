//! Saga takeover: two processes run sagas on one Redis store (a spare redis-server), each
//! with `SagaOrchestrator::watch_orphans`. A running saga is held under its lease, the Redis
//! key `<prefix>lease:saga.<id>` (5 s, renewed by its runner). One process is killed with
//! SIGKILL half-way through starting its sagas (or at a given time); the other must take its
//! unfinished sagas over once their leases expire, and carry them on from their logs.
//!
//! With `--concurrent 1` and a kill several seconds in, sagas wait for a slot longer than
//! their lease lasts while both processes live: the lease must be renewed while a saga
//! waits too, or the other process's orphan watch resumes a saga this one still runs.
//!
//! The saga is saga-crash's (four compensable steps; a third fail at `c`, a third at `d`),
//! with its side-effect file, whose lines also name the process that ran each invocation
//! and when. Checked: every saga Completed or Compensated, one action key per completed
//! step and one compensation key per completed step of a compensated saga (saga-crash's
//! accounting); no saga run by both processes while both lived — no two invocations of one
//! saga by two processes overlap in time, nothing of the dead process's sagas ran in the
//! survivor before the kill, and the survivor resumed none of them before the kill; the
//! takeover within the lease's time, the orphan watch's interval and a margin.
//!
//! The child process is this binary again
//! (`faults saga-takeover-child <url> <prefix> <effects> <first> <count>`): it says
//! `opened`, `started <k>` after its k-th start, `resumed <id>` for each saga it did not
//! start that its orphan watch resumed unfinished, `own-done` once its own sagas finished;
//! after its stdin closes it waits until every saga in the store is finished, says `done`.

use crate::Failure;

/// The child's command-line name.
pub(crate) const CHILD: &str = "saga-takeover-child";

/// The parent: two children with `sagas` sagas each, `concurrent` of them running at once
/// in each (the rest wait for a slot); the first is killed mid-run: after a random number
/// of its starts, or `kill_at` after it opened the store.
pub(crate) fn parent(
    target: &str,
    sagas: usize,
    concurrent: usize,
    kill_at: Option<std::time::Duration>,
) -> Result<(), Failure> {
    if target != "redis" {
        return Err(Failure::Failed(
            format!("unknown target `{target}` (redis)").into(),
        ));
    }
    #[cfg(feature = "redis")]
    {
        Ok(redis::parent(sagas, concurrent, kill_at)?)
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = (sagas, concurrent, kill_at);
        Err(crate::not_built("redis"))
    }
}

/// The child: start its sagas, take over orphans, finish when told.
pub(crate) fn child(args: &[String]) -> Result<(), Failure> {
    #[cfg(feature = "redis")]
    {
        let [url, prefix, effects, first, count, concurrent] = args else {
            return Err(Failure::Failed(
                "usage: saga-takeover-child <url> <prefix> <effects> <first> <count> <concurrent>"
                    .into(),
            ));
        };
        let number = |text: &str| {
            text.parse::<usize>()
                .map_err(|_| Failure::Failed(format!("{text:?} is not a number").into()))
        };
        let (first, count, concurrent) = (number(first)?, number(count)?, number(concurrent)?);
        let runtime = crate::runtime()?;
        Ok(runtime.block_on(redis::child(
            url,
            prefix,
            std::path::Path::new(effects),
            first..first + count,
            concurrent,
        ))?)
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = args;
        Err(crate::not_built("redis"))
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::collections::{BTreeMap, HashSet};
    use std::ffi::OsStr;
    use std::ops::Range;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use orchestrator::backends::redis::{RedisConfig, RedisEventStore};
    use orchestrator_saga::{SagaId, SagaOrchestrator, SagaStatus};
    use serde_json::json;

    use crate::child::{ChildProcess, epoch_ms, say, stdin_closed};
    use crate::saga_crash::{self, Effects, Span};
    use crate::spare::SpareRedis;
    use crate::{Report, Res, ensure};

    /// How often each process looks for orphaned sagas.
    const ORPHAN_INTERVAL: Duration = Duration::from_millis(500);
    /// A child starts one saga this often.
    const START_EVERY: Duration = Duration::from_millis(40);
    /// The Redis store's lease time.
    const LEASE_TTL: Duration = Duration::from_secs(5);

    /// The longest acceptable takeover: the lease runs out at most its time to live after
    /// the kill, the orphan watch looks every interval, and 2 s for a loaded machine.
    fn takeover_limit() -> Duration {
        LEASE_TTL + ORPHAN_INTERVAL + Duration::from_secs(2)
    }

    fn config(url: &str, prefix: &str) -> Res<RedisConfig> {
        Ok(RedisConfig::new(url)?.with_prefix(prefix.to_owned()))
    }

    pub(super) async fn child(
        url: &str,
        prefix: &str,
        effects: &Path,
        sagas: Range<usize>,
        concurrent: usize,
    ) -> Res {
        let store = RedisEventStore::connect(config(url, prefix)?).await?;
        let orchestrator = SagaOrchestrator::builder(Arc::new(store))
            .max_concurrent(concurrent)
            .build();
        orchestrator.define(saga_crash::definition(effects)?)?;
        let _watch = orchestrator.watch_orphans(ORPHAN_INTERVAL);
        say("opened")?;
        // The sagas this process started, and a lock held across each start and its entry
        // here, so that the reporter below never mistakes a saga being started for one
        // resumed (a saga is registered before its start returns).
        let started: Arc<tokio::sync::Mutex<HashSet<SagaId>>> = Arc::default();
        let reporter = {
            let (orchestrator, started) = (orchestrator.clone(), Arc::clone(&started));
            tokio::spawn(async move {
                let mut seen = HashSet::new();
                loop {
                    {
                        let started = started.lock().await;
                        for handle in orchestrator.list(None) {
                            let id = handle.id();
                            if started.contains(&id) || !seen.insert(id) {
                                continue;
                            }
                            // A saga found finished when resumed was not run here.
                            if !handle.status().is_finished() {
                                let _ = say(&format!("resumed {}", id.as_uuid()));
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let mut handles = Vec::new();
        for (k, n) in sagas.enumerate() {
            let input = json!({ "n": n, "fail_at": saga_crash::fails_at(n) });
            let handle = {
                let mut started = started.lock().await;
                let handle = orchestrator.start("trip", input).await?;
                started.insert(handle.id());
                handle
            };
            say(&format!("started {} {}", k + 1, handle.id().as_uuid()))?;
            handles.push(handle);
            tokio::time::sleep(START_EVERY).await;
        }
        for handle in handles {
            handle.outcome().await?;
        }
        say("own-done")?;
        // Told that the other process is gone: wait for every saga it left.
        stdin_closed().await;
        let waited = Instant::now();
        loop {
            let stored = orchestrator.list_stored().await?;
            if stored.iter().all(|s| s.finished.is_some()) {
                break;
            }
            ensure(waited.elapsed() < Duration::from_secs(60), || {
                let left = stored.iter().filter(|s| s.finished.is_none()).count();
                format!("{left} sagas still unfinished 60 s after the other process died")
            })?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        reporter.abort();
        say("done")
    }

    pub(super) fn parent(sagas: usize, concurrent: usize, kill_at: Option<Duration>) -> Res {
        ensure(sagas >= 6, || {
            "saga-takeover needs at least 6 sagas".to_owned()
        })?;
        let spare = SpareRedis::start()?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("orchestrator-faults-takeover-{id}"));
        std::fs::create_dir_all(&dir)?;
        let prefix = format!("takeover-{id}:");
        let result = scenario(&spare, &prefix, &dir, sagas, concurrent, kill_at);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn scenario(
        spare: &SpareRedis,
        prefix: &str,
        dir: &Path,
        sagas: usize,
        concurrent: usize,
        kill_at: Option<Duration>,
    ) -> Res {
        let seed = fastrand::u64(..);
        fastrand::seed(seed);
        let url = spare.url();
        let effects = dir.join("effects.log");
        let exe = std::env::current_exe()?;
        // The victim is killed after its k-th start, k in the middle third, or at a time.
        let kill_after = fastrand::usize(sagas / 3..=sagas * 2 / 3);
        let when = match kill_at {
            Some(at) => format!("{at:?} after it opened the store"),
            None => format!("after starting {kill_after}"),
        };
        eprintln!(
            "saga-takeover: two processes, {sagas} sagas each ({concurrent} at once), on one \
             Redis store (a spare redis-server), orphan watch every {ORPHAN_INTERVAL:?}; the \
             first is SIGKILLed {when}; seed {seed}"
        );
        let started = Instant::now();
        let spawn = |first: usize| {
            ChildProcess::spawn(
                &exe,
                [
                    OsStr::new(super::CHILD),
                    OsStr::new(&url),
                    OsStr::new(prefix),
                    effects.as_os_str(),
                    OsStr::new(&first.to_string()),
                    OsStr::new(&sagas.to_string()),
                    OsStr::new(&concurrent.to_string()),
                ],
            )
        };
        let mut victim = spawn(0)?;
        let mut survivor = spawn(sagas)?;
        let opened = victim.expect("opened", Duration::from_secs(60))?;
        survivor.expect("opened", Duration::from_secs(60))?;
        let want = format!("started {kill_after} ");
        let mut victim_said = Vec::new();
        if let Some(at) = kill_at {
            std::thread::sleep(at.saturating_sub(opened.elapsed()));
            if let Some(status) = victim.try_wait()? {
                return Err(format!("the first process ended before its kill ({status})").into());
            }
        }
        while kill_at.is_none() {
            let Some((at, line)) = victim.line(Duration::from_secs(60)) else {
                return Err("the first process went silent before its kill".into());
            };
            let reached = line.starts_with(&want);
            victim_said.push((at, line));
            if reached {
                break;
            }
        }
        let kill_ms = epoch_ms();
        let killed = Instant::now();
        victim.kill()?;
        let victim_pid = victim.pid();
        victim_said.extend(victim.finish());
        survivor.close_stdin();
        let status = survivor.wait(Duration::from_secs(120))?;
        let survivor_pid = survivor.pid();
        let said = survivor.finish();
        ensure(status.success(), || {
            format!("the surviving process failed ({status})")
        })?;
        ensure(said.iter().any(|(_, l)| l == "done"), || {
            "the surviving process did not say done".to_owned()
        })?;
        let took = started.elapsed();
        let resumed: Vec<(Instant, &str)> = said
            .iter()
            .filter_map(|(at, l)| Some((*at, l.strip_prefix("resumed ")?)))
            .collect();
        // Resumed while the other still lived: by the survivor before the kill, or by the
        // killed process at any time (the survivor never died).
        let mut early: Vec<String> = resumed
            .iter()
            .filter(|(at, _)| *at < killed)
            .map(|(_, id)| format!("{id} by the survivor"))
            .collect();
        early.extend(
            victim_said
                .iter()
                .filter_map(|(_, l)| l.strip_prefix("resumed "))
                .map(|id| format!("{id} by the killed process")),
        );
        ensure(early.is_empty(), || {
            let started_by = |id: &str| {
                let ends = |said: &[(Instant, String)]| {
                    said.iter()
                        .any(|(_, l)| l.starts_with("started ") && l.ends_with(id))
                };
                match (ends(&victim_said), ends(&said)) {
                    (true, _) => "started by the killed process",
                    (_, true) => "started by the survivor",
                    _ => "started by neither",
                }
            };
            let which: Vec<String> = early
                .iter()
                .map(|e| {
                    let id = e.split(' ').next().unwrap_or_default();
                    format!("{e} ({})", started_by(id))
                })
                .collect();
            format!(
                "{} sagas were resumed while the process running them lived: {}",
                early.len(),
                which.join(", ")
            )
        })?;
        ensure(!resumed.is_empty(), || {
            "the survivor resumed no saga: the kill found none unfinished".to_owned()
        })?;
        let first_takeover = resumed
            .iter()
            .map(|(at, _)| at.duration_since(killed))
            .min()
            .unwrap_or_default();
        let last_takeover = resumed
            .iter()
            .map(|(at, _)| at.duration_since(killed))
            .max()
            .unwrap_or_default();

        // The store and the side effects.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let outcomes = runtime.block_on(async {
            let store = RedisEventStore::connect(config(&url, prefix)?).await?;
            saga_crash::outcomes(&SagaOrchestrator::new(Arc::new(store))).await
        })?;
        let effects = saga_crash::read_effects(&effects)?;
        let victim_started = victim_said
            .iter()
            .filter(|(_, l)| l.starts_with("started "))
            .count();
        let stored = outcomes.statuses.len();
        // The victim may have logged one more start than it said before it died.
        ensure(
            (victim_started + sagas..=victim_started + sagas + 1).contains(&stored),
            || {
                format!(
                    "{stored} sagas in the store; the processes said they started \
                     {victim_started} + {sagas}"
                )
            },
        )?;
        saga_crash::check(stored, &outcomes.statuses, &outcomes.steps, &effects)?;
        let shared = run_by_both(&effects, victim_pid, kill_ms);
        ensure(shared.is_empty(), || {
            format!(
                "{} sagas were run by both processes at once, e.g. {:?}",
                shared.len(),
                shared.first()
            )
        })?;
        let pids: HashSet<u32> = effects.spans.iter().map(|s| s.pid).collect();
        ensure(
            pids.iter().all(|p| *p == victim_pid || *p == survivor_pid),
            || format!("side effects from processes {pids:?}"),
        )?;
        ensure(first_takeover <= takeover_limit(), || {
            format!(
                "the first saga was taken over after {first_takeover:.1?}, over the limit {:.1?}",
                takeover_limit()
            )
        })?;

        let count = |s: SagaStatus| outcomes.statuses.values().filter(|&&x| x == s).count();
        let (done_keys, undone_keys) = effects.keys();
        let secs = |d: Duration| format!("{:.1}", d.as_secs_f64());
        eprintln!(
            "  {stored} sagas ({victim_started} started by the killed process): {} completed, {} \
             compensated; {} taken over, the first after {first_takeover:.1?}, the last after \
             {last_takeover:.1?}; actions {} lines / {done_keys} keys, compensations {} lines / \
             {undone_keys} keys; {took:.1?}",
            count(SagaStatus::Completed),
            count(SagaStatus::Compensated),
            resumed.len(),
            effects.lines.0,
            effects.lines.1,
        );
        let mut line = Report::new("saga-takeover", "redis");
        line.add("sagas", stored)
            .add("started_by_killed", victim_started)
            .add("concurrent", concurrent)
            .add(
                "killed_after",
                kill_at.map_or_else(
                    || format!("{victim_started} starts"),
                    |at| format!("{:.1} s", at.as_secs_f64()),
                ),
            )
            .add("completed", count(SagaStatus::Completed))
            .add("compensated", count(SagaStatus::Compensated))
            .add(
                "other_status",
                stored - count(SagaStatus::Completed) - count(SagaStatus::Compensated),
            )
            .add("taken_over", resumed.len())
            .add("takeover_first_s", secs(first_takeover))
            .add("takeover_last_s", secs(last_takeover))
            .add("takeover_limit_s", secs(takeover_limit()))
            .add("run_by_both", shared.len());
        effects.report(&mut line);
        line.add("seed", seed).add("seconds", secs(took));
        line.print();
        Ok(())
    }

    /// The sagas two processes ran at once: two invocations of one saga by two processes
    /// overlapping in time, or an invocation by the survivor, of a saga the killed process
    /// had run, starting before the kill.
    pub(super) fn run_by_both(effects: &Effects, victim: u32, kill_ms: u64) -> Vec<String> {
        let mut by_saga: BTreeMap<&str, Vec<&Span>> = BTreeMap::new();
        for span in &effects.spans {
            by_saga.entry(&span.saga).or_default().push(span);
        }
        by_saga
            .into_iter()
            .filter(|(_, spans)| {
                let victim_ran = spans.iter().any(|s| s.pid == victim);
                let overlap = spans.iter().any(|a| {
                    spans.iter().any(|b| {
                        a.pid != b.pid && a.started_ms < b.ended_ms && b.started_ms < a.ended_ms
                    })
                });
                let early = victim_ran
                    && spans
                        .iter()
                        .any(|s| s.pid != victim && s.started_ms < kill_ms);
                overlap || early
            })
            .map(|(saga, _)| saga.to_owned())
            .collect()
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use crate::saga_crash::{Effects, Span};

    fn span(saga: &str, pid: u32, started_ms: u64, ended_ms: u64) -> Span {
        Span {
            saga: saga.to_owned(),
            pid,
            started_ms,
            ended_ms,
        }
    }

    #[test]
    fn finds_sagas_run_by_both_processes() {
        let effects = Effects {
            spans: vec![
                // Taken over after the kill (at 1,000): fine.
                span("taken", 1, 100, 200),
                span("taken", 2, 6_000, 6_100),
                // The survivor's own saga: fine.
                span("own", 2, 300, 400),
                // Two processes at once.
                span("overlap", 1, 500, 600),
                span("overlap", 2, 550, 650),
                // The survivor ran a step of the victim's saga before the kill.
                span("early", 1, 100, 200),
                span("early", 2, 700, 800),
            ],
            ..Effects::default()
        };
        assert_eq!(
            super::redis::run_by_both(&effects, 1, 1_000),
            ["early", "overlap"]
        );
    }
}
