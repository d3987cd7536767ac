//! `cargo xtask bench`: runs every benchmark of the workspace and writes `BENCHMARKS.md`.
//!
//! The benches are built once, with every backend feature, and their executables run one
//! after another (never two at once: they would measure each other). Criterion benches
//! get a short warm-up and measurement; the backend benches are plain binaries that
//! print their own medians and ratios against the raw client. Results are read back from
//! criterion's `estimates.json` files and from the printed tables, and written as one
//! table per area: our figure, the baseline measured in the same run, the ratio, and
//! the project's target for it (the design's performance targets and the issues').

mod parse;
mod report;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Result, cargo, describe, json, machine, reachable, tansu};

/// Features that turn on every benchmark (the backend benches need theirs; the umbrella's
/// end-to-end bench measures the broker combinations its features carry).
pub(crate) const ALL_BACKENDS: &str = "orchestrator-backends/redis,orchestrator-backends/rabbitmq,\
     orchestrator-backends/kafka,orchestrator-backends/postgres,orchestrator/redis,\
     orchestrator/rabbitmq,orchestrator/kafka";

/// One benchmark executable.
#[derive(Debug, Clone, Copy)]
struct Bench {
    /// The bench target's name (`cargo bench --bench <name>`).
    name: &'static str,
    /// Whether it is a criterion bench (takes criterion's arguments, writes estimates).
    criterion: bool,
    /// The service it needs, if any (without it, it is skipped; under `CI=true` it fails).
    service: Option<&'static str>,
    /// The storage of the tansu of its own it gets when tansu is installed (its address in
    /// `ORCHESTRATOR_KAFKA_BROKERS`), if it gets one.
    own_tansu: Option<tansu::Storage>,
    /// Whether its standard output is noise to throw away (cqrs-es prints per command).
    discard_stdout: bool,
    /// How long a full run may take before it is stopped.
    timeout: Duration,
    /// Whether `--quick` leaves it out.
    slow: bool,
}

/// Every benchmark, in the order they run.
const BENCHES: &[Bench] = &[
    Bench {
        name: "codec",
        criterion: true,
        service: None,
        own_tansu: None,
        discard_stdout: false,
        timeout: Duration::from_secs(180),
        slow: false,
    },
    Bench {
        name: "bus",
        criterion: true,
        service: None,
        own_tansu: None,
        discard_stdout: false,
        timeout: Duration::from_secs(240),
        slow: false,
    },
    Bench {
        name: "store",
        criterion: true,
        service: None,
        own_tansu: None,
        discard_stdout: false,
        timeout: Duration::from_secs(240),
        slow: false,
    },
    Bench {
        name: "saga",
        criterion: true,
        service: None,
        own_tansu: None,
        discard_stdout: false,
        timeout: Duration::from_secs(360),
        slow: false,
    },
    Bench {
        name: "cqrs",
        criterion: true,
        service: None,
        own_tansu: None,
        discard_stdout: true,
        timeout: Duration::from_secs(360),
        slow: false,
    },
    Bench {
        name: "redis",
        criterion: false,
        service: Some("redis"),
        own_tansu: None,
        discard_stdout: false,
        timeout: Duration::from_secs(300),
        slow: false,
    },
    Bench {
        name: "rabbitmq",
        criterion: false,
        service: Some("rabbitmq"),
        own_tansu: None,
        discard_stdout: false,
        timeout: Duration::from_secs(300),
        slow: true,
    },
    Bench {
        name: "kafka",
        criterion: false,
        service: Some("kafka"),
        // The store rows read the log back: the engine the store's tests pass on (on the
        // memory engine, reading a just-written log timed out).
        own_tansu: Some(tansu::Storage::Sqlite),
        discard_stdout: false,
        timeout: Duration::from_secs(540),
        slow: true,
    },
    // Store appends (1 and 16 writers, batches of 100), read_all, subscription catch-up,
    // transport publish and consume, each against raw tokio-postgres in the same round.
    Bench {
        name: "postgres",
        criterion: false,
        service: Some("postgres"),
        own_tansu: None,
        discard_stdout: false,
        // 22 s for 5 rounds when the WAL flushed fast (2026-12-07); the single-event
        // appends and publishes run ten times slower when it flushes slowly.
        timeout: Duration::from_secs(300),
        slow: false,
    },
    // Skips the combinations whose broker is unreachable itself (printing why): memory and
    // file need none.
    Bench {
        name: "e2e",
        criterion: false,
        service: None,
        // The Kafka event store reads its log back: the engine its tests pass on. On the
        // memory engine, Kafka/Kafka at 64 publishers failed ("offset 21 … is missing from
        // the index") where the same 64-way appends pass on sqlite (kafka_store.rs,
        // concurrent_appends_are_indexed_where_they_landed).
        own_tansu: Some(tansu::Storage::Sqlite),
        discard_stdout: false,
        timeout: Duration::from_secs(900),
        slow: true,
    },
    // The query server: the GraphQL events query against reading the store directly, and
    // WebSocket fan-out to 100 subscribers, rate after rate from 10k events/s down.
    Bench {
        name: "server",
        criterion: false,
        service: None,
        own_tansu: None,
        discard_stdout: false,
        timeout: Duration::from_secs(600),
        slow: false,
    },
];

