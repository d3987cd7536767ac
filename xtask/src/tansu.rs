//! tansu, the Kafka-protocol broker the Kafka tests and benches run against: its install,
//! and brokers of xtask's own, one per run, so that no run inherits another's state.
//!
//! A broker of xtask's own ([`OwnTansu`]) listens on a free loopback port, keeps its
//! records in a fresh folder (sqlite) or in memory, and is killed, its folder removed, when
//! dropped: nothing it held survives it, and nothing grows from run to run. Should xtask itself be killed first, the broker would outlive it: each one is
//! registered under `~/.cache/orchestrator/tansu/runs/` with the process that owns it, and
//! the next start stops every registered broker whose owner is gone ([`sweep`]).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Result, describe, reachable};

/// The tansu version xtask installs: an Apache-2.0 Kafka-protocol broker from crates.io.
pub(crate) const VERSION: &str = "0.6.0";

/// How long a fresh broker may take to answer its first `Metadata` request. It answers in
/// well under a second on an idle machine; the bound only ends a start that went wrong.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// `~/.cache/orchestrator`, where tansu is installed, outside any checkout.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/orchestrator"))
}

/// The installed tansu binary: `ORCHESTRATOR_TANSU` if set, else the pinned version under
/// [`cache_dir`], installed there first when missing (about 9 minutes on 2 cores, once).
pub(crate) fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORCHESTRATOR_TANSU") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "ORCHESTRATOR_TANSU names {}, which is not a file",
                path.display()
            ))
        };
    }
    let root = cache_dir()?.join("tools");
    let binary = root.join("bin/tansu");
    if binary.is_file() {
        return Ok(binary);
    }
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo_bin);
    cmd.args(["install", "--locked", "tansu", "--version", VERSION])
        .args(["--features", "dynostore,libsql", "--root"])
        .arg(&root);
    eprintln!(
        "Kafka: installing tansu {VERSION} (about 9 minutes on 2 cores, once): {}",
        describe(&cmd)
    );
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if !status.success() || !binary.is_file() {
        return Err(format!("`{}` failed ({status})", describe(&cmd)));
    }
    Ok(binary)
}

/// The tansu binary if it is installed (or named by `ORCHESTRATOR_TANSU`), without
/// installing it.
pub(crate) fn installed() -> Option<PathBuf> {
    std::env::var_os("ORCHESTRATOR_TANSU")
        .map(PathBuf::from)
        .or_else(|| cache_dir().ok().map(|dir| dir.join("tools/bin/tansu")))
        .filter(|path| path.is_file())
}

/// Where brokers of xtask's own are registered, each in a folder named by its port.
fn runs_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("tansu/runs"))
}

/// Where a broker of xtask's own keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// tansu's sqlite engine, in the broker's fresh folder: the engine the Kafka backend's
    /// tests pass on. (tansu 0.6.0's memory engine, once used for the produce/consume bench,
    /// does not serve the event store's log reads: a read up to a known offset times out.)
    Sqlite,
}

impl Storage {
    /// The `--storage-engine` URL, relative to the broker's folder.
    fn engine(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite://tansu.db",
        }
    }

    /// Where the records live, for messages.
    fn describe(self, dir: &Path) -> String {
        match self {
            Self::Sqlite => format!(
                "sqlite in {}, removed when the run ends",
                dir.join("tansu.db").display()
            ),
        }
    }
}

/// A tansu of xtask's own on a free loopback port; killed (and its folder removed) when
/// dropped.
pub(crate) struct OwnTansu {
    /// The broker process.
    child: Child,
    /// Its bootstrap address, `127.0.0.1:<port>`.
    address: String,
    /// Its folder: the log, and the registration [`sweep`] reads.
    dir: PathBuf,
    /// Whether to keep the log when dropped (in [`failed_dir`]).
    keep_log: bool,
}

impl OwnTansu {
    /// Starts one (installing tansu first if needed) in a fresh folder and waits until it
    /// answers a Kafka `Metadata` request. `what` names the run in messages.
    pub(crate) fn start(what: &str, storage: Storage) -> Result<Self> {
        let binary = binary()?;
        sweep();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free loopback port: {e}"))?
            .port();
        let address = format!("127.0.0.1:{port}");
        let dir = runs_dir()?.join(port.to_string());
        // A folder left by a broker that had this port before: nothing in it is ours.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log_path = dir.join("tansu.log");
        let log = File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot reuse {}: {e}", log_path.display()))?;
        let url = format!("tcp://{address}");
        let mut cmd = Command::new(&binary);
        cmd.current_dir(&dir)
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", storage.engine()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
        let mut broker = Self {
            child,
            address,
            dir,
            keep_log: false,
        };
        let registration = format!("owner {}\ntansu {}\n", std::process::id(), broker.pid());
        fs::write(broker.dir.join("owner"), registration).map_err(|e| {
            format!(
                "cannot register the broker in {}: {e}",
                broker.dir.display()
            )
        })?;
        broker.wait_ready(&cmd)?;
        eprintln!(
            "Kafka for {what}: tansu {VERSION} of its own at {} (pid {}; records: {}; log {})",
            broker.address,
            broker.pid(),
            storage.describe(&broker.dir),
            log_path.display()
        );
        Ok(broker)
    }

