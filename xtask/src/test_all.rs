//! `cargo xtask test-all`: everything CI checks, in order, stopping at the first failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Result, browser, cargo, deny, describe, faults, metadata, reachable, services, tansu};

/// Command-line options of `test-all`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Options {
    /// Skip the clippy run per package feature.
    pub(crate) quick: bool,
    /// How many times to run the tests, each run against a fresh Kafka broker.
    pub(crate) repeat: u32,
    /// Only the integration test targets whose name contains this (e.g. `kafka`); fmt,
    /// clippy and the fault suite are left out.
    pub(crate) filter: Option<String>,
    /// Threads that keep the CPUs busy while the tests run (`--load`: one per core).
    pub(crate) load: usize,
    /// Passed to the test harness: `cargo test … -- <these>`.
    pub(crate) test_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            quick: false,
            repeat: 1,
            filter: None,
            load: 0,
            test_args: Vec::new(),
        }
    }
}

impl Options {
    /// Parses `[--quick] [--repeat N] [--filter NAME] [--load [THREADS]] [-- <test harness
    /// args>…]`.
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut options = Options::default();
        let mut rest = args.iter().peekable();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--repeat" => {
                    options.repeat = rest
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or("test-all: --repeat takes a whole number of runs, 1 or more")?;
                }
                "--filter" => {
                    let filter = rest
                        .next()
                        .filter(|f| !f.is_empty() && !f.starts_with('-'))
                        .ok_or(
                            "test-all: --filter takes part of a test target's name, e.g. kafka",
                        )?;
                    options.filter = Some(filter.clone());
                }
                "--load" => {
                    options.load = match rest.peek().map(|n| n.parse::<usize>()) {
                        Some(Ok(threads)) => {
                            rest.next();
                            threads
                        }
                        Some(Err(_)) | None => crate::machine::cores(),
                    };
                }
                "--" => {
                    options.test_args = rest.cloned().collect();
                    break;
                }
                other => {
                    return Err(format!(
                        "test-all: unexpected argument `{other}` (test harness arguments go \
                         after `--`)"
                    ));
                }
            }
        }
        Ok(options)
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It passed.
    Passed,
    /// It failed but the run continued (services outside CI).
    Warned,
    /// It failed and ended the run.
    Failed,
}

/// Steps run so far, for the summary.
struct Run<'a> {
    /// Where cargo runs.
    root: &'a Path,
    /// Each step's name, outcome and wall time.
    steps: Vec<(String, Outcome, Duration)>,
    /// When `test-all` began.
    started: Instant,
}

