//! `orchestrator-server`: serve an orchestrator deployment's GraphQL API, health, readiness
//! and metrics from a process of its own.
//!
//! ```text
//! orchestrator-server --store redis://127.0.0.1:6379 --transport redis://127.0.0.1:6379 \
//!     --listen 127.0.0.1:8080
//! ```
//!
//! Built with the `cli` feature (plus the feature of each broker backend wanted):
//! `cargo run -p orchestrator-server --features cli,redis -- --help`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use orchestrator::EventOrchestrator;
use orchestrator_server::{
    DEFAULT_MAX_PAGE_SIZE, DEFAULT_MAX_SCAN, DEFAULT_SUBSCRIPTION_WINDOW, Server, ServerConfig,
};

/// Serve an orchestrator deployment's GraphQL API (`/graphql`), `/healthz`, `/readyz` and
/// `/metrics`.
#[derive(Debug, Parser)]
#[command(name = "orchestrator-server", version)]
struct Cli {
    /// The event store: file://DIR (the embedded durable store; it must not be open in
    /// another process), redis://…, postgres://…, amqp://…, kafka://host:port, or memory:.
    /// Prefer the environment variable for URLs with passwords: arguments show in `ps`.
    #[arg(long, env = "ORCHESTRATOR_STORE", value_name = "URL")]
    store: String,

    /// The transport, which keeps the dead-letter queue: memory:, redis://…, amqp://…,
    /// kafka://host:port, postgres://….
    #[arg(
        long,
        env = "ORCHESTRATOR_TRANSPORT",
        value_name = "URL",
        default_value = "memory:"
    )]
    transport: String,

    /// The address to listen on. Any address but a loopback one needs a token.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// The bearer token `/graphql` and `/metrics` require. Set it through the environment:
    /// arguments show in `ps`.
    #[arg(
        long,
        env = "ORCHESTRATOR_SERVER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// Refuse every mutation (publish, replay, dead-letter reprocess and discard).
    #[arg(long)]
    read_only: bool,

    /// Do not serve the dashboard at `/`.
    #[arg(long)]
    no_dashboard: bool,

    /// The largest page a query may ask for.
    #[arg(long, value_name = "EVENTS", default_value_t = DEFAULT_MAX_PAGE_SIZE)]
    max_page_size: usize,

    /// The most stored events one request may read for the queries that scan the store
    /// (`event` by id, `streams`, `trace`).
    #[arg(long, value_name = "EVENTS", default_value_t = DEFAULT_MAX_SCAN)]
    max_scan: usize,

    /// How many events a live WebSocket subscriber may fall behind the store before its
    /// subscription ends with SLOW_CONSUMER.
    #[arg(long, value_name = "EVENTS", default_value_t = DEFAULT_SUBSCRIPTION_WINDOW)]
    subscription_window: u64,

    /// Allow browser requests from this origin (repeatable); none: no CORS headers.
    #[arg(long, value_name = "ORIGIN")]
    allow_origin: Vec<String>,

    /// Give up connecting to the backends after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    connect_timeout: u64,
}

type CliResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

async fn run(cli: Cli) -> CliResult {
    let mut config = ServerConfig::new(cli.listen)
        .read_only(cli.read_only)
        .dashboard(!cli.no_dashboard)
        .max_page_size(cli.max_page_size)
        .max_scan(cli.max_scan)
        .subscription_window(cli.subscription_window);
    if let Some(token) = cli.token {
        config = config.bearer_token(token);
    }
    for origin in cli.allow_origin {
        config = config.allow_origin(origin);
    }
    // Checked before connecting, so that a missing token is reported at once.
    config.validate()?;
    let build = EventOrchestrator::builder()
        .store_url(&cli.store)
        .transport_url(&cli.transport)
        .build();
    let orchestrator =
        match tokio::time::timeout(Duration::from_secs(cli.connect_timeout), build).await {
            Ok(built) => built?,
            Err(_) => {
                return Err(format!(
                    "could not reach store {} / transport {} within {} s (see --connect-timeout)",
                    orchestrator::connect::redact(&cli.store),
                    orchestrator::connect::redact(&cli.transport),
                    cli.connect_timeout
                )
                .into());
            }
        };
    let server = Server::bind(orchestrator.clone(), config).await?;
    // Tests and scripts read the address (with --listen …:0, the port the system chose).
    println!("listening on http://{}", server.local_addr());
    server
        .run_until(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await?;
    orchestrator.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