/// Command-line options of `bench`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Options {
    /// A smoke run: short criterion runs, fewer rounds, the slow backend benches left out.
    pub(crate) quick: bool,
    /// Where to write the report (default `BENCHMARKS.md`, or a file under the target
    /// folder for `--quick` and partial runs, so they never overwrite the real one).
    pub(crate) out: Option<PathBuf>,
    /// Only these benches (default: all).
    pub(crate) only: Vec<String>,
}

impl Options {
    /// Parses `[--quick] [--out <file>] [<bench>…]`.
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut options = Options::default();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--out" => {
                    let out = rest.next().ok_or("bench: --out needs a file name")?;
                    options.out = Some(PathBuf::from(out));
                }
                name if BENCHES.iter().any(|b| b.name == name) => {
                    options.only.push(name.to_owned());
                }
                other => {
                    let known: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
                    return Err(format!(
                        "bench: unexpected argument `{other}` (benches: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(options)
    }

    /// The benches this run includes.
    fn selected(&self) -> Vec<Bench> {
        BENCHES
            .iter()
            .filter(|b| {
                if self.only.is_empty() {
                    !(self.quick && b.slow)
                } else {
                    self.only.iter().any(|name| name == b.name)
                }
            })
            .copied()
            .collect()
    }

    /// Arguments for criterion benches.
    fn criterion_args(&self) -> &'static [&'static str] {
        if self.quick {
            &[
                "--warm-up-time",
                "0.5",
                "--measurement-time",
                "1",
                "--sample-size",
                "10",
            ]
        } else {
            &["--warm-up-time", "1", "--measurement-time", "3"]
        }
    }
}

/// How one bench went.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// It ran to the end; its standard output and error.
    Ran {
        /// Standard output (empty when discarded).
        stdout: String,
        /// Standard error.
        stderr: String,
        /// Wall time.
        took: Duration,
    },
    /// It did not run; why.
    Skipped(String),
    /// It failed or timed out; why.
    Failed(String),
}

/// The workspace's target folder: `CARGO_TARGET_DIR` or `<root>/target`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root.join(dir)
            }
        }
        _ => root.join("target"),
    }
}

/// Builds every bench once; returns each bench's executable and its package folder.
fn build(root: &Path) -> Result<BTreeMap<String, (PathBuf, PathBuf)>> {
    let mut cmd = cargo(root);
    // `--bench '*'`: bench targets only, not every library's tests built as benches.
    cmd.args(["bench", "--workspace", "--bench", "*", "--no-run"])
        .args(["--features", ALL_BACKENDS])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit());
    eprintln!("==> building the benches\n    $ {}", describe(&cmd));
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if !output.status.success() {
        return Err(format!("`{}` failed ({})", describe(&cmd), output.status));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(executables(&text, "bench"))
}

/// Executables of targets of `kind` (`bench`, `bin`) named in cargo's JSON messages:
/// target name → (executable, package folder).
pub(crate) fn executables(messages: &str, kind: &str) -> BTreeMap<String, (PathBuf, PathBuf)> {
    let mut found = BTreeMap::new();
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let Ok(message) = json::parse(line) else {
            continue;
        };
        if message.get("reason").and_then(json::Value::as_str) != Some("compiler-artifact") {
            continue;
        }
        let target = message.get("target");
        let is_bench = target
            .and_then(|t| t.get("kind"))
            .and_then(json::Value::as_array)
            .is_some_and(|kinds| kinds.iter().any(|k| k.as_str() == Some(kind)));
        let name = target
            .and_then(|t| t.get("name"))
            .and_then(json::Value::as_str);
        let executable = message.get("executable").and_then(json::Value::as_str);
        let manifest = message.get("manifest_path").and_then(json::Value::as_str);
        if let (true, Some(name), Some(executable), Some(manifest)) =
            (is_bench, name, executable, manifest)
        {
            let package_dir = Path::new(manifest)
                .parent()
                .map_or_else(PathBuf::new, Path::to_path_buf);
            found.insert(name.to_owned(), (PathBuf::from(executable), package_dir));
        }
    }
    found
}

