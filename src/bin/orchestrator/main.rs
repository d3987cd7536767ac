//! `orchestrator`: look into and operate an orchestrator deployment from a terminal — tail
//! events, publish one, work the dead-letter queue, replay, browse streams and sagas, and
//! trace a request's causation tree.
//!
//! The backend is chosen by URL: `--store` (`file://DIR`, `redis://…`, `amqp://…`,
//! `kafka://host:port`, `postgres://…`, `memory:`) and `--transport` (`memory:`, `redis://…`, `amqp://…`,
//! `kafka://host:port`, `postgres://…`). Output is readable by default; `--json` prints JSON for scripts.
//! With `--server http://HOST:PORT` (and `--token`), every command runs instead through a
//! running `orchestrator-server`'s GraphQL API — the way into an embedded deployment whose
//! store directory the application holds.
//! Built with the `cli` feature (plus the feature of each broker backend wanted):
//! `cargo run --features cli --bin orchestrator -- --help`.

mod dlq;
mod events;
mod output;
mod remote;
mod sagas;
mod serve;
mod streams;
mod time;
mod trace;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use orchestrator::EventOrchestrator;
use orchestrator::core::EventStore;

/// Look into and operate an orchestrator deployment.
#[derive(Debug, Parser)]
#[command(name = "orchestrator", version)]
struct Cli {
    /// The event store: file://DIR (the embedded durable store: read commands open it
    /// read-only, beside a running application; `publish` needs it not to be open in another
    /// process), redis://… (rediss://… for TLS), amqp://… (amqps://…),
    /// kafka://host:port[?security.protocol=SASL_SSL&sasl.mechanism=…&sasl.username=…&…],
    /// postgres://user@host/db[?schema=NAME], or memory:. Prefer the environment variable for URLs with passwords: arguments show
    /// in `ps`.
    #[arg(long, global = true, env = "ORCHESTRATOR_STORE", value_name = "URL")]
    store: Option<String>,

    /// The transport, which carries published events to subscribers and keeps the
    /// dead-letter queue: memory: (this process only; with --store file://DIR, dead letters
    /// are the embedded application's, in DIR/dead-letters), redis://…, amqp://…,
    /// kafka://host:port[?…] (TLS and SASL as for --store), postgres://user@host/db[?schema=NAME].
    #[arg(
        long,
        global = true,
        env = "ORCHESTRATOR_TRANSPORT",
        value_name = "URL",
        default_value = "memory:"
    )]
    transport: String,

    /// Run the command through a running orchestrator-server (http://HOST:PORT, as it
    /// prints on start) instead of opening --store and --transport: its GraphQL API over
    /// HTTP, and over WebSocket for `tail`. The way into an embedded application whose
    /// store directory it holds: serve its orchestrator (`orchestrator_server::serve`) and
    /// point this at it. Plain http:// only.
    #[arg(long, global = true, env = "ORCHESTRATOR_SERVER", value_name = "URL")]
    server: Option<String>,

    /// The server's bearer token (required by a server listening off loopback). Prefer the
    /// environment variable: arguments show in `ps`.
    #[arg(
        long,
        global = true,
        env = "ORCHESTRATOR_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// Print JSON instead of text (events as CloudEvents).
    #[arg(long, global = true)]
    json: bool,

    /// Give up connecting to the backends (or the server) after this many seconds.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 10)]
    connect_timeout: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print events as they arrive (from the transport if one is given, else from the
    /// store; through --server, from the server's store).
    Tail(events::TailArgs),
    /// Publish one event: appended to the store; with a broker transport, also on the broker
    /// before the command returns (else the application's relay delivers it).
    Publish(events::PublishArgs),
    /// The dead-letter queue: events whose handlers failed for good.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Deliver stored events again to the transport's subscribers.
    Replay(events::ReplayArgs),
    /// Event streams in the store.
    #[command(subcommand)]
    Streams(streams::StreamsCommand),
    /// Sagas logged in the store.
    #[command(subcommand)]
    Sagas(sagas::SagasCommand),
    /// The causation tree of a correlation id (or of an event or saga id): events and saga
    /// steps, with their timings.
    Trace(trace::TraceArgs),
    /// Serve --store and --transport over HTTP: the GraphQL API, WebSocket subscriptions,
    /// the dashboard at /, /healthz, /readyz and /metrics (runs the orchestrator-server
    /// binary; --token is the bearer token it will require).
    Serve(serve::ServeArgs),
}

/// What every command needs: the backends (or the server) and how to print.
struct Context {
    /// With `--server`: the server every command goes through instead of the backends.
    server: Option<remote::Server>,
    store: Option<String>,
    transport: String,
    json: bool,
    connect_timeout: Duration,
}

/// A failure to report: printed as `error: …`, exit code 1.
type CliResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// What a command does with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Only reads it: a `file://` store is opened read-only, beside a running application.
    Read,
    /// Appends to it: a `file://` store is opened for writing, which only one process may.
    Write,
}

/// The message for a write to a `file://` store another process holds.
fn locked(dir: &std::path::Path, pid: Option<u32>) -> String {
    let holder = pid.map_or_else(
        || "a running process".to_owned(),
        |pid| format!("process {pid}"),
    );
    format!(
        "the store in {} is held by {holder}, which has it open for writing, and only one \
         process may write to it: publish through that application (or through a broker \
         transport it subscribes to), or stop it and try again. Commands that only read the \
         store (streams, sagas, trace, tail, replay, dlq) work while it runs",
        dir.display()
    )
}

impl Context {
    /// The store URL, or an error saying how to give one.
    fn store_url(&self) -> CliResult<&str> {
        self.store.as_deref().ok_or_else(|| {
            "no event store given: pass --store file://DIR (or redis://…, amqp://…, \
             kafka://host:port, postgres://…), or set ORCHESTRATOR_STORE"
                .into()
        })
    }

