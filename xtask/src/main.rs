//! Project automation for orchestrator, run as `cargo xtask <command>`.
//!
//! Built the rust-analyzer way: no dependencies, so it compiles in seconds on a
//! fresh clone, and one function per subcommand. See `cargo xtask help`.

mod bench;
mod browser;
mod deny;
mod endpoint;
mod faults;
mod json;
mod machine;
mod metadata;
mod reachable;
mod services;
mod tansu;
mod test_all;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Errors are messages for the person at the terminal.
type Result<T, E = String> = std::result::Result<T, E>;

/// Printed by `cargo xtask help` and on usage errors.
const USAGE: &str = "\
Usage: cargo xtask <command>

Commands:
  test-all [--quick] [--filter NAME] [--repeat N] [--load [THREADS]] [-- <test args>...]
        Everything CI checks, stopping at the first failure: services up,
        cargo fmt --check, cargo deny check bans licenses sources (deny.toml;
        cargo-deny installed into ~/.cache/orchestrator/tools when missing; no
        advisories: their database is out of reach), clippy -D warnings (default
        features, each package feature on its own, all features), cargo test
        --workspace --all-features, then the short fault suite (faults --short).
        --quick skips the clippy run per feature. Arguments after `--` go to the
        test harness, e.g.
        `cargo xtask test-all -- --nocapture`.
        The tests run against a Kafka broker of their own (tansu on a free port,
        sqlite in a fresh folder, both gone afterwards) unless
        ORCHESTRATOR_KAFKA_BROKERS names one.
        --filter NAME runs only the integration test targets whose name contains
        NAME (no fmt, clippy or fault suite); --repeat N runs the tests N times,
        each against a fresh broker, and reports every run; --load keeps THREADS
        threads (default: one per core) spinning meanwhile. To prove the Kafka
        suites: `cargo xtask test-all --filter kafka --repeat 20 --load`.
        Missing services skip backend tests (and a missing Chromium the browser
        test), except with CI=true where they fail.
  services up|status|down [<service>...]
        Start (if needed) and wait for, report on, or stop the brokers backend
        tests use: redis (ORCHESTRATOR_REDIS_URL, default redis://127.0.0.1:6379),
        rabbitmq (ORCHESTRATOR_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f),
        postgres (ORCHESTRATOR_POSTGRES_URL, default
        postgres://postgres@127.0.0.1:5432/test: the machine's cluster on that port,
        started with pg_ctlcluster when down) and kafka (ORCHESTRATOR_KAFKA_BROKERS, default 127.0.0.1:9092: the tansu
        Kafka-protocol broker, installed into ~/.cache/orchestrator/tools when
        missing; sqlite storage, emptied at each start), and chromium (Debian's
        chromium and chromium-driver, installed with apt-get when missing, for the
        dashboard's browser test; nothing to start or stop). Each line says where the
        service keeps its data. `status` exits 1 unless all are up.
        `down` is for use by hand: other sessions and CI rely on these services.
  bench [--quick] [--out <file>] [<bench>...]
        Builds and runs every benchmark (codec, bus, store, saga, cqrs, the
        redis, rabbitmq, kafka and postgres backends against their raw clients,
        and e2e: the facade from publish to handler against plain appends) one
        after another, and writes BENCHMARKS.md: each area's figure, the baseline
        measured in the same run, the ratio and the target. Backends whose service
        is down are reported as skipped, except with CI=true where they fail; the
        kafka and e2e benches get a tansu of their own with sqlite storage when
        tansu is installed. --quick is a smoke run (short measurements, 3 rounds
        of the redis and postgres benches, no rabbitmq/kafka/e2e) written under
        the target folder, as is a run of named benches only; --out picks the file.
  faults [--short] [--out <file>] [<scenario>...]
        The fault suite, each scenario a run of orchestrator-faults' `faults`
        binary: a broker restart in the middle of a publish/consume run (redis,
        rabbitmq, kafka: 0 lost, every duplicate accounted for), SIGKILL of a
        process running 100 sagas then recover() (every saga Completed or
        Compensated, each compensation once), 8 concurrent writers on one stream
        of every store (no lost update, gapless versions), and 1,000,000 events
        through a slow handler (peak RSS bounded). Writes FAULTS.md; --short is
        the CI-sized suite (written under the target folder), as is a run of
        named scenarios (name prefixes: restart, writers-file, ...). Scenarios
        whose service is down are skipped, except with CI=true where they fail.
  help  This text.
";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Dispatches to the subcommand named on the command line.
fn run() -> Result<ExitCode> {
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {arg:?} is not valid UTF-8"))
        })
        .collect::<Result<Vec<String>>>()?;
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    match command {
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "test-all" => {
            let options = test_all::Options::parse(rest)?;
            test_all::test_all(&project_root()?, &options)?;
            Ok(ExitCode::SUCCESS)
        }
        "bench" => {
            let options = bench::Options::parse(rest)?;
            bench::bench(&project_root()?, &options)?;
            Ok(ExitCode::SUCCESS)
        }
        "faults" => {
            let options = faults::Options::parse(rest)?;
            faults::faults(&project_root()?, &options)?;
            Ok(ExitCode::SUCCESS)
        }
        "services" => match rest.split_first() {
            Some((action, names)) if action == "up" => {
                services::up(names)?;
                Ok(ExitCode::SUCCESS)
            }
            Some((action, names)) if action == "status" => services::status(names),
            Some((action, names)) if action == "down" => {
                services::down(names)?;
                Ok(ExitCode::SUCCESS)
            }
            _ => Err(format!("services: expected up, status or down\n\n{USAGE}")),
        },
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    }
}

/// The workspace root: the parent of xtask's own folder.
///
/// `cargo run` sets `CARGO_MANIFEST_DIR` for the program too; preferring that
/// over the compile-time value keeps a binary reused from a shared
/// `CARGO_TARGET_DIR` (CI's fresh clones) pointed at the current checkout.
fn project_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} has no parent folder", manifest_dir.display()))
}

/// A `cargo` command run from `root`, using the cargo that runs us.
fn cargo(root: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root);
    cmd
}

/// A command line as a person would type it, for messages.
fn describe(cmd: &Command) -> String {
    let quote = |s: &str| {
        if s.is_empty() || s.contains(char::is_whitespace) {
            format!("\"{s}\"")
        } else {
            s.to_owned()
        }
    };
    let mut words = vec![quote(&cmd.get_program().to_string_lossy())];
    words.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::{describe, project_root};
    use std::process::Command;

    #[test]
    fn commands_are_described_as_typed() {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--save", "", "--port", "6379", "a b"]);
        assert_eq!(
            describe(&cmd),
            r#"redis-server --save "" --port 6379 "a b""#
        );
    }

    #[test]
    fn project_root_holds_the_workspace_manifest() {
        let root = project_root();
        assert!(
            root.as_ref()
                .is_ok_and(|root| root.join("xtask/Cargo.toml").is_file()
                    && root.join("Cargo.toml").is_file()),
            "{root:?}"
        );
    }
}
