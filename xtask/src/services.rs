//! `cargo xtask services up|status|down`: the brokers backend tests talk to.
//!
//! Every service is a row of [`SERVICES`]: where its address comes from, how to
//! tell it is ready (its real protocol, not just an open port), how to start and
//! stop it. A new backend adds a row. The browser the dashboard's test drives is not a
//! row (nothing runs in the background): `up` installs it, see [`browser`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::endpoint::{Endpoint, parse_url};
use crate::{Result, browser, describe, tansu};

/// How long to wait for a TCP connection to a service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait for a service to answer a readiness probe.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness probes while a service starts or stops.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long `down` waits for a service to stop answering.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One service backend tests depend on.
pub(crate) struct Service {
    /// Short name used on the command line, e.g. `redis`.
    pub(crate) name: &'static str,
    /// Name for humans, e.g. `Redis`.
    pub(crate) title: &'static str,
    /// Environment variable holding the address, shared with the tests.
    pub(crate) env: &'static str,
    /// Address used when the variable is unset.
    pub(crate) default_url: &'static str,
    /// Reads host and port out of the address.
    pub(crate) endpoint: fn(&str) -> Result<Endpoint>,
    /// Checks, with the service's own protocol, that it answers.
    pub(crate) probe: fn(&Endpoint) -> Health,
    /// The command that starts it in the background on this machine.
    pub(crate) start: fn(&Endpoint) -> Result<Command>,
    /// How long it may take to become ready after `start`.
    pub(crate) start_timeout: Duration,
    /// Asks it to stop.
    pub(crate) stop: fn(&Endpoint) -> Result<()>,
    /// Where a service xtask started keeps its data, for the person reading `up`/`status`.
    pub(crate) data: &'static str,
    /// Debian package providing the start command.
    pub(crate) package: &'static str,
    /// How a person starts it by hand on a machine with systemd.
    pub(crate) by_hand: &'static str,
}

/// Every service, in the order they are started.
pub(crate) const SERVICES: &[Service] = &[
    Service {
        name: "redis",
        title: "Redis",
        env: "ORCHESTRATOR_REDIS_URL",
        default_url: "redis://127.0.0.1:6379",
        endpoint: |url| parse_url(url, &[("redis", 6379, false), ("rediss", 6379, true)]),
        probe: redis_probe,
        start: redis_start,
        start_timeout: Duration::from_secs(20),
        stop: redis_stop,
        data: "memory only (started with --save \"\" --appendonly no)",
        package: "redis-server",
        by_hand: "sudo systemctl start redis-server",
    },
    Service {
        name: "rabbitmq",
        title: "RabbitMQ",
        env: "ORCHESTRATOR_AMQP_URL",
        default_url: "amqp://guest:guest@127.0.0.1:5672/%2f",
        endpoint: |url| parse_url(url, &[("amqp", 5672, false), ("amqps", 5671, true)]),
        probe: amqp_probe,
        start: |_| {
            let mut cmd = Command::new("rabbitmq-server");
            cmd.arg("-detached");
            Ok(cmd)
        },
        start_timeout: Duration::from_secs(120),
        stop: amqp_stop,
        data: "the node's own folder (Debian: /var/lib/rabbitmq/mnesia)",
        package: "rabbitmq-server",
        by_hand: "sudo systemctl start rabbitmq-server",
    },
    Service {
        name: "postgres",
        title: "PostgreSQL",
        env: "ORCHESTRATOR_POSTGRES_URL",
        default_url: "postgres://postgres@127.0.0.1:5432/test",
        endpoint: |url| {
            parse_url(
                url,
                &[("postgres", 5432, false), ("postgresql", 5432, false)],
            )
        },
        probe: postgres_probe,
        start: |endpoint| Ok(pg_ctlcluster(endpoint, "start")),
        start_timeout: Duration::from_secs(60),
        stop: postgres_stop,
        data: "the cluster's data directory (Debian: /var/lib/postgresql/<version>/main)",
        package: "postgresql",
        by_hand: "sudo pg_ctlcluster 15 main start (or: sudo systemctl start postgresql)",
    },
    Service {
        name: "kafka",
        title: "Kafka (tansu)",
        env: "ORCHESTRATOR_KAFKA_BROKERS",
        default_url: "127.0.0.1:9092",
        endpoint: kafka_endpoint,
        probe: kafka_probe,
        start: tansu_start,
        start_timeout: Duration::from_secs(60),
        stop: tansu_stop,
        data: "sqlite, emptied at each start, and its pid file: ~/.cache/orchestrator/tansu/data",
        package: "dash",
        by_hand: "cd ~/.cache/orchestrator/tansu/data && ~/.cache/orchestrator/tools/bin/tansu \
                  --listener-url tcp://127.0.0.1:9092 --advertised-listener-url \
                  tcp://127.0.0.1:9092 --storage-engine sqlite://tansu.db",
    },
];