/// Runs `cmd` until it exits or `timeout` passes (then kills it); output goes to files.
fn run_with_timeout(
    mut cmd: Command,
    stdout: Option<&Path>,
    stderr: &Path,
    timeout: Duration,
) -> Result<(bool, Duration)> {
    let started = Instant::now();
    let out = match stdout {
        Some(path) => Stdio::from(
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    let err =
        File::create(stderr).map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok((status.success(), started.elapsed())),
            Ok(None) if started.elapsed() > timeout => {
                // Our own child, by its handle: nothing else is touched.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "stopped after {}s (its time limit)",
                    timeout.as_secs()
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("cannot wait for `{}`: {e}", describe(&cmd))),
        }
    }
}

/// Runs one bench; its output lands in `logs`.
fn run_bench(
    bench: Bench,
    built: &BTreeMap<String, (PathBuf, PathBuf)>,
    options: &Options,
    criterion_home: &Path,
    logs: &Path,
) -> Outcome {
    let Some((executable, package_dir)) = built.get(bench.name) else {
        return Outcome::Failed(format!("cargo built no bench called `{}`", bench.name));
    };
    let mut cmd = Command::new(executable);
    // The Kafka benches get a tansu of their own, so that they measure the clients rather
    // than a shared broker's state (DESIGN.md's raw figures are for the memory engine).
    let own_kafka = if let Some(storage) = bench.own_tansu
        && tansu::installed().is_some()
    {
        tansu::OwnTansu::start(&format!("the {} bench", bench.name), storage)
            .map_err(|why| eprintln!("warning: {why}"))
            .ok()
    } else {
        None
    };
    match &own_kafka {
        Some(broker) => {
            cmd.env("ORCHESTRATOR_KAFKA_BROKERS", broker.address());
        }
        None => {
            if let Some(service) = bench.service
                && let Err(why) = reachable::service(service)
            {
                return service_down(why, reachable::in_ci());
            }
        }
    }
    // As `cargo bench` does: from the package folder, `--bench` first.
    cmd.current_dir(package_dir)
        .arg("--bench")
        .env("CRITERION_HOME", criterion_home);
    if bench.criterion {
        cmd.args(options.criterion_args());
    }
    if options.quick {
        cmd.env("REDIS_BENCH_ROUNDS", "3")
            .env("PG_BENCH_ROUNDS", "3")
            .env("E2E_BENCH_ROUNDS", "3")
            .env("SERVER_BENCH_SECONDS", "1")
            .env("SERVER_BENCH_REQUESTS", "50");
    }
    let stdout_path = logs.join(format!("{}.stdout", bench.name));
    let stderr_path = logs.join(format!("{}.stderr", bench.name));
    let stdout = (!bench.discard_stdout).then_some(stdout_path.as_path());
    let timeout = if options.quick {
        bench.timeout / 2
    } else {
        bench.timeout
    };
    eprintln!("\n==> bench {}\n    $ {}", bench.name, describe(&cmd));
    let result = run_with_timeout(cmd, stdout, &stderr_path, timeout);
    drop(own_kafka);
    let read = |path: &Path| fs::read_to_string(path).unwrap_or_default();
    let (stdout, stderr) = (stdout.map(read).unwrap_or_default(), read(&stderr_path));
    match result {
        Ok((true, took)) => {
            eprintln!("    done in {:.0}s", took.as_secs_f64());
            Outcome::Ran {
                stdout,
                stderr,
                took,
            }
        }
        Ok((false, _)) => Outcome::Failed(format!(
            "exited with an error; output in {} and {}{}",
            stdout_path.display(),
            stderr_path.display(),
            tail(&stderr, 8)
        )),
        Err(why) => Outcome::Failed(format!(
            "{why}; output in {}{}",
            stderr_path.display(),
            tail(&stderr, 8)
        )),
    }
}

/// What becomes of a bench whose service is down (`why`): skipped, or under CI failed, as
/// backend tests do, so that CI never passes by skipping a backend.
fn service_down(why: String, ci: bool) -> Outcome {
    if ci {
        Outcome::Failed(format!(
            "{why}, and CI=true: a bench cannot skip its service"
        ))
    } else {
        Outcome::Skipped(why)
    }
}