impl Run<'_> {
    /// Adds a finished step to the summary.
    fn note(&mut self, name: &str, started: Instant, passed: bool) {
        let outcome = if passed {
            Outcome::Passed
        } else {
            Outcome::Failed
        };
        self.steps
            .push((name.to_owned(), outcome, started.elapsed()));
    }

    /// Records a finished step; a failure prints the summary and becomes the error.
    fn record(&mut self, name: &str, started: Instant, result: Result<()>) -> Result<()> {
        self.note(name, started, result.is_ok());
        result.map_err(|why| {
            self.print_summary();
            format!("test-all: step `{name}` failed: {why}")
        })
    }

    /// Runs `cmd` with inherited stdio as the step `name`.
    fn step(&mut self, name: &str, cmd: Command) -> Result<()> {
        let started = Instant::now();
        let result = run_command(name, cmd);
        self.record(name, started, result)
    }

    /// Like [`Run::step`], but a failure is recorded and the run goes on; returns whether
    /// it passed.
    fn attempt(&mut self, name: &str, cmd: Command) -> bool {
        let started = Instant::now();
        let result = run_command(name, cmd);
        if let Err(why) = &result {
            eprintln!("test-all: `{name}` failed: {why}");
        }
        self.note(name, started, result.is_ok());
        result.is_ok()
    }

    /// `services up` for the services this machine runs (Redis, RabbitMQ, PostgreSQL, and Kafka only
    /// when `ORCHESTRATOR_KAFKA_BROKERS` names one: otherwise each test run gets a broker of
    /// its own) and for Chromium, which the dashboard's browser test drives. Fatal under CI,
    /// otherwise a warning that backend tests (and the browser test) will skip.
    fn services(&mut self) -> Result<()> {
        let name = "services up";
        eprintln!("\n==> {name}");
        let started = Instant::now();
        let names: Vec<String> = services::SERVICES
            .iter()
            .filter(|s| s.name != "kafka" || kafka_from_env().is_some())
            .map(|s| s.name.to_owned())
            .chain([browser::NAME.to_owned()])
            .collect();
        match services::up(&names) {
            Err(why) if !reachable::in_ci() => {
                eprintln!(
                    "warning: {why}\nwarning: tests of backends whose service is down, and the \
                     browser test without Chromium, will be skipped (with CI=true this is an \
                     error)"
                );
                self.steps
                    .push((name.to_owned(), Outcome::Warned, started.elapsed()));
                Ok(())
            }
            result => self.record(name, started, result),
        }
    }

    /// The dependency policy (`deny.toml`): `cargo deny check bans licenses sources`, with
    /// cargo-deny installed first when missing.
    fn deny(&mut self) -> Result<()> {
        let name = "cargo deny check bans licenses sources";
        let started = Instant::now();
        match deny::binary() {
            Ok(binary) => {
                let cmd = deny::check_command(self.root, &binary);
                self.step(name, cmd)
            }
            Err(why) => self.record(name, started, Err(why)),
        }
    }

    /// `cargo clippy <args> -- -D warnings` as a step.
    fn clippy(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let mut cmd = cargo(self.root);
        cmd.arg("clippy").args(args).args(["--", "-D", "warnings"]);
        self.step(name, cmd)
    }

    /// Clippy once per feature of each workspace package, each feature on its own.
    fn clippy_per_feature(&mut self) -> Result<()> {
        let name = "list package features (cargo metadata)";
        let started = Instant::now();
        let listed = list_features(self.root);
        let packages = match listed {
            Ok(packages) => {
                self.record(name, started, Ok(()))?;
                packages
            }
            Err(why) => return self.record(name, started, Err(why)),
        };
        for package in packages {
            let pkg = package.name.as_str();
            if package.has_default_features {
                self.clippy(
                    &format!("clippy -p {pkg} --no-default-features"),
                    &["-p", pkg, "--all-targets", "--no-default-features"],
                )?;
            }
            for feature in &package.features {
                self.clippy(
                    &format!("clippy -p {pkg} --features {feature}"),
                    &[
                        "-p",
                        pkg,
                        "--all-targets",
                        "--no-default-features",
                        "--features",
                        feature,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Prints each step's outcome and wall time, and the total.
    fn print_summary(&self) {
        eprintln!("\ntest-all summary:");
        for (name, outcome, took) in &self.steps {
            let label = match outcome {
                Outcome::Passed => "ok",
                Outcome::Warned => "WARNING",
                Outcome::Failed => "FAILED",
            };
            eprintln!("  {label:<8} {:>9}  {name}", format_duration(*took));
        }
        eprintln!(
            "  {:<8} {:>9}",
            "total",
            format_duration(self.started.elapsed())
        );
    }
}

/// Runs `cmd` with inherited stdio, announced as `name`.
fn run_command(name: &str, mut cmd: Command) -> Result<()> {
    let command = describe(&cmd);
    eprintln!("\n==> {name}\n    $ {command}");
    match cmd.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("`{command}` failed ({status})")),
        Err(e) => Err(format!("cannot run `{command}`: {e}")),
    }
}

/// `ORCHESTRATOR_KAFKA_BROKERS`, when the person running us named a broker.
fn kafka_from_env() -> Option<String> {
    std::env::var("ORCHESTRATOR_KAFKA_BROKERS")
        .ok()
        .filter(|brokers| !brokers.trim().is_empty())
}

/// `cargo metadata --format-version 1 --no-deps`, as text.
fn cargo_metadata(root: &Path) -> Result<String> {
    let mut cmd = cargo(root);
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if !output.status.success() {
        return Err(format!("`{}` failed ({})", describe(&cmd), output.status));
    }
    String::from_utf8(output.stdout)
        .map_err(|_| "`cargo metadata` printed invalid UTF-8".to_owned())
}

/// Features of every workspace package but xtask, from `cargo metadata`.
fn list_features(root: &Path) -> Result<Vec<metadata::PackageFeatures>> {
    metadata::workspace_features(&cargo_metadata(root)?, &["xtask"])
}

/// Threads that keep the CPUs busy until dropped, so that a run shows how the tests fare
/// on a loaded machine (as CI's can be when something else runs beside it).
struct Load {
    /// Set when the threads should stop.
    stop: Arc<AtomicBool>,
    /// The spinning threads.
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// Starts `threads` spinning threads (none for 0).
    fn start(threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if threads > 0 {
            eprintln!("\n==> load: {threads} threads spinning beside the tests");
        }
        let threads = (0..threads)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut x = 0_u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) + 1);
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// `1.2s`, or `3m04.5s` past a minute.
fn format_duration(took: Duration) -> String {
    let secs = took.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:04.1}s", took.as_secs() / 60, secs % 60.0)
    }
}

