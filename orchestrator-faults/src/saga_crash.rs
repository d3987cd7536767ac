//! A process running sagas on the embedded file store is killed with SIGKILL at random
//! moments, again and again; each new process calls `recover()` and carries on. In the end
//! every saga must be Completed or Compensated, and each compensation must have happened
//! exactly once per completed step.
//!
//! The saga has four steps, `a`–`d`, each compensable. A third of the sagas fail at `c`
//! (so `b` and `a` are compensated), a third at `d` (`c`, `b`, `a`), the rest complete.
//! Every action and compensation appends one line — `do <key>` or `undo <key>`, the key
//! being the invocation's idempotency key `<saga id>:<step>:[compensate:]<attempt>` — to a
//! side-effect file shared by all the processes. A kill between a side effect and its log
//! record makes recovery run the invocation again with the same key: the line appears
//! twice, and a receiver keyed by it would do the work once. So the checks count distinct
//! keys: exactly one action key per completed step, exactly one compensation key per
//! completed step of a compensated saga, none for anything else; repeated lines are
//! reported as re-runs absorbed by the key.
//!
//! The child process is this binary again (`faults saga-child <store> <effects> <sagas>`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator_core::HandlerError;
use orchestrator_saga::{SagaDefinition, SagaOrchestrator, SagaStatus, SagaStep, StepInfo};
use orchestrator_store::file::FileEventStore;
use serde_json::{Value, json};

use crate::child::{ChildProcess, epoch_ms, say};
use crate::{Failure, Report, Res, ensure};

/// The child's command-line name.
pub(crate) const CHILD: &str = "saga-child";
/// The saga's steps.
const STEPS: [&str; 4] = ["a", "b", "c", "d"];
/// How long the parent lets a child run, at most, before killing it.
const MAX_KILL_DELAY_MS: u64 = 200;
/// Sagas running at once: the rest wait for a slot, so a kill finds sagas at every stage
/// (waiting, in a step, compensating) and the whole run lasts a few seconds.
const CONCURRENT: usize = 10;

/// The step that fails for saga number `n`, if any.
pub(crate) fn fails_at(n: usize) -> Option<&'static str> {
    match n % 3 {
        1 => Some("c"),
        2 => Some("d"),
        _ => None,
    }
}

/// Appends one line to the side-effect file, in one write (`O_APPEND`: lines from
/// concurrent tasks and processes never interleave): `kind key pid started ended`.
fn record_effect(effects: &Path, kind: &str, key: &str, started: u64) -> Result<(), HandlerError> {
    let line = format!(
        "{kind} {key} {} {started} {}\n",
        std::process::id(),
        epoch_ms()
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(effects)
        .map_err(|e| HandlerError::from_error(e, true))?;
    file.write_all(line.as_bytes())
        .map_err(|e| HandlerError::from_error(e, true))
}

/// The saga: four compensable steps that take 30–150 ms each (compensations 10–60 ms).
/// Each side-effect line is `do|undo <key> <pid> <started ms> <ended ms>`: which process
/// ran the invocation, and when (milliseconds since the epoch).
pub(crate) fn definition(effects: &Path) -> Res<SagaDefinition> {
    let steps = STEPS.map(|name| {
        let (act, undo) = (effects.to_path_buf(), effects.to_path_buf());
        SagaStep::new(name, move |context: Value| {
            let effects = act.clone();
            async move {
                let info = StepInfo::from_context(&context)
                    .ok_or_else(|| HandlerError::permanent("not called by a saga"))?;
                if context["fail_at"] == info.step {
                    return Err(HandlerError::permanent(format!("{} refused", info.step)));
                }
                let started = epoch_ms();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(30..150))).await;
                record_effect(&effects, "do", &info.idempotency_key, started)?;
                Ok::<_, HandlerError>(json!({ info.step: true }))
            }
        })
        .with_compensation(move |context: Value| {
            let effects = undo.clone();
            async move {
                let info = StepInfo::from_context(&context)
                    .ok_or_else(|| HandlerError::permanent("not called by a saga"))?;
                let started = epoch_ms();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(10..60))).await;
                record_effect(&effects, "undo", &info.idempotency_key, started)
            }
        })
    });
    Ok(SagaDefinition::new("trip", steps)?)
}

