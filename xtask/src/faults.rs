//! `cargo xtask faults [--short]`: the fault suite — broker restarts mid-run, SIGKILLed
//! saga processes, concurrent writers on every store, SIGKILLed publishers, broker outages
//! under publishers, relay failover and saga takeover between processes, a slow handler
//! with bounded memory.
//!
//! Each scenario is one run of the `faults` binary of `orchestrator-faults` (built once,
//! with every backend feature, the same build as `cargo test --workspace --all-features`),
//! which prints its figures on a `result …` line. Scenarios on a backend whose service is
//! unreachable are skipped with the reason — and fail under `CI=true`. The figures go to
//! `FAULTS.md` (`--short`: under the target folder, so CI leaves the checkout alone).

mod report;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Result, cargo, describe, machine, reachable};

/// Command-line options of `faults`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Options {
    /// The CI-sized suite: 10,000 events per restart, 8 × 1,000 appends, 100,000 events
    /// through the slow handler.
    pub(crate) short: bool,
    /// Where to write the summary.
    pub(crate) out: Option<PathBuf>,
    /// Only the scenarios whose name starts with one of these.
    pub(crate) only: Vec<String>,
}

impl Options {
    /// Parses `[--short] [--out <file>] [<scenario>…]`.
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut options = Options::default();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--short" => options.short = true,
                "--out" => {
                    let out = rest.next().ok_or("faults: --out needs a file name")?;
                    options.out = Some(PathBuf::from(out));
                }
                name if !name.starts_with('-')
                    && scenarios(false).iter().any(|s| s.name.starts_with(name)) =>
                {
                    options.only.push(name.to_owned());
                }
                other => {
                    let known: Vec<String> = scenarios(false).into_iter().map(|s| s.name).collect();
                    return Err(format!(
                        "faults: unexpected argument `{other}` (scenarios: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(options)
    }
}

/// One run of the `faults` binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scenario {
    /// `restart-redis`, `saga-crash`, `writers-file`, …
    pub(crate) name: String,
    /// The binary's arguments.
    args: Vec<String>,
    /// The service it needs (`redis`, `rabbitmq`, `kafka`).
    service: Option<&'static str>,
    /// How long it may take.
    timeout: Duration,
}

/// The suite, full or short.
pub(crate) fn scenarios(short: bool) -> Vec<Scenario> {
    let pick = |full: u64, short_size: u64| if short { short_size } else { full };
    let scenario = |name: String, args: Vec<String>, service, secs: u64| Scenario {
        name,
        args,
        service,
        timeout: Duration::from_secs(secs),
    };
    let mut all = Vec::new();
    for backend in ["redis", "rabbitmq", "kafka"] {
        let events = pick(100_000, 10_000);
        // Redis and Kafka restarts run a broker of their own (the binary says when
        // redis-server or tansu is missing); RabbitMQ's restarts the shared one.
        let service = (backend == "rabbitmq").then_some(backend);
        all.push(scenario(
            format!("restart-{backend}"),
            vec![
                "restart".into(),
                backend.into(),
                "--events".into(),
                events.to_string(),
            ],
            service,
            pick(900, 300),
        ));
    }
    all.push(scenario(
        "saga-crash".into(),
        vec![
            "saga-crash".into(),
            "--sagas".into(),
            "100".into(),
            "--kills".into(),
            pick(25, 8).to_string(),
        ],
        None,
        pick(600, 240),
    ));
    for store in ["memory", "file", "redis", "rabbitmq", "kafka"] {
        // Kafka's writers use a tansu of their own (the binary says when it is missing).
        let service = match store {
            "redis" => Some("redis"),
            "rabbitmq" => Some("rabbitmq"),
            _ => None,
        };
        all.push(scenario(
            format!("writers-{store}"),
            vec![
                "writers".into(),
                store.into(),
                "--writers".into(),
                "8".into(),
                "--appends".into(),
                // Kafka too: its appends are indexed from their delivery reports (about
                // 1,300 a second on tansu with sqlite, 8 writers).
                pick(10_000, 1_000).to_string(),
            ],
            service,
            pick(900, 180),
        ));
    }
    for target in [
        "file-memory",
        "file-redis",
        "redis-redis",
        "postgres-redis",
        "postgres-postgres",
    ] {
        all.push(scenario(
            format!("publisher-crash-{target}"),
            vec![
                "publisher-crash".into(),
                target.into(),
                "--rounds".into(),
                // 50 kills in CI too, as the store-first issue asks (about a minute each).
                "50".into(),
            ],
            // postgres-*: the binary says when PostgreSQL cannot be reached.
            target.contains("redis").then_some("redis"),
            pick(600, 600),
        ));
    }
    for broker in ["redis", "rabbitmq"] {
        all.push(scenario(
            format!("publisher-outage-{broker}"),
            vec![
                "publisher-outage".into(),
                broker.into(),
                "--events".into(),
                pick(20_000, 5_000).to_string(),
            ],
            // A redis-server or RabbitMQ node of its own (the binary says when it cannot
            // start one); the shared brokers are never stopped.
            None,
            pick(300, 180),
        ));
    }
    // Processes sharing a spare redis-server (started by the binary).
    all.push(scenario(
        "relay-failover-redis".into(),
        vec![
            "relay-failover".into(),
            "redis".into(),
            "--children".into(),
            pick(5, 3).to_string(),
        ],
        None,
        pick(300, 180),
    ));
    all.push(scenario(
        "saga-takeover-redis".into(),
        vec![
            "saga-takeover".into(),
            "redis".into(),
            "--sagas".into(),
            pick(100, 40).to_string(),
        ],
        None,
        pick(300, 180),
    ));
    // One saga at a time per process, the kill seconds in: sagas wait for a slot longer
    // than their lease lasts while both processes live (their leases must be renewed
    // meanwhile, or the other process resumes them).
    all.push(scenario(
        "saga-takeover-queued-redis".into(),
        vec![
            "saga-takeover".into(),
            "redis".into(),
            "--sagas".into(),
            pick(40, 30).to_string(),
            "--concurrent".into(),
            "1".into(),
            "--kill-after-ms".into(),
            pick(10_000, 7_000).to_string(),
        ],
        None,
        pick(300, 180),
    ));
    all.push(scenario(
        "slow-handler".into(),
        vec![
            "slow-handler".into(),
            "--events".into(),
            pick(1_000_000, 100_000).to_string(),
        ],
        None,
        pick(300, 120),
    ));
    all.push(scenario(
        "soak-memory".into(),
        vec![
            "soak-memory".into(),
            "--events".into(),
            pick(1_000_000, 200_000).to_string(),
            "--cap".into(),
            pick(100_000, 20_000).to_string(),
        ],
        None,
        pick(300, 120),
    ));
    all
}

/// How one scenario ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// It passed; its figures.
    Passed(BTreeMap<String, String>),
    /// It could not run here (service down, tool missing); why.
    Skipped(String),
    /// A check failed, it crashed or it timed out; why.
    Failed(String),
}