/// The outcome of a readiness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    /// It answered as expected; the text says how.
    Ready(String),
    /// It did not; the text says why.
    Down(String),
}

/// Opens a TCP connection with timeouts on connect, read and write.
fn connect(endpoint: &Endpoint) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
    for addr in (endpoint.host.as_str(), endpoint.port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => {
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sends `request` and reads the reply until `complete` says it is enough or the
/// peer closes. An empty reply means the peer closed without answering.
fn exchange(
    endpoint: &Endpoint,
    request: &[u8],
    complete: fn(&[u8]) -> bool,
) -> io::Result<Vec<u8>> {
    let mut stream = connect(endpoint)?;
    stream.write_all(request)?;
    let mut reply = Vec::new();
    let mut buf = [0; 512];
    while !complete(&reply) {
        match stream.read(&mut buf)? {
            0 => break,
            n => reply.extend_from_slice(&buf[..n]),
        }
    }
    // The probe is done either way; a failed shutdown changes nothing.
    let _ = stream.shutdown(Shutdown::Both);
    Ok(reply)
}

/// The first line of a reply, printable, for error messages.
fn first_line(reply: &[u8]) -> String {
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line)
        .trim_end()
        .escape_debug()
        .to_string()
}

/// For TLS endpoints: only checks that the port accepts connections.
fn tcp_probe(endpoint: &Endpoint) -> Health {
    match connect(endpoint) {
        Ok(_) => Health::Ready("port open; TLS, so the protocol was not checked".to_owned()),
        Err(e) => Health::Down(e.to_string()),
    }
}

/// Redis answers a RESP `PING` with `+PONG`, or `-NOAUTH` when it wants a password.
fn redis_probe(endpoint: &Endpoint) -> Health {
    if endpoint.tls {
        return tcp_probe(endpoint);
    }
    match exchange(endpoint, b"*1\r\n$4\r\nPING\r\n", |r| r.contains(&b'\n')) {
        Ok(reply) if reply.starts_with(b"+PONG") => Health::Ready("PONG".to_owned()),
        Ok(reply) if reply.starts_with(b"-NOAUTH") => {
            Health::Ready("answers, needs a password".to_owned())
        }
        Ok(reply) if reply.is_empty() => Health::Down("closed the connection on PING".to_owned()),
        Ok(reply) => Health::Down(format!("answered PING with `{}`", first_line(&reply))),
        Err(e) => Health::Down(e.to_string()),
    }
}

/// The command that starts a throwaway, non-persistent Redis on the endpoint's port.
fn redis_start(endpoint: &Endpoint) -> Result<Command> {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--daemonize", "yes", "--bind", "127.0.0.1", "-::1"])
        .args(["--port", &endpoint.port.to_string()])
        .args(["--save", "", "--appendonly", "no"]);
    if Path::new("/var/lib/redis").is_dir() {
        cmd.args(["--dir", "/var/lib/redis"]);
    }
    // Opening the file is the only std way to learn whether we may write there.
    let log = "/var/log/redis/ci.log";
    if OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .is_ok()
    {
        cmd.args(["--logfile", log]);
    }
    Ok(cmd)
}

/// Sends RESP `SHUTDOWN NOSAVE`; Redis closes the connection without a reply when it obeys.
fn redis_stop(endpoint: &Endpoint) -> Result<()> {
    let request = b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n";
    match exchange(endpoint, request, |r| r.contains(&b'\n')) {
        Ok(reply) if reply.is_empty() => Ok(()),
        Ok(reply) => Err(format!("Redis refused SHUTDOWN: `{}`", first_line(&reply))),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(format!(
            "SHUTDOWN NOSAVE to Redis at {endpoint} failed: {e}"
        )),
    }
}

/// RabbitMQ answers the AMQP 0-9-1 protocol header with a method frame
/// (type 1, Connection.Start); we then hang up.
fn amqp_probe(endpoint: &Endpoint) -> Health {
    if endpoint.tls {
        return tcp_probe(endpoint);
    }
    match exchange(endpoint, b"AMQP\x00\x00\x09\x01", |r| !r.is_empty()) {
        Ok(reply) if reply.first() == Some(&1) => Health::Ready("Connection.Start".to_owned()),
        Ok(reply) if reply.starts_with(b"AMQP") => Health::Down(format!(
            "does not speak AMQP 0-9-1, offers protocol header {:?}",
            &reply[..reply.len().min(8)]
        )),
        Ok(reply) if reply.is_empty() => {
            Health::Down("closed the connection on the AMQP header".to_owned())
        }
        Ok(reply) => Health::Down(format!("unexpected first byte {} in reply", reply[0])),
        Err(e) => Health::Down(e.to_string()),
    }
}

/// Stops the local RabbitMQ node with `rabbitmqctl stop`.
fn amqp_stop(_: &Endpoint) -> Result<()> {
    let mut cmd = Command::new("rabbitmqctl");
    cmd.arg("stop");
    let status = cmd
        .status()
        .map_err(|e| spawn_error(&cmd, &e, "rabbitmq-server"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", describe(&cmd)))
    }
}

/// PostgreSQL answers an `SSLRequest` with one byte: `S` (it will speak TLS) or `N` (plain
/// only) — which no other protocol on its port would send.
fn postgres_probe(endpoint: &Endpoint) -> Health {
    // Length 8, then the SSLRequest code 80877103.
    let request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    match exchange(endpoint, &request, |r| !r.is_empty()) {
        Ok(reply) if reply.first() == Some(&b'N') => {
            Health::Ready("answers SSLRequest: plain connections".to_owned())
        }
        Ok(reply) if reply.first() == Some(&b'S') => {
            Health::Ready("answers SSLRequest: offers TLS".to_owned())
        }
        Ok(reply) if reply.is_empty() => {
            Health::Down("closed the connection on SSLRequest".to_owned())
        }
        Ok(reply) => Health::Down(format!(
            "answered SSLRequest with `{}`: not PostgreSQL, or starting up",
            first_line(&reply)
        )),
        Err(e) => Health::Down(e.to_string()),
    }
}

/// `pg_ctlcluster <version> <cluster> <action>` for every Debian cluster on the endpoint's
/// port (as `pg_lsclusters` lists them); the service runs as a machine service, so xtask
/// starts the cluster that is there rather than one of its own.
fn pg_ctlcluster(endpoint: &Endpoint, action: &str) -> Command {
    let script = format!(
        "clusters=$(pg_lsclusters --no-header | awk '$3 == {port} {{ print $1 \" \" $2 }}'); \
         [ -n \"$clusters\" ] || {{ echo 'no PostgreSQL cluster on port {port} (pg_lsclusters)' >&2; exit 1; }}; \
         echo \"$clusters\" | while read version cluster; do \
             pg_ctlcluster \"$version\" \"$cluster\" {action} || exit 1; \
         done",
        port = endpoint.port
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd
}

/// Stops the cluster on the endpoint's port with `pg_ctlcluster … stop`.
fn postgres_stop(endpoint: &Endpoint) -> Result<()> {
    let mut cmd = pg_ctlcluster(endpoint, "stop");
    let status = cmd
        .status()
        .map_err(|e| spawn_error(&cmd, &e, "postgresql"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", describe(&cmd)))
    }
}

/// The first broker of a `bootstrap.servers` list (`host:port[,host:port…]`, each optionally
/// with a `plaintext://`-style scheme; `ssl`/`sasl_ssl` schemes mean TLS).
fn kafka_endpoint(brokers: &str) -> Result<Endpoint> {
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let (tls, rest) = match first.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase().contains("ssl"), rest),
        None => (false, first),
    };
    let url = format!("kafka://{rest}");
    let mut endpoint = parse_url(&url, &[("kafka", 9092, false)])
        .map_err(|e| format!("`{brokers}`: expected host:port[,host:port…] ({e})"))?;
    endpoint.tls = tls;
    Ok(endpoint)
}

/// A Kafka `ApiVersions` request, version 0, correlation id 0x0ca7, client id `xtask`.
fn api_versions_request() -> Vec<u8> {
    let client = b"xtask";
    let mut body = Vec::new();
    body.extend_from_slice(&18_i16.to_be_bytes()); // api key: ApiVersions
    body.extend_from_slice(&0_i16.to_be_bytes()); // api version
    body.extend_from_slice(&0x0ca7_i32.to_be_bytes()); // correlation id
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    let mut request = (body.len() as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&body);
    request
}

/// Whether a reply holds its size, correlation id and error code.
fn api_versions_complete(reply: &[u8]) -> bool {
    reply.len() >= 10
}

/// Reads an `ApiVersions` reply: `Ok(api count)` when it answers our request without error.
fn read_api_versions(reply: &[u8]) -> Result<i32> {
    let field = |range: std::ops::Range<usize>| {
        reply
            .get(range)
            .ok_or_else(|| format!("short reply of {} bytes", reply.len()))
    };
    let correlation = i32::from_be_bytes(field(4..8)?.try_into().map_err(|_| "bad reply")?);
    if correlation != 0x0ca7 {
        return Err(format!(
            "reply to another request (correlation id {correlation})"
        ));
    }
    let error = i16::from_be_bytes(field(8..10)?.try_into().map_err(|_| "bad reply")?);
    if error != 0 {
        return Err(format!("ApiVersions failed with error code {error}"));
    }
    let count = field(10..14)
        .ok()
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_be_bytes);
    Ok(count)
}

/// A Kafka `Metadata` request, version 1, for no topic (brokers only), correlation id 0x0ca8.
fn metadata_request() -> Vec<u8> {
    let client = b"xtask";
    let mut body = Vec::new();
    body.extend_from_slice(&3_i16.to_be_bytes()); // api key: Metadata
    body.extend_from_slice(&1_i16.to_be_bytes()); // api version
    body.extend_from_slice(&0x0ca8_i32.to_be_bytes()); // correlation id
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    body.extend_from_slice(&0_i32.to_be_bytes()); // no topics
    let mut request = (body.len() as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&body);
    request
}

/// Whether a reply holds as many bytes as its size field announces.
fn reply_complete(reply: &[u8]) -> bool {
    reply
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_be_bytes)
        .and_then(|size| usize::try_from(size).ok())
        .is_some_and(|size| reply.len() >= size + 4)
}