    /// The store URL for a command: the one given, or (for commands that only need the
    /// transport) `memory:`.
    fn store_url_or_memory(&self, needs_store: bool) -> CliResult<String> {
        if needs_store {
            return Ok(self.store_url()?.to_owned());
        }
        Ok(self.store.clone().unwrap_or_else(|| "memory:".to_owned()))
    }

    /// An orchestrator on the given store (or an in-memory one, for commands that only need
    /// the transport) and transport.
    async fn connect(&self, needs_store: bool, access: Access) -> CliResult<EventOrchestrator> {
        let url = self.store_url_or_memory(needs_store)?;
        let store = self.open_store(&url, access).await?;
        self.connect_with(store, &url, access).await
    }

    /// Whether this command's orchestrator relays what it stores: only `publish` on a broker
    /// transport does (and waits until the event is on the broker before it exits). Read
    /// commands never relay, and with the in-process transport nobody here would receive
    /// the event: the application's own relay delivers it when it runs.
    fn relays(&self, access: Access) -> bool {
        access == Access::Write && !self.in_process_transport()
    }

    /// Opens the store: read-only for commands that only read it, so that they work on the
    /// `file://` store of a running application.
    async fn open_store(&self, url: &str, access: Access) -> CliResult<Arc<dyn EventStore>> {
        let open = async {
            match access {
                Access::Read => orchestrator::connect::store_read_only(url).await,
                Access::Write => orchestrator::connect::store(url).await,
            }
        };
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(Ok(store)) => Ok(store),
            Ok(Err(orchestrator::Error::Core(error))) => {
                if let Some(orchestrator::store::Error::Locked { dir, pid }) =
                    orchestrator::store::Error::from_core(&error)
                {
                    return Err(locked(dir, *pid).into());
                }
                Err(self.unreachable(url, orchestrator::Error::Core(error)))
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(self.too_slow(url)),
        }
    }

    /// An orchestrator on `store` (opened from `url`) and the transport.
    async fn connect_with(
        &self,
        store: Arc<dyn EventStore>,
        url: &str,
        access: Access,
    ) -> CliResult<EventOrchestrator> {
        let relay = if self.relays(access) {
            orchestrator::RelayOptions::default()
        } else {
            orchestrator::RelayOptions::disabled()
        };
        let build = EventOrchestrator::builder()
            .store(store)
            .transport_url(&self.transport)
            .relay(relay)
            .build();
        match tokio::time::timeout(self.connect_timeout, build).await {
            Ok(Ok(built)) => Ok(built),
            Ok(Err(error)) => Err(self.unreachable(url, error)),
            Err(_) => Err(self.too_slow(url)),
        }
    }

    /// The store's directory in embedded mode (`--store file://DIR` with the in-process
    /// transport), where the application keeps its dead letters beside the store.
    fn embedded_store_dir(&self) -> CliResult<Option<std::path::PathBuf>> {
        if !self.in_process_transport() {
            return Ok(None);
        }
        match self
            .store
            .as_deref()
            .map(orchestrator::connect::Backend::parse)
        {
            Some(Ok(orchestrator::connect::Backend::File(dir))) => Ok(Some(dir)),
            Some(Err(error)) => Err(error.into()),
            _ => Ok(None),
        }
    }

    /// A connection error, saying which backends were tried when retrying could help.
    fn unreachable(&self, url: &str, error: orchestrator::Error) -> Box<dyn std::error::Error> {
        if !error.is_temporary() {
            return error.into();
        }
        format!(
            "cannot reach store {} / transport {}: {error}",
            orchestrator::connect::redact(url),
            orchestrator::connect::redact(&self.transport),
        )
        .into()
    }

    fn too_slow(&self, url: &str) -> Box<dyn std::error::Error> {
        format!(
            "could not reach store {} / transport {} within {:?} (see --connect-timeout)",
            orchestrator::connect::redact(url),
            orchestrator::connect::redact(&self.transport),
            self.connect_timeout
        )
        .into()
    }

    /// Whether the transport is this process's own (no other process sees its events).
    fn in_process_transport(&self) -> bool {
        matches!(
            orchestrator::connect::Backend::parse(&self.transport),
            Ok(orchestrator::connect::Backend::Memory)
        )
    }
}

async fn run(cli: Cli) -> CliResult {
    let connect_timeout = Duration::from_secs(cli.connect_timeout);
    let server = match cli.server {
        Some(url) => {
            // Both would be ambiguous: the server reads its own store and transport.
            if cli.store.is_some() || cli.transport != "memory:" {
                return Err("--server and --store/--transport (or ORCHESTRATOR_STORE/\
                            ORCHESTRATOR_TRANSPORT) were both given: through a server, \
                            commands use the server's store and transport; drop one"
                    .into());
            }
            Some(remote::Server::new(
                &url,
                cli.token.clone(),
                connect_timeout,
            )?)
        }
        None => None,
    };
    let cx = Context {
        server,
        store: cli.store,
        transport: cli.transport,
        json: cli.json,
        connect_timeout,
    };
    match cli.command {
        Command::Tail(args) => events::tail(&cx, args).await,
        Command::Publish(args) => events::publish(&cx, args).await,
        Command::Dlq(command) => dlq::run(&cx, command).await,
        Command::Replay(args) => events::replay(&cx, args).await,
        Command::Streams(command) => streams::run(&cx, command).await,
        Command::Sagas(command) => sagas::run(&cx, command).await,
        Command::Trace(args) => trace::run(&cx, args).await,
        Command::Serve(args) => serve::serve(&cx, cli.token.as_deref(), args),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