/// Reads the `result …` line: `result passed k=v …`, `result failed reason=…`,
/// `result cannot-run reason=…`.
pub(crate) fn parse_result(line: &str) -> Option<Outcome> {
    let mut words = line.split_whitespace();
    if words.next()? != "result" {
        return None;
    }
    let verdict = words.next()?;
    let fields: BTreeMap<String, String> = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let reason = || {
        fields
            .get("reason")
            .map_or_else(String::new, |r| r.replace('_', " "))
    };
    match verdict {
        "passed" => Some(Outcome::Passed(fields)),
        "cannot-run" => Some(Outcome::Skipped(reason())),
        "failed" => Some(Outcome::Failed(reason())),
        _ => None,
    }
}

/// Builds the `faults` binary the way `cargo test --workspace --all-features` builds.
fn build(root: &Path) -> Result<PathBuf> {
    let mut cmd = cargo(root);
    cmd.args(["build", "--workspace", "--all-features", "--bin", "faults"])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit());
    eprintln!("==> building the fault suite\n    $ {}", describe(&cmd));
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if !output.status.success() {
        return Err(format!("`{}` failed ({})", describe(&cmd), output.status));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    crate::bench::executables(&text, "bin")
        .remove("faults")
        .map(|(exe, _)| exe)
        .ok_or_else(|| "cargo built no `faults` binary".to_owned())
}