/// Runs every check CI runs, stopping at the first failure, then prints a summary.
///
/// With `--filter`, only the matching test targets run (no fmt, clippy or fault suite);
/// with `--repeat N`, the tests run N times, each against a fresh Kafka broker, and every
/// run is reported before the first failure ends `test-all`.
pub(crate) fn test_all(root: &Path, options: &Options) -> Result<()> {
    let mut run = Run {
        root,
        steps: Vec::new(),
        started: Instant::now(),
    };
    let _load = Load::start(options.load);
    run.services()?;

    let targets = match &options.filter {
        None => {
            run.checks(options)?;
            None
        }
        Some(filter) => {
            let name = format!("test targets matching `{filter}`");
            let started = Instant::now();
            let found = cargo_metadata(root).and_then(|text| metadata::test_targets(&text, filter));
            let targets = match found {
                Ok(targets) if targets.is_empty() => Err(format!(
                    "no integration test target's name contains `{filter}`"
                )),
                other => other,
            };
            match targets {
                Ok(targets) => {
                    eprintln!("\n==> {name}: {}", targets.join(", "));
                    run.record(&name, started, Ok(()))?;
                    Some(targets)
                }
                Err(why) => return run.record(&name, started, Err(why)),
            }
        }
    };

    let mut failed = Vec::new();
    for round in 1..=options.repeat {
        let name = if options.repeat == 1 {
            "cargo test (all features)".to_owned()
        } else {
            format!(
                "cargo test (all features), run {round} of {}",
                options.repeat
            )
        };
        if !run.tests(&name, options, targets.as_deref())? {
            failed.push(round);
        }
    }
    if !failed.is_empty() {
        run.print_summary();
        let rounds: Vec<String> = failed.iter().map(u32::to_string).collect();
        return Err(format!(
            "test-all: {} of {} test runs failed (run {})",
            failed.len(),
            options.repeat,
            rounds.join(", ")
        ));
    }
    if options.repeat > 1 {
        eprintln!(
            "\ntest-all: {} of {} test runs passed",
            options.repeat, options.repeat
        );
    }

    if options.filter.is_none() {
        // The CI-sized fault suite, on the build the tests just made.
        let name = "fault suite (faults --short)";
        eprintln!("\n==> {name}");
        let started = Instant::now();
        let short = faults::Options {
            short: true,
            ..faults::Options::default()
        };
        run.record(name, started, faults::faults(root, &short))?;
    }

    run.print_summary();
    eprintln!("\ntest-all: all steps passed");
    Ok(())
}

