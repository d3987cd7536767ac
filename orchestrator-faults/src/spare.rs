//! Brokers of a scenario's own on spare loopback ports, so that restarting them never
//! touches the shared services other sessions and CI use.
//!
//! Each is killed and its data folder removed when dropped; its process id (a line with
//! the number), its data folder (a line `dir <path>`) and, once it is killed and reaped, its
//! end (a line `done <pid>`) are also written to the file named by
//! `ORCHESTRATOR_FAULTS_PIDS`, so that whoever runs the suite can stop the brokers still
//! running and remove their data should this process die first (a scenario past its time
//! limit is killed).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Res;

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Appends `line` to the file named by `ORCHESTRATOR_FAULTS_PIDS`, if set.
fn record(line: std::fmt::Arguments<'_>) {
    if let Some(path) = std::env::var_os("ORCHESTRATOR_FAULTS_PIDS") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// Records a spare broker's process id.
fn record_pid(pid: u32) {
    record(format_args!("{pid}"));
}

/// A fresh, empty data folder under the system's temporary folder (recorded, so that it
/// can be removed should this process be killed).
fn data_dir(what: &str) -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "orchestrator-faults-{what}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    record(format_args!("dir {}", dir.display()));
    Ok(dir)
}

/// Kills and reaps `child`, and records that its id is no longer ours (once reaped, the
/// system may give the id to any new process, which nobody must then kill by it).
fn kill(child: &mut Child) {
    // Our own child, by its handle.
    let _ = child.kill();
    let _ = child.wait();
    record(format_args!("done {}", child.id()));
}

/// Sends one RESP command and returns the first bytes of the reply (empty if the server
/// closed the connection without answering, as `SHUTDOWN` does).
#[cfg(feature = "redis")]
fn resp(port: u16, command: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(command)?;
    let mut reply = vec![0; 256];
    let n = stream.read(&mut reply).unwrap_or(0);
    reply.truncate(n);
    Ok(reply)
}

/// A redis-server of the scenario's own, with an append-only file synced on every write,
/// so that what it acknowledged survives its restart.
#[cfg(feature = "redis")]
pub(crate) struct SpareRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