/// Stops the spare brokers a killed scenario left behind (their ids are in `pids`), then
/// removes their data folders (the lines `dir <path>` there).
fn stop_leftovers(pids: &Path) {
    let Ok(text) = fs::read_to_string(pids) else {
        return;
    };
    for pid in running_leftovers(&text) {
        // Only processes this run's scenario started and did not reap, by id.
        let _ = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    for dir in text.lines().filter_map(leftover_dir) {
        // Gone already when the scenario ended by itself (its brokers remove their data).
        let _ = fs::remove_dir_all(dir);
    }
    let _ = fs::remove_file(pids);
}

/// The ids a pids file records as started (a line with the number) and not as reaped (a
/// line `done <pid>`): an id the scenario reaped may already belong to another process.
fn running_leftovers(text: &str) -> Vec<u32> {
    let id = |line: &str| line.trim().parse::<u32>().ok();
    let done: Vec<u32> = text
        .lines()
        .filter_map(|line| line.strip_prefix("done ").and_then(id))
        .collect();
    text.lines()
        .filter_map(id)
        .filter(|pid| !done.contains(pid))
        .collect()
}

/// The data folder a `dir <path>` line of a pids file names, if it is one the `faults`
/// binary makes: `orchestrator-faults-…` directly under the temporary folder.
fn leftover_dir(line: &str) -> Option<&Path> {
    let dir = Path::new(line.strip_prefix("dir ")?.trim_end());
    let name = dir.file_name()?.to_str()?;
    (name.starts_with("orchestrator-faults-") && dir.parent()? == std::env::temp_dir())
        .then_some(dir)
}

/// Makes sure the shared RabbitMQ runs again after a scenario that stopped its app.
fn restore_rabbitmq() {
    if reachable::service("rabbitmq").is_ok() {
        return;
    }
    eprintln!("    RabbitMQ is down after the scenario: rabbitmqctl start_app");
    let ctl = |args: &[&str]| {
        Command::new("rabbitmqctl")
            .args(args)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !(ctl(&["start_app"]) && ctl(&["await_startup", "--timeout", "120"])) {
        eprintln!("    could not start RabbitMQ again: run `rabbitmqctl start_app`");
    }
}

/// Runs one scenario to its end or its time limit.
fn run_scenario(exe: &Path, scenario: &Scenario, work: &Path) -> Outcome {
    if let Some(service) = scenario.service
        && let Err(why) = reachable::service(service)
    {
        return Outcome::Skipped(why);
    }
    let pids = work.join(format!("{}.pids", scenario.name));
    let _ = fs::remove_file(&pids);
    let mut cmd = Command::new(exe);
    cmd.args(&scenario.args)
        .env("ORCHESTRATOR_FAULTS_PIDS", &pids)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!(
        "\n==> fault scenario {}\n    $ {}",
        scenario.name,
        describe(&cmd)
    );
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return Outcome::Failed(format!("cannot run `{}`: {e}", describe(&cmd))),
    };
    let reader = child.stdout.take().map(|stdout| {
        thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(std::io::Result::ok)
                .filter_map(|line| parse_result(&line))
                .last()
        })
    });
    // `None`: it ran past its time limit and was killed.
    let exit = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(Ok(status)),
            Ok(None) if started.elapsed() > scenario.timeout => {
                // Our own child, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(100)),
            Err(e) => break Some(Err(e)),
        }
    };
    let result = reader.and_then(|r| r.join().ok()).flatten();
    stop_leftovers(&pids);
    if scenario.name.contains("rabbitmq") {
        restore_rabbitmq();
    }
    let took = started.elapsed().as_secs_f64();
    let outcome = match (exit, result) {
        (None, _) => Outcome::Failed(format!(
            "stopped after {}s (its time limit)",
            scenario.timeout.as_secs()
        )),
        (Some(exit), Some(outcome)) => after_exit(outcome, exit),
        (Some(_), None) => Outcome::Failed("ended without a result line (crashed?)".to_owned()),
    };
    eprintln!("    {} in {took:.0}s", report::verdict(&outcome));
    outcome
}