impl Run<'_> {
    /// cargo fmt, cargo deny, the clippy runs and the API docs.
    fn checks(&mut self, options: &Options) -> Result<()> {
        let mut fmt = cargo(self.root);
        fmt.args(["fmt", "--all", "--", "--check"]);
        self.step("cargo fmt --check", fmt)?;
        self.deny()?;

        self.clippy(
            "clippy (default features)",
            &["--workspace", "--all-targets"],
        )?;
        if options.quick {
            eprintln!("\n==> clippy per feature: skipped (--quick)");
        } else {
            self.clippy_per_feature()?;
        }
        self.clippy(
            "clippy (all features)",
            &["--workspace", "--all-targets", "--all-features"],
        )?;
        // The API docs as docs.rs builds them (every feature), with broken or redundant
        // links, unclosed HTML and the like as errors.
        let mut doc = cargo(self.root);
        doc.args(["doc", "--workspace", "--no-deps", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings");
        self.step("cargo doc (all features, warnings denied)", doc)
    }

    /// One run of `cargo test --workspace --all-features` (only `targets`, when given)
    /// against a Kafka broker of its own, unless `ORCHESTRATOR_KAFKA_BROKERS` names one.
    /// `Ok(passed)`; an error only when no broker could be had under CI.
    fn tests(&mut self, name: &str, options: &Options, targets: Option<&[String]>) -> Result<bool> {
        let mut test = cargo(self.root);
        test.args(["test", "--workspace", "--all-features"])
            .env("RUST_BACKTRACE", "1");
        if let Some(targets) = targets {
            // Every selected suite runs even when one fails, so a repeated run counts them all.
            test.arg("--no-fail-fast");
            for target in targets {
                test.args(["--test", target]);
            }
        }
        if !options.test_args.is_empty() {
            test.arg("--").args(&options.test_args);
        }
        let mut kafka = None;
        if kafka_from_env().is_none() {
            let started = Instant::now();
            match tansu::OwnTansu::start(name, tansu::Storage::Sqlite) {
                Ok(broker) => {
                    test.env("ORCHESTRATOR_KAFKA_BROKERS", broker.address());
                    kafka = Some(broker);
                }
                Err(why) if reachable::in_ci() => {
                    return self
                        .record("Kafka broker for the tests", started, Err(why))
                        .map(|()| false);
                }
                Err(why) => eprintln!(
                    "warning: no Kafka broker of this run's own ({why}); the Kafka tests use \
                     ORCHESTRATOR_KAFKA_BROKERS' default, and skip if nothing answers there"
                ),
            }
        }
        let passed = self.attempt(name, test);
        if let Some(broker) = &mut kafka
            && !passed
        {
            if let Some(status) = broker.exited() {
                eprintln!(
                    "test-all: the Kafka broker of `{name}` (pid {}) died during the run: {status}",
                    broker.pid()
                );
            }
            eprintln!(
                "test-all: the Kafka broker's log of `{name}` is kept at {}",
                broker.keep_log().display()
            );
        }
        Ok(passed)
    }
}

#[cfg(test)]
mod tests {
    use super::{Options, format_duration};
    use std::time::Duration;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_options() {
        assert_eq!(Options::parse(&[]), Ok(Options::default()));
        assert_eq!(
            Options::parse(&args(&["--quick", "--", "--nocapture", "--quick"])),
            Ok(Options {
                quick: true,
                test_args: args(&["--nocapture", "--quick"]),
                ..Options::default()
            })
        );
        assert_eq!(
            Options::parse(&args(&[
                "--repeat", "20", "--filter", "kafka", "--load", "3"
            ])),
            Ok(Options {
                repeat: 20,
                filter: Some("kafka".to_owned()),
                load: 3,
                ..Options::default()
            })
        );
        let loaded = Options::parse(&args(&["--load", "--quick"]));
        assert_eq!(loaded.as_ref().map(|o| o.quick), Ok(true));
        assert!(
            loaded.is_ok_and(|o| o.load >= 1),
            "--load alone: one thread per core"
        );
        assert!(Options::parse(&args(&["--nocapture"])).is_err());
        assert!(Options::parse(&args(&["--repeat", "0"])).is_err());
        assert!(Options::parse(&args(&["--repeat"])).is_err());
        assert!(Options::parse(&args(&["--filter", "--quick"])).is_err());
    }

    #[test]
    fn formats_durations() {
        assert_eq!(format_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(format_duration(Duration::from_millis(184_500)), "3m04.5s");
    }
}