/// Reads a `Metadata` v1 reply: `Ok(broker count)` when it answers our request.
fn read_metadata(reply: &[u8]) -> Result<i32> {
    let int = |at: usize| {
        reply
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_be_bytes)
            .ok_or_else(|| format!("short Metadata reply of {} bytes", reply.len()))
    };
    if int(4)? != 0x0ca8 {
        return Err("Metadata reply to another request".to_owned());
    }
    match int(8)? {
        brokers if brokers > 0 => Ok(brokers),
        brokers => Err(format!("Metadata lists {brokers} brokers")),
    }
}

/// A Kafka broker answers `ApiVersions` with the APIs it serves, and `Metadata` with its
/// brokers — which needs its storage, so a broker whose storage failed is not ready.
fn kafka_probe(endpoint: &Endpoint) -> Health {
    if endpoint.tls {
        return tcp_probe(endpoint);
    }
    let apis = match exchange(endpoint, &api_versions_request(), api_versions_complete) {
        Ok(reply) if reply.is_empty() => {
            return Health::Down("closed the connection on ApiVersions".to_owned());
        }
        Ok(reply) => match read_api_versions(&reply) {
            Ok(count) => count,
            Err(why) => return Health::Down(why),
        },
        Err(e) => return Health::Down(e.to_string()),
    };
    match exchange(endpoint, &metadata_request(), reply_complete) {
        Ok(reply) => match read_metadata(&reply) {
            Ok(brokers) => Health::Ready(format!("ApiVersions: {apis} APIs, {brokers} broker(s)")),
            Err(why) => Health::Down(format!(
                "answers ApiVersions but not Metadata ({why}); its storage may have failed"
            )),
        },
        Err(e) => Health::Down(format!("answers ApiVersions but not Metadata ({e})")),
    }
}