/// The child: recover what the last one left, start the sagas still missing, wait for all.
pub(crate) fn child(args: &[String]) -> Result<(), Failure> {
    let [store_dir, effects, sagas] = args else {
        return Err(Failure::Failed(
            "usage: saga-child <store> <effects> <sagas>".into(),
        ));
    };
    let sagas: usize = sagas
        .parse()
        .map_err(|_| Failure::Failed("saga-child: <sagas> is not a number".into()))?;
    let runtime = crate::runtime()?;
    Ok(runtime.block_on(run_child(Path::new(store_dir), Path::new(effects), sagas))?)
}

async fn run_child(store_dir: &Path, effects: &Path, sagas: usize) -> Res {
    let store = FileEventStore::open(store_dir)?;
    let orchestrator = SagaOrchestrator::builder(Arc::new(store))
        .max_concurrent(CONCURRENT)
        .build();
    orchestrator.define(definition(effects)?)?;
    say("opened")?;
    let recovery = orchestrator.recover().await?;
    if let Some((id, error)) = recovery.failed.first() {
        return Err(format!("recover() could not resume saga {id}: {error}").into());
    }
    say(&format!("recovered {}", recovery.resumed.len()))?;
    let mut handles = recovery.resumed;
    let stored = orchestrator.list_stored().await?.len();
    for n in stored..sagas {
        let input = json!({ "n": n, "fail_at": fails_at(n) });
        handles.push(orchestrator.start("trip", input).await?);
    }
    for handle in handles {
        handle.outcome().await?;
    }
    say("done")
}

/// What the parent learnt from one child.
#[derive(Debug, Default)]
struct ChildRun {
    /// Sagas its `recover()` resumed.
    recovered: usize,
    /// Whether it said `done` (all sagas finished) before it was killed.
    finished: bool,
}

/// Runs one child; kills it `kill_after` after it opened the store, or lets it finish.
fn run_child_process(
    exe: &Path,
    store: &Path,
    effects: &Path,
    sagas: usize,
    kill_after: Option<Duration>,
) -> Res<ChildRun> {
    let sagas = sagas.to_string();
    let mut child = ChildProcess::spawn(
        exe,
        [
            OsStr::new(CHILD),
            store.as_os_str(),
            effects.as_os_str(),
            OsStr::new(&sagas),
        ],
    )?;
    child.expect("opened", Duration::from_secs(60))?;
    match kill_after {
        Some(delay) => {
            std::thread::sleep(delay);
            // A child that ended on its own before the kill must have ended well.
            if let Some(status) = child.try_wait()? {
                ensure(status.success(), || format!("a child failed ({status})"))?;
            } else {
                child.kill()?;
            }
        }
        None => {
            let status = child.wait(Duration::from_secs(300))?;
            ensure(status.success(), || {
                format!("the last child failed ({status})")
            })?;
        }
    }
    let mut run = ChildRun::default();
    for (_, line) in child.finish() {
        if let Some(n) = line.strip_prefix("recovered ") {
            run.recovered = n.parse().unwrap_or(0);
        } else if line == "done" {
            run.finished = true;
        }
    }
    Ok(run)
}

/// One side effect: which process ran it for which saga, and when (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    /// The saga's id.
    pub(crate) saga: String,
    /// The process that ran it.
    pub(crate) pid: u32,
    /// When the invocation started.
    pub(crate) started_ms: u64,
    /// When its side effect was written.
    pub(crate) ended_ms: u64,
}

/// The side effects, by saga id: each invocation key and how many lines it has.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// `(saga id, step) → {key → lines}` for actions.
    pub(crate) done: BTreeMap<(String, String), BTreeMap<String, usize>>,
    /// The same for compensations.
    pub(crate) undone: BTreeMap<(String, String), BTreeMap<String, usize>>,
    /// Lines in all, of each kind.
    pub(crate) lines: (usize, usize),
    /// Every line's process and time span, in file order.
    pub(crate) spans: Vec<Span>,
}

impl Effects {
    /// Lines repeated with the same key: invocations run again after a kill, which a
    /// receiver keyed by the idempotency key does once.
    pub(crate) fn reruns(&self) -> usize {
        self.lines.0 + self.lines.1 - self.keys().0 - self.keys().1
    }

    /// Adds the side-effect accounting to a report: lines and distinct keys of each kind,
    /// and the re-runs the keys absorbed.
    pub(crate) fn report(&self, line: &mut Report) {
        let (done_keys, undone_keys) = self.keys();
        line.add("action_effects", self.lines.0)
            .add("action_keys", done_keys)
            .add("compensation_effects", self.lines.1)
            .add("compensation_keys", undone_keys)
            .add("reruns_absorbed_by_key", self.reruns());
    }