/// The outcome a result line gave, unless the process then failed: a `passed` scenario
/// whose process crashed afterwards (in its tear-down) did not pass.
fn after_exit(outcome: Outcome, exit: std::io::Result<std::process::ExitStatus>) -> Outcome {
    match (outcome, exit) {
        (Outcome::Passed(_), Ok(status)) if !status.success() => Outcome::Failed(format!(
            "its checks passed, then its process ended with {status} (in its tear-down)"
        )),
        (Outcome::Passed(_), Err(e)) => Outcome::Failed(format!(
            "its checks passed, then waiting for it failed: {e}"
        )),
        (outcome, _) => outcome,
    }
}

/// `cargo xtask faults`.
pub(crate) fn faults(root: &Path, options: &Options) -> Result<()> {
    let started = Instant::now();
    let load_before = machine::load_average();
    let work = crate::bench::target_dir(root).join("xtask-faults");
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let exe = build(root)?;
    let selected: Vec<Scenario> = scenarios(options.short)
        .into_iter()
        .filter(|s| options.only.is_empty() || options.only.iter().any(|o| s.name.starts_with(o)))
        .collect();
    let mut outcomes = Vec::new();
    for scenario in &selected {
        let outcome = run_scenario(&exe, scenario, &work);
        if let Outcome::Skipped(why) = &outcome {
            eprintln!("\n==> fault scenario {}: skipped: {why}", scenario.name);
        }
        outcomes.push((scenario.name.clone(), outcome));
    }
    let summary = report::markdown(&report::Run {
        machine: machine::describe(&load_before),
        short: options.short,
        took: started.elapsed(),
        outcomes: &outcomes,
    });
    let out = match &options.out {
        Some(out) => out.clone(),
        None if options.short || !options.only.is_empty() => work.join("FAULTS.md"),
        None => root.join("FAULTS.md"),
    };
    // Sections measured by hand (below the marker) are kept.
    let kept = fs::read_to_string(&out)
        .ok()
        .and_then(|old| hand_written(&old).map(str::to_owned));
    let summary = match kept {
        Some(kept) => format!("{}\n{kept}", summary.trim_end()),
        None => summary,
    };
    fs::write(&out, &summary).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    eprintln!("\n{}", report::terminal_summary(&outcomes));
    eprintln!(
        "faults: wrote {} ({:.1} min in all)",
        out.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    let ci = reachable::in_ci();
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| {
            matches!(o, Outcome::Failed(_)) || (ci && matches!(o, Outcome::Skipped(_)))
        })
        .map(|(name, o)| match o {
            Outcome::Skipped(why) => format!("{name} (cannot run, and CI=true: {why})"),
            _ => name.clone(),
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "faults: {} did not pass: {}",
            bad.len(),
            bad.join(", ")
        ))
    }
}

/// The line after which `FAULTS.md` holds sections measured by hand, which a new run keeps.
const HAND_WRITTEN: &str = "<!-- Measured by hand: `cargo xtask faults` keeps what follows. -->";

/// The hand-written part of an earlier report (from the marker on), if it has one.
fn hand_written(report: &str) -> Option<&str> {
    report.find(HAND_WRITTEN).map(|at| &report[at..])
}

#[cfg(test)]
mod tests {
    use super::{
        HAND_WRITTEN, Options, Outcome, after_exit, hand_written, leftover_dir, parse_result,
        scenarios,
    };