/// The last `n` lines of `text`, indented, for error messages.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|line| format!("\n    | {line}"))
        .collect()
}

/// `cargo xtask bench`.
pub(crate) fn bench(root: &Path, options: &Options) -> Result<()> {
    let started = Instant::now();
    let load_before = machine::load_average();
    let results = target_dir(root).join("xtask-bench");
    let criterion_home = results.join("criterion");
    // Old estimates would pass for this run's.
    let _ = fs::remove_dir_all(&criterion_home);
    fs::create_dir_all(&criterion_home)
        .map_err(|e| format!("cannot create {}: {e}", criterion_home.display()))?;

    let built = build(root)?;
    let mut outcomes = Vec::new();
    for bench in options.selected() {
        let outcome = run_bench(bench, &built, options, &criterion_home, &results);
        match &outcome {
            Outcome::Skipped(why) => eprintln!("\n==> bench {}: skipped: {why}", bench.name),
            Outcome::Failed(why) => eprintln!("\n==> bench {}: FAILED: {why}", bench.name),
            Outcome::Ran { .. } => {}
        }
        outcomes.push((bench.name, outcome));
    }
    let estimates = parse::criterion_estimates(&criterion_home);
    let run = report::Run {
        machine: machine::describe(&load_before),
        quick: options.quick,
        took: started.elapsed(),
        outcomes: &outcomes,
        estimates: &estimates,
    };
    let markdown = report::markdown(&run);
    let out = match &options.out {
        Some(out) => out.clone(),
        None if options.quick || !options.only.is_empty() => results.join("BENCHMARKS.md"),
        None => root.join("BENCHMARKS.md"),
    };
    fs::write(&out, &markdown).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    eprintln!("\n{}", report::terminal_summary(&run));
    eprintln!(
        "bench: wrote {} ({:.1} min in all)",
        out.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(name, _)| *name)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "bench: these benches failed: {}",
            failed.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{Options, Outcome, executables, service_down};

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_options() {
        assert_eq!(Options::parse(&[]), Ok(Options::default()));
        let options = Options::parse(&args(&["--quick", "redis", "--out", "x.md"])).unwrap();
        assert!(options.quick);
        assert_eq!(options.only, ["redis"]);
        assert_eq!(options.out.as_deref(), Some(std::path::Path::new("x.md")));
        assert!(Options::parse(&args(&["nope"])).is_err());
        assert!(Options::parse(&args(&["--out"])).is_err());
    }

    #[test]
    fn quick_leaves_the_slow_benches_out() {
        let quick = Options::parse(&args(&["--quick"])).unwrap();
        let names: Vec<&str> = quick.selected().iter().map(|b| b.name).collect();
        assert!(names.contains(&"bus") && !names.contains(&"kafka"));
        assert!(names.contains(&"postgres"));
        let chosen = Options::parse(&args(&["--quick", "kafka"])).unwrap();
        let names: Vec<&str> = chosen.selected().iter().map(|b| b.name).collect();
        assert_eq!(names, ["kafka"]);
    }

    #[test]
    fn a_service_down_fails_the_bench_under_ci() {
        let why = "PostgreSQL at 127.0.0.1:5432 is down (connection refused)";
        assert!(matches!(
            service_down(why.to_owned(), false),
            Outcome::Skipped(text) if text == why
        ));
        assert!(matches!(
            service_down(why.to_owned(), true),
            Outcome::Failed(text) if text.starts_with(why) && text.contains("CI=true")
        ));
    }

    #[test]
    fn finds_bench_executables_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","package_id":"x","manifest_path":"/w/orchestrator-bus/Cargo.toml","target":{"kind":["bench"],"crate_types":["bin"],"name":"bus","src_path":"/w/orchestrator-bus/benches/bus.rs"},"executable":"/t/release/deps/bus-abc","fresh":true}
{"reason":"compiler-artifact","manifest_path":"/w/orchestrator-bus/Cargo.toml","target":{"kind":["lib"],"name":"orchestrator_bus"},"executable":null}
{"reason":"build-finished","success":true}"#;
        let found = executables(messages, "bench");
        assert_eq!(found.len(), 1);
        let (exe, dir) = &found["bus"];
        assert_eq!(exe, std::path::Path::new("/t/release/deps/bus-abc"));
        assert_eq!(dir, std::path::Path::new("/w/orchestrator-bus"));
    }
}