    /// Waits until the broker answers `Metadata`, or fails with what its log says.
    fn wait_ready(&mut self, cmd: &Command) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.keep_log = true;
                return Err(format!(
                    "`{}` exited ({status}) before it answered; its log: {}",
                    describe(cmd),
                    self.log().display()
                ));
            }
            match reachable::kafka_at(&self.address) {
                Ok(_) => return Ok(()),
                Err(why) if started.elapsed() >= START_TIMEOUT => {
                    self.keep_log = true;
                    return Err(format!(
                        "tansu at {} did not answer within {}s ({why}); its log: {}",
                        self.address,
                        START_TIMEOUT.as_secs(),
                        self.log().display()
                    ));
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// Its bootstrap address, for `ORCHESTRATOR_KAFKA_BROKERS`.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("tansu.log")
    }

    /// Keeps its log when dropped, for a failed run: it is moved to [`failed_dir`], where
    /// the logs of the last [`KEPT_LOGS`] failed runs stay. Returns where it will be.
    pub(crate) fn keep_log(&mut self) -> PathBuf {
        self.keep_log = true;
        self.kept_log_path()
    }

    /// Where [`OwnTansu::keep_log`] puts the log.
    fn kept_log_path(&self) -> PathBuf {
        let port = self.address.rsplit(':').next().unwrap_or("0");
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        failed_dir()
            .unwrap_or_else(|_| self.dir.clone())
            .join(format!("tansu-{since_epoch}-{port}.log"))
    }

    /// How the broker process ended, if it has: a broker that died during a run explains
    /// every Kafka failure after it.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// How many failed runs' logs [`failed_dir`] keeps.
const KEPT_LOGS: usize = 10;

/// Where the logs of brokers whose run failed are kept (the sweep leaves them alone).
fn failed_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("tansu/failed"))
}

/// Moves `log` into [`failed_dir`] as `to`, then drops the oldest kept logs past
/// [`KEPT_LOGS`].
fn keep(log: &Path, to: &Path) {
    let Some(dir) = to.parent() else {
        return;
    };
    if fs::create_dir_all(dir).is_err() || fs::rename(log, to).is_err() {
        return;
    }
    let mut kept: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    // Named `tansu-<seconds since the epoch>-<port>.log`: by name is by age.
    kept.sort();
    let excess = kept.len().saturating_sub(KEPT_LOGS);
    for old in &kept[..excess] {
        let _ = fs::remove_file(old);
    }
}

impl Drop for OwnTansu {
    fn drop(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep_log {
            keep(&self.log(), &self.kept_log_path());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Stops every registered broker whose owner is no longer running (xtask was killed before
/// it could stop it) and removes its folder; folders without a registration go too.
pub(crate) fn sweep() {
    if let Ok(runs) = runs_dir() {
        sweep_in(&runs);
    }
}

/// [`sweep`] over the registrations in `runs`.
fn sweep_in(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let registration = fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let pid_of = |key: &str| {
            registration.lines().find_map(|line| {
                line.strip_prefix(key)
                    .and_then(|rest| rest.trim().parse::<u32>().ok())
            })
        };
        if pid_of("owner ").is_some_and(alive) {
            continue;
        }
        if let Some(pid) = pid_of("tansu ").filter(|&pid| is_tansu(pid)) {
            eprintln!(
                "Kafka: stopping tansu pid {pid}, left running by a run that ended ({})",
                dir.display()
            );
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Whether a process with this pid exists.
pub(crate) fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` runs tansu (so that a reused pid is never killed by mistake).
fn is_tansu(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|&b| b == 0)
            .next()
            .is_some_and(|program| program.ends_with(b"tansu"))
    })
}

#[cfg(test)]
mod tests {
    use super::{alive, is_tansu, sweep_in};
    use std::fs;

    #[test]
    fn sweep_keeps_live_runs_and_clears_the_rest() {
        let runs = std::env::temp_dir().join(format!("xtask-sweep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&runs);
        let folder = |name: &str, owner: Option<&str>| {
            let dir = runs.join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("tansu.log"), "log").unwrap();
            if let Some(owner) = owner {
                fs::write(dir.join("owner"), owner).unwrap();
            }
            dir
        };
        // A process that is not tansu, registered as the broker of a run whose owner is gone:
        // its folder goes, the process is left alone.
        let mut bystander = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let gone_owner = u32::MAX - 1;
        assert!(!alive(gone_owner));
        let live = folder(
            "1",
            Some(&format!("owner {}\ntansu 1\n", std::process::id())),
        );
        let dead = folder(
            "2",
            Some(&format!("owner {gone_owner}\ntansu {}\n", bystander.id())),
        );
        let kept_log = folder("3", None);
        sweep_in(&runs);
        assert!(live.is_dir(), "the run of a live owner is left alone");
        assert!(!dead.exists(), "a dead owner's run is cleared");
        assert!(!kept_log.exists(), "a kept log goes at the next start");
        assert!(!is_tansu(bystander.id()));
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "a process that is not tansu is never killed"
        );
        let _ = bystander.kill();
        let _ = bystander.wait();
        let _ = fs::remove_dir_all(&runs);
    }
}
