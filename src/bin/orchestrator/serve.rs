//! `orchestrator serve`: the query server (GraphQL API, WebSocket subscriptions, dashboard,
//! health and metrics) over the given store and transport. The server lives in the
//! `orchestrator-server` crate, which depends on this one, so this command runs its binary:
//! found next to this binary, else on `PATH`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{CliResult, Context};

/// The server binary's name.
const SERVER: &str = "orchestrator-server";

/// `orchestrator serve [SERVER OPTIONS]`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The server's own options, passed on as they are: `--listen ADDR` (default
    /// 127.0.0.1:8080; any address but a loopback one needs --token), `--read-only`,
    /// `--no-dashboard`, `--allow-origin ORIGIN`, page and window limits. See them with
    /// `orchestrator serve -- --help`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "SERVER OPTIONS"
    )]
    args: Vec<OsString>,
}

/// Runs the server binary with `--store`, `--transport` and `--token` handed over through
/// its environment (not its arguments, which show in `ps`), and `--connect-timeout`; on Unix
/// the server replaces this process, elsewhere this process waits for it and exits with
/// its code.
pub(crate) fn serve(cx: &Context, token: Option<&str>, args: ServeArgs) -> CliResult {
    if cx.server.is_some() {
        return Err(
            "`serve` runs a server: --server (ORCHESTRATOR_SERVER) is for commands \
                    run through one; drop it"
                .into(),
        );
    }
    let Some(store) = &cx.store else {
        return Err(
            "`serve` needs the store to serve: pass --store URL (or set \
                    ORCHESTRATOR_STORE), e.g. --store file://./events"
                .into(),
        );
    };
    let binary = find_server()?;
    let mut command = std::process::Command::new(&binary);
    command
        .env("ORCHESTRATOR_STORE", store)
        .env("ORCHESTRATOR_TRANSPORT", &cx.transport)
        .arg("--connect-timeout")
        .arg(cx.connect_timeout.as_secs().to_string())
        .args(&args.args);
    match token {
        Some(token) => command.env("ORCHESTRATOR_SERVER_TOKEN", token),
        None => command.env_remove("ORCHESTRATOR_SERVER_TOKEN"),
    };
    run(command, &binary)
}

#[cfg(unix)]
fn run(mut command: std::process::Command, binary: &Path) -> CliResult {
    use std::os::unix::process::CommandExt as _;
    // Only returns if the server could not be started.
    let error = command.exec();
    Err(format!("could not start {}: {error}", binary.display()).into())
}

#[cfg(not(unix))]
fn run(mut command: std::process::Command, binary: &Path) -> CliResult {
    let status = command
        .status()
        .map_err(|error| format!("could not start {}: {error}", binary.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// The server binary: next to this one (as `cargo build` and `cargo install` put them),
/// else the first on `PATH`.
fn find_server() -> CliResult<PathBuf> {
    let name = format!("{SERVER}{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(&name))
                .collect()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            format!(
                "`serve` runs the {SERVER} binary, which is neither next to this one nor on \
                 PATH: install it with `cargo install orchestrator-server --features cli` \
                 (add the features of the backends you serve, e.g. `cli,redis`), or build it \
                 in this workspace with `cargo build -p orchestrator-server --features cli`"
            )
            .into()
        })
}