    /// Distinct action keys and compensation keys.
    pub(crate) fn keys(&self) -> (usize, usize) {
        let distinct = |m: &BTreeMap<(String, String), BTreeMap<String, usize>>| {
            m.values().map(BTreeMap::len).sum::<usize>()
        };
        (distinct(&self.done), distinct(&self.undone))
    }
}

/// Reads the side-effect file.
pub(crate) fn read_effects(path: &Path) -> Res<Effects> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut effects = Effects::default();
    for line in text.lines() {
        let bad = || format!("bad line {line:?}");
        let mut words = line.split(' ');
        let (Some(kind), Some(key), Some(pid), Some(started), Some(ended), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            return Err(bad().into());
        };
        let mut parts = key.split(':');
        let (Some(saga), Some(step)) = (parts.next(), parts.next()) else {
            return Err(format!("bad key {key:?}").into());
        };
        let map = match kind {
            "do" => {
                effects.lines.0 += 1;
                &mut effects.done
            }
            "undo" => {
                effects.lines.1 += 1;
                &mut effects.undone
            }
            _ => return Err(bad().into()),
        };
        *map.entry((saga.to_owned(), step.to_owned()))
            .or_default()
            .entry(key.to_owned())
            .or_default() += 1;
        effects.spans.push(Span {
            saga: saga.to_owned(),
            pid: pid.parse().map_err(|_| bad())?,
            started_ms: started.parse().map_err(|_| bad())?,
            ended_ms: ended.parse().map_err(|_| bad())?,
        });
    }
    Ok(effects)
}

/// The parent: kill children at random moments, let the last one finish, check.
pub(crate) fn parent(sagas: usize, kills: usize) -> Result<(), Failure> {
    let base = std::env::temp_dir().join(format!(
        "orchestrator-faults-sagas-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let result = scenario(&base, sagas, kills);
    let _ = std::fs::remove_dir_all(&base);
    Ok(result?)
}

fn scenario(base: &Path, sagas: usize, kills: usize) -> Res {
    let seed = fastrand::u64(..);
    fastrand::seed(seed);
    let (store, effects): (PathBuf, PathBuf) = (base.join("store"), base.join("effects.log"));
    std::fs::create_dir_all(base)?;
    let exe = std::env::current_exe()?;
    eprintln!(
        "saga-crash: {sagas} sagas on the file store, {kills} SIGKILLs at random moments \
         (0–{MAX_KILL_DELAY_MS} ms after the store opens), then recover() to the end; seed {seed}"
    );
    let started = Instant::now();
    let (mut recovered, mut kills_mid_run) = (0, 0);
    for _ in 0..kills {
        let delay = Duration::from_millis(fastrand::u64(0..=MAX_KILL_DELAY_MS));
        let run = run_child_process(&exe, &store, &effects, sagas, Some(delay))?;
        recovered += run.recovered;
        kills_mid_run += usize::from(!run.finished);
    }
    let last = run_child_process(&exe, &store, &effects, sagas, None)?;
    recovered += last.recovered;
    ensure(last.finished, || {
        "the last child did not finish its sagas".to_owned()
    })?;
    let took = started.elapsed();

    // Check, from the store and the side-effect file.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let Outcomes {
        statuses,
        steps: completed_steps,
    } = runtime.block_on(async {
        let orchestrator = SagaOrchestrator::new(Arc::new(FileEventStore::open(&store)?));
        outcomes(&orchestrator).await
    })?;
    let effects = read_effects(&effects)?;
    check(sagas, &statuses, &completed_steps, &effects)?;

    let count = |s: SagaStatus| statuses.values().filter(|&&x| x == s).count();
    let (done_keys, undone_keys) = effects.keys();
    eprintln!(
        "  {} sagas: {} completed, {} compensated; {kills} kills ({kills_mid_run} while sagas \
         were unfinished), {recovered} sagas resumed by recover(); actions: {} side effects, \
         {done_keys} distinct keys; compensations: {} side effects, {undone_keys} distinct keys; \
         {:.1?}",
        statuses.len(),
        count(SagaStatus::Completed),
        count(SagaStatus::Compensated),
        effects.lines.0,
        effects.lines.1,
        took
    );
    let mut line = Report::new("saga-crash", "file store");
    line.add("sagas", statuses.len())
        .add("completed", count(SagaStatus::Completed))
        .add("compensated", count(SagaStatus::Compensated))
        .add(
            "other_status",
            statuses.len() - count(SagaStatus::Completed) - count(SagaStatus::Compensated),
        )
        .add("kills", kills)
        .add("kills_mid_run", kills_mid_run)
        .add("resumed_by_recover", recovered);
    effects.report(&mut line);
    line.add("seed", seed)
        .add("seconds", format!("{:.1}", took.as_secs_f64()));
    line.print();
    Ok(())
}

/// How the sagas in a store ended, by saga id.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    /// Each saga's status.
    pub(crate) statuses: BTreeMap<String, SagaStatus>,
    /// Each saga's completed and compensated steps.
    pub(crate) steps: BTreeMap<String, (Vec<String>, Vec<String>)>,
}