/// The shared broker's folder: its sqlite database and its pid file.
fn shared_tansu_dir() -> Result<std::path::PathBuf> {
    Ok(tansu::cache_dir()?.join("tansu/data"))
}

/// Starts the shared tansu (installing it first if needed) with sqlite storage on an empty
/// database, writing its pid next to it so that `down` can stop exactly that process.
///
/// This broker is for running `cargo test` by hand; `cargo xtask test-all` starts one of its
/// own per run. It only holds test topics, which every test names afresh, so each start
/// begins on an empty database: the database grows only while it runs (tansu 0.6.0's sqlite
/// engine slows every fetch as its header table grows, and was seen to wedge, "more or less
/// than one row", on a database grown over many runs). `services down kafka` and `services
/// up kafka` start it afresh.
fn tansu_start(endpoint: &Endpoint) -> Result<Command> {
    let binary = tansu::binary()?;
    let dir = shared_tansu_dir()?;
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // A tansu that xtask started is still running but does not answer (its storage failed):
    // stop it, so the new one can take the port and its database can go.
    if let Some(pid) = running_tansu()? {
        eprintln!("Kafka: stopping the unresponsive tansu started earlier (pid {pid})");
        tansu_stop(endpoint)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tansu::alive(pid) && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        if tansu::alive(pid) {
            // A wedged tansu may not act on SIGTERM: it holds the port, so it must go.
            eprintln!("Kafka: tansu (pid {pid}) ignored SIGTERM; sending SIGKILL");
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            thread::sleep(POLL_INTERVAL);
        }
    }
    for stale in ["tansu.db", "tansu.db-wal", "tansu.db-shm"] {
        let _ = fs::remove_file(dir.join(stale));
    }
    let url = format!("tcp://{endpoint}");
    // `exec` keeps the shell's pid, so the pid file names tansu itself.
    let script = format!(
        "echo $$ > tansu.pid && exec '{}' --listener-url {url} --advertised-listener-url {url} \
         --storage-engine sqlite://tansu.db",
        binary.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir);
    Ok(cmd)
}

