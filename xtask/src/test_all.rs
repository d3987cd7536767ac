//! `cargo xtask test-all`: everything CI checks, in order, stopping at the first failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, cargo, describe, faults, metadata, services};

/// Command-line options of `test-all`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Options {
    /// Skip the clippy run per package feature.
    pub(crate) quick: bool,
    /// Passed to the test harness: `cargo test … -- <these>`.
    pub(crate) test_args: Vec<String>,
}

impl Options {
    /// Parses `[--quick] [-- <test harness args>…]`.
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut options = Options::default();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
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

/// Whether we run under CI, where missing services are an error rather than a skip.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
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
    /// Records a finished step; a failure prints the summary and becomes the error.
    fn record(&mut self, name: &str, started: Instant, result: Result<()>) -> Result<()> {
        let outcome = if result.is_ok() {
            Outcome::Passed
        } else {
            Outcome::Failed
        };
        self.steps
            .push((name.to_owned(), outcome, started.elapsed()));
        result.map_err(|why| {
            self.print_summary();
            format!("test-all: step `{name}` failed: {why}")
        })
    }

    /// Runs `cmd` with inherited stdio as the step `name`.
    fn step(&mut self, name: &str, mut cmd: Command) -> Result<()> {
        let command = describe(&cmd);
        eprintln!("\n==> {name}\n    $ {command}");
        let started = Instant::now();
        let result = match cmd.status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("`{command}` failed ({status})")),
            Err(e) => Err(format!("cannot run `{command}`: {e}")),
        };
        self.record(name, started, result)
    }

    /// `services up`: fatal under CI, otherwise a warning that backend tests will skip.
    fn services(&mut self) -> Result<()> {
        let name = "services up";
        eprintln!("\n==> {name}");
        let started = Instant::now();
        match services::up(&[]) {
            Err(why) if !in_ci() => {
                eprintln!(
                    "warning: {why}\nwarning: tests of backends whose service is down will be \
                     skipped (with CI=true this is an error)"
                );
                self.steps
                    .push((name.to_owned(), Outcome::Warned, started.elapsed()));
                Ok(())
            }
            result => self.record(name, started, result),
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

/// Features of every workspace package but xtask, from `cargo metadata`.
fn list_features(root: &Path) -> Result<Vec<metadata::PackageFeatures>> {
    let mut cmd = cargo(root);
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if !output.status.success() {
        return Err(format!("`{}` failed ({})", describe(&cmd), output.status));
    }
    let text = String::from_utf8(output.stdout)
        .map_err(|_| "`cargo metadata` printed invalid UTF-8".to_owned())?;
    metadata::workspace_features(&text, &["xtask"])
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
pub(crate) fn test_all(root: &Path, options: &Options) -> Result<()> {
    let mut run = Run {
        root,
        steps: Vec::new(),
        started: Instant::now(),
    };
    run.services()?;

    let mut fmt = cargo(root);
    fmt.args(["fmt", "--all", "--", "--check"]);
    run.step("cargo fmt --check", fmt)?;

    run.clippy(
        "clippy (default features)",
        &["--workspace", "--all-targets"],
    )?;
    if options.quick {
        eprintln!("\n==> clippy per feature: skipped (--quick)");
    } else {
        run.clippy_per_feature()?;
    }
    run.clippy(
        "clippy (all features)",
        &["--workspace", "--all-targets", "--all-features"],
    )?;

    let mut test = cargo(root);
    test.args(["test", "--workspace", "--all-features"])
        .env("RUST_BACKTRACE", "1");
    if !options.test_args.is_empty() {
        test.arg("--").args(&options.test_args);
    }
    run.step("cargo test (all features)", test)?;

    // The CI-sized fault suite, on the build the tests just made.
    let name = "fault suite (faults --short)";
    eprintln!("\n==> {name}");
    let started = Instant::now();
    let short = faults::Options {
        short: true,
        ..faults::Options::default()
    };
    run.record(name, started, faults::faults(root, &short))?;

    run.print_summary();
    eprintln!("\ntest-all: all steps passed");
    Ok(())
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
            })
        );
        assert!(Options::parse(&args(&["--nocapture"])).is_err());
    }

    #[test]
    fn formats_durations() {
        assert_eq!(format_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(format_duration(Duration::from_millis(184_500)), "3m04.5s");
    }
}