/// Reads every saga the store holds, whoever ran it.
pub(crate) async fn outcomes(orchestrator: &SagaOrchestrator) -> Res<Outcomes> {
    let mut outcomes = Outcomes::default();
    for stored in orchestrator.list_stored().await? {
        let snapshot = orchestrator.load(stored.id).await?;
        let id = stored.id.as_uuid().to_string();
        outcomes.statuses.insert(id.clone(), snapshot.status);
        outcomes
            .steps
            .insert(id, (snapshot.completed_steps, snapshot.compensated_steps));
    }
    Ok(outcomes)
}

/// Every saga ended well, and the side effects match the log.
pub(crate) fn check(
    sagas: usize,
    statuses: &BTreeMap<String, SagaStatus>,
    steps: &BTreeMap<String, (Vec<String>, Vec<String>)>,
    effects: &Effects,
) -> Res {
    ensure(statuses.len() == sagas, || {
        format!("{} sagas in the store, {sagas} started", statuses.len())
    })?;
    for (id, status) in statuses {
        let (completed, compensated) = &steps[id];
        let keys = |map: &BTreeMap<(String, String), BTreeMap<String, usize>>, step: &str| {
            map.get(&(id.clone(), step.to_owned()))
                .map_or(0, BTreeMap::len)
        };
        match status {
            SagaStatus::Completed => {
                ensure(completed.len() == STEPS.len(), || {
                    format!("saga {id} completed with steps {completed:?}")
                })?;
            }
            SagaStatus::Compensated => {
                let done: BTreeSet<&String> = completed.iter().collect();
                let undone: BTreeSet<&String> = compensated.iter().collect();
                ensure(done == undone, || {
                    format!("saga {id}: completed {completed:?} but compensated {compensated:?}")
                })?;
            }
            other => return Err(format!("saga {id} ended {other:?}").into()),
        }
        for step in STEPS {
            let was_completed = completed.iter().any(|s| s == step);
            let (do_keys, undo_keys) = (keys(&effects.done, step), keys(&effects.undone, step));
            ensure(do_keys == usize::from(was_completed), || {
                format!("saga {id} step {step}: {do_keys} action keys, completed: {was_completed}")
            })?;
            let want = usize::from(was_completed && *status == SagaStatus::Compensated);
            ensure(undo_keys == want, || {
                format!("saga {id} step {step}: {undo_keys} compensation keys, {want} expected")
            })?;
        }
    }
    let unknown = effects
        .done
        .keys()
        .chain(effects.undone.keys())
        .find(|(saga, _)| !statuses.contains_key(saga));
    ensure(unknown.is_none(), || {
        format!("side effects of a saga the store does not know: {unknown:?}")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_side_effect_lines_with_their_process_and_time() {
        let path = std::env::temp_dir().join(format!(
            "orchestrator-faults-effects-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(
            &path,
            "do s1:a:1 10 100 150\ndo s1:a:1 11 200 260\nundo s1:a:compensate:1 11 300 320\n",
        )
        .unwrap();
        let effects = super::read_effects(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(effects.lines, (2, 1));
        assert_eq!(effects.keys(), (1, 1));
        assert_eq!(effects.reruns(), 1);
        assert_eq!(effects.spans[1].pid, 11);
        assert_eq!(effects.spans[1].ended_ms, 260);
        std::fs::write(&path, "do s1:a:1\n").unwrap();
        assert!(
            super::read_effects(&path).is_err(),
            "a line without its process"
        );
        let _ = std::fs::remove_file(&path);
    }
}