/// The pid of the tansu `up` started, if that process still runs.
fn running_tansu() -> Result<Option<u32>> {
    let pid_file = shared_tansu_dir()?.join("tansu.pid");
    let pid = fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    Ok(pid.filter(|&pid| tansu::alive(pid)))
}

/// Stops the tansu that `up` started, by the pid it wrote.
fn tansu_stop(_: &Endpoint) -> Result<()> {
    let pid_file = shared_tansu_dir()?.join("tansu.pid");
    let pid = fs::read_to_string(&pid_file)
        .map_err(|e| {
            format!(
                "cannot read {} ({e}): this Kafka was not started by xtask; stop it where it runs",
                pid_file.display()
            )
        })?
        .trim()
        .parse::<u32>()
        .map_err(|e| format!("{}: {e}", pid_file.display()))?;
    let mut cmd = Command::new("kill");
    cmd.arg(pid.to_string());
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if status.success() {
        let _ = fs::remove_file(&pid_file);
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", describe(&cmd)))
    }
}

/// Explains a failure to run `cmd`, singling out "not installed".
fn spawn_error(cmd: &Command, error: &io::Error, package: &str) -> String {
    let program = cmd.get_program().to_string_lossy();
    if error.kind() == io::ErrorKind::NotFound {
        format!(
            "`{program}` is not installed (not found on PATH); install it \
             (Debian: `sudo apt-get install {package}`)"
        )
    } else {
        format!("cannot run `{}`: {error}", describe(cmd))
    }
}

impl Service {
    /// Where this service is, from its environment variable or the default.
    fn resolve(&self) -> Result<Endpoint> {
        let url = match std::env::var(self.env) {
            Ok(url) if !url.trim().is_empty() => url,
            Ok(_) | Err(std::env::VarError::NotPresent) => self.default_url.to_owned(),
            Err(e) => return Err(format!("{}: {e}", self.env)),
        };
        (self.endpoint)(url.trim()).map_err(|e| format!("{} ({}): {e}", self.title, self.env))
    }

    /// Probes until `wanted` holds or `timeout` passes; returns the last probe.
    fn wait_for(
        &self,
        endpoint: &Endpoint,
        timeout: Duration,
        wanted: fn(&Health) -> bool,
    ) -> Health {
        let deadline = Instant::now() + timeout;
        loop {
            let health = (self.probe)(endpoint);
            if wanted(&health) || Instant::now() >= deadline {
                return health;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Makes sure the service answers, starting it if needed.
    fn up(&self) -> Result<()> {
        let endpoint = self.resolve()?;
        let reason = match (self.probe)(&endpoint) {
            Health::Ready(how) => {
                eprintln!("{} at {endpoint}: ready ({how})", self.title);
                return Ok(());
            }
            Health::Down(reason) => reason,
        };
        let elsewhere = format!("point {} at a running {}", self.env, self.title);
        if !endpoint.is_local() || endpoint.tls {
            return Err(format!(
                "{} at {endpoint} is down ({reason}); xtask only starts plain services on \
                 this machine: start it where it runs, or {elsewhere}",
                self.title
            ));
        }
        let mut cmd = (self.start)(&endpoint)?;
        let command = describe(&cmd);
        eprintln!(
            "{} at {endpoint}: down ({reason}); starting: {command}",
            self.title
        );
        let log_path = std::env::temp_dir().join(format!(
            "orchestrator-xtask-{}-{}.log",
            self.name, endpoint.port
        ));
        let log = File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot reuse {}: {e}", log_path.display()))?;
        // Daemons may keep inherited pipes open forever, which would hang whoever
        // reads our output (CI); their start-up output goes to a file instead.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {}, or {elsewhere}",
                    self.title,
                    spawn_error(&cmd, &e, self.package)
                )
            })?;
        self.wait_started(&endpoint, child, &log_path).map_err(|why| {
            format!(
                "{} at {endpoint} did not become ready: {why}\n  tried: {command}\n  its output: \
                 {}{}\n  start it by hand: `{}`, or run the command above in a shell to see \
                 what goes wrong, or {elsewhere}",
                self.title,
                log_path.display(),
                log_tail(&log_path),
                self.by_hand,
            )
        })
    }