#[cfg(feature = "redis")]
impl SpareRedis {
    /// Starts one on a free port.
    pub(crate) fn start() -> Res<Self> {
        let mut server = Self {
            port: free_port()?,
            dir: data_dir("redis")?,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Res {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        record_pid(child.id());
        self.child = Some(child);
        let started = Instant::now();
        loop {
            match resp(self.port, b"*1\r\n$4\r\nPING\r\n") {
                Ok(reply) if reply.starts_with(b"+PONG") => return Ok(()),
                _ if started.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => {
                    return Err(format!("the spare redis-server did not answer: {other:?}").into());
                }
            }
        }
    }

    /// The length of stream `key` (`XLEN`), if the server answers with one.
    pub(crate) fn stream_len(&self, key: &str) -> Option<u64> {
        let command = format!("*2\r\n$4\r\nXLEN\r\n${}\r\n{key}\r\n", key.len());
        let reply = resp(self.port, command.as_bytes()).ok()?;
        let text = std::str::from_utf8(&reply).ok()?;
        text.strip_prefix(':')?.trim_end().parse().ok()
    }

    /// The string value of `key` (`GET`); `None` when it is not set, or the server does not
    /// answer.
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        let command = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        let reply = resp(self.port, command.as_bytes()).ok()?;
        let text = std::str::from_utf8(&reply).ok()?;
        // `$<len>\r\n<value>\r\n`, or `$-1\r\n` when the key is missing.
        let (len, rest) = text.strip_prefix('$')?.split_once("\r\n")?;
        let len: usize = len.parse().ok()?;
        rest.get(..len).map(str::to_owned)
    }

    /// `SHUTDOWN` (which syncs the append-only file), then the same server again on the
    /// same port and data; returns how long it was away.
    pub(crate) fn restart(&mut self) -> Res<Duration> {
        self.restart_after(Duration::ZERO)
    }

    /// As [`restart`](Self::restart), staying down `pause` before starting again.
    pub(crate) fn restart_after(&mut self, pause: Duration) -> Res<Duration> {
        let started = Instant::now();
        let _ = resp(self.port, b"*1\r\n$8\r\nSHUTDOWN\r\n");
        if let Some(mut child) = self.child.take() {
            while child.try_wait()?.is_none() {
                if started.elapsed() > Duration::from_secs(20) {
                    kill(&mut child);
                    return Err("the spare redis-server did not stop within 20 s".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(pause);
        self.spawn()?;
        Ok(started.elapsed())
    }
}

#[cfg(feature = "redis")]
impl Drop for SpareRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The tansu binary: `ORCHESTRATOR_TANSU`, else where `cargo xtask services up` installs it.
#[cfg(feature = "kafka")]
pub(crate) fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ORCHESTRATOR_TANSU") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    std::path::Path::new(&home).join(".cache/orchestrator/tools/bin/tansu")
}

/// The spare tansu's sqlite database, in its data folder.
#[cfg(feature = "kafka")]
const DB_FILE: &str = "tansu.db";

/// A tansu of the scenario's own: sqlite storage in a folder of its own, so that a restart,
/// even after SIGKILL, keeps the data (with the header index its schema lacks, see
/// [`SpareTansu::index_headers`]).
#[cfg(feature = "kafka")]
pub(crate) struct SpareTansu {
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

#[cfg(feature = "kafka")]
impl SpareTansu {
    /// Starts one on a free port.
    pub(crate) fn start(binary: PathBuf) -> Res<Self> {
        let mut broker = Self {
            binary,
            port: free_port()?,
            dir: data_dir("tansu")?,
            child: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// Its bootstrap address.
    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Res {
        let url = format!("tcp://{}", self.address());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))?;
        let child = Command::new(&self.binary)
            .current_dir(&self.dir)
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &format!("sqlite://{DB_FILE}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        record_pid(child.id());
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(self.address()).is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("tansu did not start: see {}", self.dir.display()).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.index_headers()
    }

    /// Adds the index tansu 0.6.0's sqlite schema lacks: `header (topition, offset_id)`.
    ///
    /// Without it, every record a fetch returns has its headers looked up by a scan of the
    /// whole `header` table (one row per header of every record in the database), so reading
    /// n records of a database of N costs n × N: at 100,000 events each lookup took 8–17 ms,
    /// a consumer catching up on a backlog starved the producers for minutes, and reading the
    /// topic back did not finish within the scenario's time limit. With the index (the one
    /// SQLite advises for a foreign key's child columns) a lookup is a search, as tansu's
    /// query means it to be. tansu has created its schema before it listens; the index is
    /// kept in the data folder, so a restart finds it there (`if not exists`).
    fn index_headers(&self) -> Res {
        let db = rusqlite::Connection::open(self.dir.join(DB_FILE))?;
        db.busy_timeout(Duration::from_secs(30))?;
        let tables: i64 = db.query_row(
            "select count(*) from sqlite_master where type = 'table' and name = 'header'",
            [],
            |row| row.get(0),
        )?;
        if tables != 1 {
            return Err(format!(
                "tansu's sqlite database has no `header` table: see {}",
                self.dir.display()
            )
            .into());
        }
        db.execute_batch(
            "create index if not exists header_topition_offset_id on header (topition, offset_id)",
        )?;
        Ok(())
    }

    /// SIGKILL, a pause, then the same broker again on the same port and data; returns how
    /// long it was away.
    pub(crate) fn kill_and_restart(&mut self, pause: Duration) -> Res<Duration> {
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
        std::thread::sleep(pause);
        self.spawn()?;
        Ok(started.elapsed())
    }
}

#[cfg(feature = "kafka")]
impl Drop for SpareTansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The RabbitMQ server script: `ORCHESTRATOR_RABBITMQ_SERVER`, else the one Debian's
/// package installs, else `rabbitmq-server` on the `PATH`. Not `/usr/sbin/rabbitmq-server`
/// when run as root: that wrapper switches to the `rabbitmq` user, who cannot write the
/// node's folder here.
#[cfg(feature = "rabbitmq")]
fn rabbitmq_server() -> PathBuf {
    if let Some(path) = std::env::var_os("ORCHESTRATOR_RABBITMQ_SERVER") {
        return PathBuf::from(path);
    }
    let packaged = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if packaged.exists() {
        packaged
    } else {
        PathBuf::from("rabbitmq-server")
    }
}

/// A RabbitMQ node of the scenario's own: its own node name (`spare-<uuid>@localhost`),
/// AMQP and distribution ports, database, logs and configuration, all in its data folder,
/// so that stopping it never touches the shared broker.
///
/// Nothing of the machine's RabbitMQ setup is read: the configuration file (a listener on
/// the spare port), the environment file (empty) and the enabled-plugins file (`[]`: no
/// management plugin) are the node's own. `HOME` is the data folder too, so the Erlang
/// cookie is a fresh one Erlang writes there (the shared node's cookie is neither read nor
/// changed). The node registers its name with the machine's `epmd`, as every Erlang node
/// does; its name is unique, and the entry goes with the node.
///
/// The server script runs the Erlang VM as its child and stops it cleanly on SIGTERM; the
/// VM's own process id (from its pid file) is recorded too, so that whoever runs the suite
/// can kill it should this process die.
#[cfg(feature = "rabbitmq")]
pub(crate) struct SpareRabbitMq {
    node: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// The server script.
    child: Option<Child>,
    /// The Erlang VM's process id, once its pid file told it.
    vm: Option<u32>,
}

#[cfg(feature = "rabbitmq")]
impl SpareRabbitMq {
    /// Starts one on free ports (it takes 5–15 s to boot).
    pub(crate) fn start() -> Res<Self> {
        let dir = data_dir("rabbitmq")?;
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }
        std::fs::create_dir_all(dir.join("home"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let mut node = Self {
            node: format!("spare-{}@localhost", uuid::Uuid::now_v7().simple()),
            port,
            dist_port,
            dir,
            child: None,
            vm: None,
        };
        node.spawn()?;
        Ok(node)
    }

    /// Its AMQP URL (the default `guest` user, which may connect from loopback).
    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn spawn(&mut self) -> Res {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log").join("console.log"))?;
        let pid_file = self.dir.join("node.pid");
        let _ = std::fs::remove_file(&pid_file);
        let dir = &self.dir;
        let child = Command::new(rabbitmq_server())
            .current_dir(dir)
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", &pid_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {}: {e} (set ORCHESTRATOR_RABBITMQ_SERVER)",
                    rabbitmq_server().display()
                )
            })?;
        record_pid(child.id());
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if self.vm.is_none()
                && let Some(pid) = std::fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok())
            {
                record_pid(pid);
                self.vm = Some(pid);
            }
            if self.vm.is_some() && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(format!(
                    "the spare RabbitMQ node ended while starting ({status}): see {}",
                    self.dir.join("log").display()
                )
                .into());
            }
            if started.elapsed() > Duration::from_secs(90) {
                return Err(format!(
                    "the spare RabbitMQ node did not listen within 90 s: see {}",
                    self.dir.join("log").display()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the node: SIGTERM to its VM, which RabbitMQ takes as a clean stop (queues
    /// and messages written to disk), then waits for the server script to end (it ends
    /// with the VM); SIGKILL to both after `grace`.
    fn stop(&mut self, grace: Duration) -> Res {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // The VM this node started (its pid file), not by any name.
        let vm = self.vm.take();
        let signal = |name: &str, pid: u32| {
            Command::new("kill")
                .args([name, &pid.to_string()])
                .stderr(Stdio::null())
                .status()
        };
        if let Some(pid) = vm {
            signal("-TERM", pid)?;
        } else {
            // Not booted far enough to write its pid file: the script passes SIGTERM on.
            signal("-TERM", child.id())?;
        }
        let started = Instant::now();
        while child.try_wait()?.is_none() {
            if started.elapsed() > grace {
                if let Some(pid) = vm {
                    signal("-KILL", pid)?;
                }
                kill(&mut child);
                if let Some(pid) = vm {
                    record(format_args!("done {pid}"));
                }
                return Err(
                    format!("the spare RabbitMQ node did not stop within {grace:?}").into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The script waits for its VM: both are gone.
        if let Some(pid) = vm {
            record(format_args!("done {pid}"));
        }
        record(format_args!("done {}", child.id()));
        Ok(())
    }

    /// Stops the node cleanly, stays down `pause`, then starts it again on the same
    /// ports and data; returns how long it was away (its boot included).
    pub(crate) fn restart_after(&mut self, pause: Duration) -> Res<Duration> {
        let started = Instant::now();
        self.stop(Duration::from_secs(30))?;
        std::thread::sleep(pause);
        self.spawn()?;
        Ok(started.elapsed())
    }
}

#[cfg(feature = "rabbitmq")]
impl Drop for SpareRabbitMq {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(20));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