    #[test]
    fn the_hand_written_sections_are_found_from_the_marker_on() {
        let report = format!("# Faults\n\ngenerated\n\n{HAND_WRITTEN}\n\n## By hand\n");
        assert_eq!(
            hand_written(&report),
            Some(format!("{HAND_WRITTEN}\n\n## By hand\n").as_str())
        );
        assert_eq!(hand_written("# Faults\n\ngenerated\n"), None);
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_options() {
        assert_eq!(Options::parse(&[]), Ok(Options::default()));
        let options = Options::parse(&args(&["--short", "writers", "restart-redis"])).unwrap();
        assert!(options.short);
        assert_eq!(options.only, ["writers", "restart-redis"]);
        assert!(Options::parse(&args(&["--fast"])).is_err());
        assert!(Options::parse(&args(&["nothing"])).is_err());
    }

    #[test]
    fn the_short_suite_is_the_same_suite_smaller() {
        let (full, short) = (scenarios(false), scenarios(true));
        assert_eq!(full.len(), short.len());
        assert_eq!(full.len(), 3 + 1 + 5 + 5 + 2 + 3 + 1 + 1);
        let restart = short.iter().find(|s| s.name == "restart-kafka").unwrap();
        assert!(restart.args.contains(&"10000".to_owned()));
        assert_eq!(restart.service, None, "it runs a tansu of its own");
        let writers = short.iter().find(|s| s.name == "writers-redis").unwrap();
        assert_eq!(writers.service, Some("redis"));
        let crash = short
            .iter()
            .find(|s| s.name == "publisher-crash-file-memory")
            .unwrap();
        assert_eq!(crash.service, None, "the embedded store and transport");
        let on_postgres = short
            .iter()
            .find(|s| s.name == "publisher-crash-postgres-redis")
            .unwrap();
        assert_eq!(on_postgres.service, Some("redis"));
        assert!(
            crash
                .args
                .ends_with(&["--rounds".to_owned(), "50".to_owned()])
        );
        let outage = short
            .iter()
            .find(|s| s.name == "publisher-outage-rabbitmq")
            .unwrap();
        assert_eq!(outage.service, None, "a RabbitMQ node of its own");
        let failover = short
            .iter()
            .find(|s| s.name == "relay-failover-redis")
            .unwrap();
        assert!(
            failover
                .args
                .ends_with(&["--children".to_owned(), "3".to_owned()])
        );
    }

    #[test]
    fn a_pass_followed_by_a_crash_is_a_failure() {
        use std::os::unix::process::ExitStatusExt as _;
        use std::process::ExitStatus;
        let passed = || parse_result("result passed lost=0").unwrap();
        assert!(matches!(
            after_exit(passed(), Ok(ExitStatus::from_raw(0))),
            Outcome::Passed(_)
        ));
        // SIGSEGV after the result line.
        match after_exit(passed(), Ok(ExitStatus::from_raw(11))) {
            Outcome::Failed(why) => assert!(why.contains("checks passed"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A failed scenario exits with 1 and stays failed with its own reason.
        let failed = parse_result("result failed reason=3_lost").unwrap();
        assert_eq!(
            after_exit(failed, Ok(ExitStatus::from_raw(1 << 8))),
            Outcome::Failed("3 lost".to_owned())
        );
    }

    #[test]
    fn kills_only_brokers_the_scenario_did_not_reap() {
        let pids = "101\ndir /tmp/orchestrator-faults-tansu-1\n102\ndone 101\n103\ndone 103\n";
        assert_eq!(super::running_leftovers(pids), vec![102]);
        assert_eq!(super::running_leftovers(""), Vec::<u32>::new());
    }

    #[test]
    fn removes_only_the_scenarios_own_data_folders() {
        let tmp = std::env::temp_dir();
        let ours = tmp.join("orchestrator-faults-tansu-0123");
        let line = format!("dir {}", ours.display());
        assert_eq!(leftover_dir(&line), Some(ours.as_path()));
        assert_eq!(leftover_dir("4242"), None);
        assert_eq!(
            leftover_dir("dir /home/orchestrator-faults-tansu-0123"),
            None
        );
        let other = format!("dir {}", tmp.join("something-else").display());
        assert_eq!(leftover_dir(&other), None);
        let nested = format!("dir {}", ours.join("orchestrator-faults-x").display());
        assert_eq!(leftover_dir(&nested), None);
    }

    #[test]
    fn reads_result_lines() {
        match parse_result("result passed scenario=restart target=redis lost=0") {
            Some(Outcome::Passed(fields)) => {
                assert_eq!(fields["lost"], "0");
                assert_eq!(fields["target"], "redis");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_result("result cannot-run reason=no_tansu_here"),
            Some(Outcome::Skipped("no tansu here".to_owned()))
        );
        assert_eq!(
            parse_result("result failed reason=3_lost"),
            Some(Outcome::Failed("3 lost".to_owned()))
        );
        assert_eq!(parse_result("restart: 10 published"), None);
    }
}