    /// Waits until the started service answers, or its start command fails.
    fn wait_started(&self, endpoint: &Endpoint, mut child: Child, log: &Path) -> Result<()> {
        let started = Instant::now();
        loop {
            // Start commands daemonize, so exiting is normal; only failure is news.
            let failed = child.try_wait().ok().flatten().filter(|s| !s.success());
            if let Some(status) = failed {
                return Err(format!("the start command failed ({status})"));
            }
            match (self.probe)(endpoint) {
                Health::Ready(how) => {
                    eprintln!(
                        "{} at {endpoint}: ready after {:.1}s ({how}); started by xtask; its \
                         output: {}; its data: {}",
                        self.title,
                        started.elapsed().as_secs_f64(),
                        log.display(),
                        self.data
                    );
                    return Ok(());
                }
                Health::Down(reason) if started.elapsed() >= self.start_timeout => {
                    return Err(format!(
                        "still down after {}s ({reason})",
                        self.start_timeout.as_secs()
                    ));
                }
                Health::Down(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// Stops the service if it answers, and waits until it no longer does.
    fn down(&self) -> Result<()> {
        let endpoint = self.resolve()?;
        if let Health::Down(reason) = (self.probe)(&endpoint) {
            eprintln!("{} at {endpoint}: already down ({reason})", self.title);
            return Ok(());
        }
        if !endpoint.is_local() {
            return Err(format!(
                "{} at {endpoint} is not on this machine; not stopping it",
                self.title
            ));
        }
        eprintln!("{} at {endpoint}: stopping", self.title);
        (self.stop)(&endpoint)?;
        match self.wait_for(&endpoint, STOP_TIMEOUT, |h| matches!(h, Health::Down(_))) {
            Health::Down(_) => {
                eprintln!("{} at {endpoint}: stopped", self.title);
                Ok(())
            }
            Health::Ready(_) => Err(format!(
                "{} at {endpoint} still answers {}s after being asked to stop",
                self.title,
                STOP_TIMEOUT.as_secs()
            )),
        }
    }
}

/// The last lines of a start-up log, indented, or nothing if it is empty.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(15)..];
    tail.iter().map(|line| format!("\n    | {line}")).collect()
}

/// The services named in `names`, or all of them when `names` is empty, and whether the
/// browser ([`browser::NAME`]) is among them (it is when `names` is empty).
fn select(names: &[String]) -> Result<(Vec<&'static Service>, bool)> {
    if names.is_empty() {
        return Ok((SERVICES.iter().collect(), true));
    }
    let browser = names.iter().any(|name| name == browser::NAME);
    let services = names
        .iter()
        .filter(|name| *name != browser::NAME)
        .map(|name| {
            SERVICES.iter().find(|s| s.name == name).ok_or_else(|| {
                let known: Vec<&str> = SERVICES
                    .iter()
                    .map(|s| s.name)
                    .chain([browser::NAME])
                    .collect();
                format!("unknown service `{name}`; known: {}", known.join(", "))
            })
        })
        .collect::<Result<_>>()?;
    Ok((services, browser))
}

/// `services up`: every selected service answers afterwards, or an error lists those
/// that do not. Tries them all before failing.
pub(crate) fn up(names: &[String]) -> Result<()> {
    let (services, browser) = select(names)?;
    let mut failures: Vec<String> = services
        .into_iter()
        .filter_map(|service| service.up().err())
        .collect();
    if browser && let Err(why) = browser::up() {
        failures.push(why);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// `services status`: prints each service's address and state; success only if all are up.
pub(crate) fn status(names: &[String]) -> Result<ExitCode> {
    let mut all_up = true;
    let (services, browser) = select(names)?;
    for service in services {
        let endpoint = service.resolve()?;
        let (state, detail) = match (service.probe)(&endpoint) {
            Health::Ready(how) => ("up", how),
            Health::Down(why) => {
                all_up = false;
                ("down", why)
            }
        };
        let address = endpoint.to_string();
        println!("{:<10} {address:<22} {state:<5} ({detail})", service.name);
    }
    if browser {
        let (state, detail) = match browser::status() {
            Ok(versions) => ("up", versions),
            Err(why) => {
                all_up = false;
                ("down", why)
            }
        };
        println!(
            "{:<10} {:<22} {state:<5} ({detail})",
            browser::NAME,
            "/usr/bin"
        );
    }
    Ok(if all_up {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `services down`: stops the selected services that answer.
pub(crate) fn down(names: &[String]) -> Result<()> {
    eprintln!(
        "warning: other sessions and CI run against these services; stop them only if you \
         know nobody needs them (`cargo xtask services up` brings them back)"
    );
    // The browser runs only while the test drives it: there is nothing to stop.
    let (services, _) = select(names)?;
    let failures: Vec<String> = services
        .into_iter()
        .filter_map(|service| service.down().err())
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::{Endpoint, SERVICES};

    /// Parses with the schemes of the service named `name`.
    fn endpoint(name: &str, url: &str) -> Result<Endpoint, String> {
        let service = SERVICES
            .iter()
            .find(|s| s.name == name)
            .ok_or("no such service")?;
        (service.endpoint)(url)
    }

    fn at(host: &str, port: u16, tls: bool) -> Result<Endpoint, String> {
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            tls,
        })
    }

    #[test]
    fn postgres_urls() {
        assert_eq!(
            endpoint("postgres", "postgres://postgres@127.0.0.1:5432/test"),
            at("127.0.0.1", 5432, false)
        );
        assert_eq!(
            endpoint(
                "postgres",
                "postgresql://u:p%40ss@db.internal/app?sslmode=disable"
            ),
            at("db.internal", 5432, false)
        );
        assert!(endpoint("postgres", "host=/var/run/postgresql dbname=test").is_err());
    }

    /// The probe tells the machine's PostgreSQL apart from a port that is closed; skipped
    /// when this machine runs none on 5432.
    #[test]
    fn the_postgres_probe_speaks_the_protocol() {
        let service = SERVICES.iter().find(|s| s.name == "postgres").unwrap();
        let closed = at("127.0.0.1", 1, false).unwrap();
        assert!(matches!((service.probe)(&closed), super::Health::Down(_)));
        let local = at("127.0.0.1", 5432, false).unwrap();
        match (service.probe)(&local) {
            super::Health::Ready(how) => assert!(how.contains("SSLRequest"), "{how}"),
            super::Health::Down(why) => eprintln!("skipping: no PostgreSQL on 5432 ({why})"),
        }
    }

    #[test]
    fn redis_urls() {
        assert_eq!(
            endpoint("redis", "redis://127.0.0.1:6379"),
            at("127.0.0.1", 6379, false)
        );
        assert_eq!(
            endpoint("redis", "redis://localhost"),
            at("localhost", 6379, false)
        );
        assert_eq!(
            endpoint(
                "redis",
                "redis://user:p%40ss@cache.internal:6390/2?protocol=resp3"
            ),
            at("cache.internal", 6390, false)
        );
        assert_eq!(
            endpoint("redis", "redis://:secret@10.0.0.5/0"),
            at("10.0.0.5", 6379, false)
        );
        assert_eq!(
            endpoint("redis", "rediss://[::1]:6380"),
            at("::1", 6380, true)
        );
        assert_eq!(endpoint("redis", "REDIS://[::1]"), at("::1", 6379, false));
        assert_eq!(
            endpoint("redis", "redis://a@b@host:1"),
            at("host", 1, false)
        );
    }

    #[test]
    fn amqp_urls() {
        assert_eq!(
            endpoint("rabbitmq", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            at("127.0.0.1", 5672, false)
        );
        assert_eq!(
            endpoint("rabbitmq", "amqp://rabbit"),
            at("rabbit", 5672, false)
        );
        assert_eq!(
            endpoint("rabbitmq", "amqps://u:p@mq.example.com/vh"),
            at("mq.example.com", 5671, true)
        );
        assert_eq!(
            endpoint("rabbitmq", "amqp://[fe80::1]:5673/?heartbeat=10"),
            at("fe80::1", 5673, false)
        );
    }

    #[test]
    fn kafka_brokers() {
        assert_eq!(
            endpoint("kafka", "127.0.0.1:9092"),
            at("127.0.0.1", 9092, false)
        );
        assert_eq!(
            endpoint("kafka", "b1.internal:9093,b2.internal:9093"),
            at("b1.internal", 9093, false)
        );
        assert_eq!(endpoint("kafka", "localhost"), at("localhost", 9092, false));
        assert_eq!(
            endpoint("kafka", "SASL_SSL://[::1]:9094"),
            at("::1", 9094, true)
        );
        assert!(endpoint("kafka", "host:port").is_err());
    }

    #[test]
    fn api_versions_round_trip() {
        let request = super::api_versions_request();
        let size = i32::from_be_bytes(request[..4].try_into().unwrap());
        assert_eq!(size as usize, request.len() - 4);
        assert_eq!(&request[4..8], &[0, 18, 0, 0], "ApiVersions v0");
        // A reply: size, correlation id, no error, 2 APIs, …
        let mut reply = vec![0, 0, 0, 20, 0, 0, 0x0c, 0xa7, 0, 0, 0, 0, 0, 2];
        assert!(super::api_versions_complete(&reply));
        assert_eq!(super::read_api_versions(&reply), Ok(2));
        reply[9] = 35;
        assert!(super::read_api_versions(&reply).is_err());
        assert!(super::read_api_versions(&[0, 0, 0, 6, 0, 0, 0, 1, 0, 0]).is_err());
    }

    #[test]
    fn metadata_round_trip() {
        let request = super::metadata_request();
        assert_eq!(&request[4..8], &[0, 3, 0, 1], "Metadata v1");
        assert_eq!(&request[request.len() - 4..], &[0, 0, 0, 0], "no topics");
        let reply = [0, 0, 0, 12, 0, 0, 0x0c, 0xa8, 0, 0, 0, 1, 0, 0, 0, 9];
        assert!(super::reply_complete(&reply));
        assert!(!super::reply_complete(&reply[..10]));
        assert_eq!(super::read_metadata(&reply), Ok(1));
        assert!(super::read_metadata(&[0, 0, 0, 8, 0, 0, 0x0c, 0xa8, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn kafka_probe_speaks_the_protocol() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            // ApiVersions, then Metadata, each on its own connection.
            for (len, reply) in [
                (19, &[0, 0, 0, 10, 0, 0, 0x0c, 0xa7, 0, 0, 0, 0, 0, 1][..]),
                (
                    23,
                    &[0, 0, 0, 12, 0, 0, 0x0c, 0xa8, 0, 0, 0, 1, 0, 0, 0, 0][..],
                ),
            ] {
                let (mut socket, _) = listener.accept().unwrap();
                let mut request = vec![0; len];
                socket.read_exact(&mut request).unwrap();
                socket.write_all(reply).unwrap();
            }
        });
        let health = (super::kafka_probe)(&at("127.0.0.1", port, false).unwrap());
        server.join().unwrap();
        assert_eq!(
            health,
            super::Health::Ready("ApiVersions: 1 APIs, 1 broker(s)".to_owned())
        );
    }

    #[test]
    fn the_browser_is_selected_by_name_or_with_everything() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let picked = |list: &[&str]| {
            super::select(&names(list))
                .map(|(services, browser)| (services.iter().map(|s| s.name).collect(), browser))
        };
        let all: Vec<&str> = SERVICES.iter().map(|s| s.name).collect();
        assert_eq!(picked(&[]), Ok((all, true)));
        assert_eq!(picked(&["chromium"]), Ok((vec![], true)));
        assert_eq!(picked(&["redis", "chromium"]), Ok((vec!["redis"], true)));
        assert_eq!(picked(&["redis"]), Ok((vec!["redis"], false)));
        let unknown = picked(&["chrome"]);
        assert!(
            unknown.as_ref().is_err_and(
                |why| why.contains("unknown service `chrome`") && why.contains("chromium")
            ),
            "{unknown:?}"
        );
    }

    #[test]
    fn bad_urls_are_explained() {
        for (name, url) in [
            ("redis", "127.0.0.1:6379"),
            ("redis", "http://127.0.0.1"),
            ("redis", "redis://host:port"),
            ("redis", "redis://host:70000"),
            ("redis", "redis://host:"),
            ("redis", "redis://:6379"),
            ("redis", "redis://[::1"),
            ("redis", "redis://[::1]6379"),
            ("rabbitmq", "redis://127.0.0.1"),
            ("rabbitmq", "amqp://"),
        ] {
            let parsed = endpoint(name, url);
            assert!(parsed.is_err(), "{url} gave {parsed:?}");
        }
    }
}
