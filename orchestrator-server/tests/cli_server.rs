//! The umbrella's `orchestrator` CLI with `--server`: every command through a live server
//! embedded in an application that holds its file store, so that the CLI cannot write the
//! store itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use orchestrator::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// The umbrella crate's `orchestrator` binary, built in this test's target directory and
/// profile: Cargo builds only this package's binaries for its tests
/// (`CARGO_BIN_EXE_orchestrator` is the umbrella's own), so it is built here — a no-op when
/// it is fresh, and never a stale binary. It is built as `cargo test --workspace
/// --all-features` (what `cargo xtask test-all` runs) builds it, so that there it is fresh
/// already, and the binary the umbrella's own CLI tests run is not swapped for one with
/// other features. (Run alone, this test builds the umbrella with every backend once.)
fn orchestrator_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // …/target/<profile>/deps/cli_server-<hash>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => panic!("no profile directory above {}", exe.display()),
        };
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
        let mut build = std::process::Command::new(cargo);
        // Not the variables Cargo sets for this test: a build script that watches one of
        // them (ring's watches `CARGO_MANIFEST_DIR`) would be rebuilt here, and again by the
        // next `cargo test`, each time.
        for (variable, _) in std::env::vars_os() {
            let name = variable.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref())
            {
                build.env_remove(&variable);
            }
        }
        let built = build
            .current_dir(workspace)
            .args(["build", "--workspace", "--all-features"])
            .args([
                "--bin",
                "orchestrator",
                "--profile",
                profile,
                "--target-dir",
            ])
            .arg(target_dir)
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "building the orchestrator CLI failed:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let bin = profile_dir.join(format!("orchestrator{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} was built", bin.display());
        bin
    })
}

/// The CLI with none of its settings from this environment.
fn cli() -> Command {
    let mut command = Command::new(orchestrator_bin());
    for variable in [
        "ORCHESTRATOR_SERVER",
        "ORCHESTRATOR_TOKEN",
        "ORCHESTRATOR_STORE",
        "ORCHESTRATOR_TRANSPORT",
    ] {
        command.env_remove(variable);
    }
    command.kill_on_drop(true);
    command
}

/// Runs the CLI through the server at `url` with the right token.
async fn through(url: &str, args: &[&str]) -> Output {
    cli()
        .args(["--server", url])
        .env("ORCHESTRATOR_TOKEN", support::TOKEN)
        .args(args)
        .output()
        .await
        .unwrap()
}

/// Runs the CLI directly on the file store in `dir` (read-only for read commands).
async fn direct(dir: &Path, args: &[&str]) -> Output {
    cli()
        .arg("--store")
        .arg(format!("file://{}", dir.display()))
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}, stderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json_out(output: &Output) -> Value {
    let out = stdout(output);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The error a failed run printed; panics if it succeeded.
fn failure(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "expected a failure, got: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `tail ARGS` through the server at `url`, once it said it is tailing; the lines it
/// writes to stderr after that.
async fn start_tail(url: &str, args: &[&str]) -> (Child, Lines<BufReader<ChildStderr>>) {
    let mut tail = cli()
        .args(["--server", url, "--token", support::TOKEN, "tail"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(tail.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(60), said.next_line())
        .await
        .expect("the tail starts within 60 s")
        .unwrap()
        .unwrap_or_default();
    assert!(
        started.starts_with(&format!("tailing `{}` through {url}", args[0])),
        "{started}"
    );
    (tail, said)
}

async fn reserve(_: Value) -> Result<Value, HandlerError> {
    Ok(json!({"reservation": "R-1"}))
}

async fn release(_: Value) -> Result<(), HandlerError> {
    Ok(())
}

async fn ship(_: Value) -> Result<Value, HandlerError> {
    Err(HandlerError::permanent("no carrier"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_runs_through_the_server_of_an_app_holding_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The application: it holds the store open for writing, and serves its orchestrator.
    let app = EventOrchestrator::builder()
        .store_url(format!("file://{}", d.display()))
        .build()
        .await
        .unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let _billing = app
        .subscribe_with(
            SubscriptionConfig::new("payment.requested").named("billing"),
            {
                let healthy = Arc::clone(&healthy);
                move |event: EventEnvelope| {
                    let (healthy, handled_tx) = (Arc::clone(&healthy), handled_tx.clone());
                    async move {
                        if !healthy.load(Ordering::SeqCst) {
                            return Err(HandlerError::permanent("ledger rejected it"));
                        }
                        handled_tx.send(event.id().to_string()).ok();
                        Ok(())
                    }
                }
            },
        )
        .await
        .unwrap();
    let placed_seen = Arc::new(AtomicUsize::new(0));
    let _orders = app
        .subscribe("order.placed", {
            let placed_seen = Arc::clone(&placed_seen);
            move |_: EventEnvelope| {
                placed_seen.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, HandlerError>(()) }
            }
        })
        .await
        .unwrap();
    app.define_saga(
        "checkout",
        vec![
            SagaStep::new("reserve", reserve).with_compensation(release),
            SagaStep::new("ship", ship),
        ],
    )
    .unwrap();
    let server = support::start(app.clone(), support::config()).await;
    let url = format!("http://{}", server.addr);
    let url = url.as_str();

    // The store is the application's: the CLI cannot publish to it directly…
    let refused = direct(d, &["publish", "order.placed", r#"{"order_id":"o-0"}"#]).await;
    assert!(
        failure(&refused).contains(&format!("held by process {}", std::process::id())),
        "{}",
        failure(&refused)
    );
    // … but through the server it can.
    let published = stdout(
        &through(
            url,
            &[
                "publish",
                "order.placed",
                r#"{"order_id":"o-1"}"#,
                "--correlation-id",
                "checkout-1",
            ],
        )
        .await,
    );
    assert!(
        published.starts_with("published order.placed ")
            && published.contains("stored by the server's orchestrator"),
        "{published}"
    );
    let first_id = published.split_whitespace().nth(2).unwrap().to_owned();
    let second = json_out(
        &through(
            url,
            &[
                "--json",
                "publish",
                "order.shipped",
                r#"{"order_id":"o-1"}"#,
                "--correlation-id",
                "checkout-1",
                "--causation-id",
                &first_id,
                "--stream",
                "order-o-1",
            ],
        )
        .await,
    );
    assert_eq!(second["type"], "order.shipped");
    let stored = app.store().read_stream("order-o-1", 1, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id().as_str(), second["id"].as_str().unwrap());
    assert_eq!(stored[0].causation_id(), Some(first_id.as_str()));
    assert_eq!(
        stored[0].data::<Value>().unwrap(),
        json!({"order_id": "o-1"})
    );

    // A tail sees what is published after it started, and not what was before.
    let (tail, _said) = start_tail(url, &["order.*", "--count", "2"]).await;
    app.publish_event("user.created", json!({"user": "ada"}))
        .await
        .unwrap();
    for n in [2, 3] {
        app.publish_event("order.placed", json!({ "order_id": format!("o-{n}") }))
            .await
            .unwrap();
    }
    let tailed = tokio::time::timeout(Duration::from_secs(60), tail.wait_with_output())
        .await
        .expect("the tail prints two events and ends within 60 s")
        .unwrap();
    let tailed = stdout(&tailed);
    let lines: Vec<&str> = tailed.lines().collect();
    assert_eq!(lines.len(), 2, "{tailed}");
    assert!(lines[0].contains(r#"order.placed"#) && lines[0].contains(r#"{"order_id":"o-2"}"#));
    assert!(lines[1].contains(r#"{"order_id":"o-3"}"#), "{tailed}");
    // From the start, as CloudEvents, one per line.
    let all = stdout(
        &through(
            url,
            &["--json", "tail", "#", "--from-start", "--count", "2"],
        )
        .await,
    );
    let events: Vec<Value> = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "order.placed");
    assert_eq!(events[0]["data"], json!({"order_id": "o-1"}));
    assert_eq!(events[0]["correlationid"], "checkout-1");
    assert_eq!(events[1]["type"], "order.shipped");
    let grouped = through(url, &["tail", "#", "--group", "g"]).await;
    assert!(
        failure(&grouped).contains("`tail --group` cannot run through --server"),
        "{}",
        failure(&grouped)
    );

    // Streams: as the CLI prints them reading the store directly.
    let list = stdout(&through(url, &["streams", "list"]).await);
    let placed_line = list
        .lines()
        .find(|l| l.starts_with("order.placed "))
        .unwrap_or_else(|| panic!("{list}"));
    let columns: Vec<&str> = placed_line.split_whitespace().collect();
    assert_eq!(columns[1..3], ["3", "3"], "events, version: {list}");
    assert!(list.contains("order-o-1"), "{list}");
    let shown = stdout(&through(url, &["streams", "show", "order.placed", "--from", "2"]).await);
    assert_eq!(shown.lines().count(), 2, "{shown}");
    assert!(shown.contains(r#"{"order_id":"o-2"}"#), "{shown}");
    let show_json = ["--json", "streams", "show", "order.placed"];
    assert_eq!(
        json_out(&through(url, &show_json).await),
        json_out(&direct(d, &show_json).await),
        "the same output through the server as from the store"
    );

    // Sagas.
    let saga = app
        .start_saga("checkout", json!({"cart": "C-1"}))
        .await
        .unwrap();
    assert_eq!(saga.status, SagaStatus::Compensated);
    let saga_id = saga.id.to_string();
    let listed = stdout(&through(url, &["sagas", "list"]).await);
    assert!(
        listed.contains(&saga_id) && listed.contains("checkout") && listed.contains("compensated"),
        "{listed}"
    );
    let unfinished = stdout(&through(url, &["sagas", "list", "--unfinished"]).await);
    assert_eq!(unfinished.trim(), "no sagas");
    let detail = stdout(&through(url, &["sagas", "show", &saga_id]).await);
    assert!(detail.contains("status      compensated"), "{detail}");
    assert!(
        detail.contains("failed at   ship after") && detail.contains("no carrier"),
        "{detail}"
    );
    assert!(detail.contains("compensated reserve"), "{detail}");
    assert!(detail.contains("saga.compensation.completed"), "{detail}");
    let saga_json = ["--json", "sagas", "show", saga_id.as_str()];
    assert_eq!(
        json_out(&through(url, &saga_json).await),
        json_out(&direct(d, &saga_json).await)
    );
    let no_saga = through(
        url,
        &["sagas", "show", "01890000-0000-7000-8000-000000000000"],
    )
    .await;
    assert!(
        failure(&no_saga).contains("not found"),
        "{}",
        failure(&no_saga)
    );

    // Traces: a request's causation tree, and a saga's log.
    let tree = stdout(&through(url, &["trace", "checkout-1"]).await);
    assert!(
        tree.starts_with("trace checkout-1: 2 event(s), 0 saga(s)"),
        "{tree}"
    );
    assert!(
        tree.contains("└─ +") && tree.contains("order.shipped"),
        "{tree}"
    );
    for id in ["checkout-1", saga_id.as_str()] {
        let args = ["--json", "trace", id];
        assert_eq!(
            json_out(&through(url, &args).await),
            json_out(&direct(d, &args).await),
            "trace {id}"
        );
    }
    let saga_trace = stdout(&through(url, &["trace", &saga_id]).await);
    assert!(saga_trace.contains("saga checkout"), "{saga_trace}");
    assert!(saga_trace.contains("saga.step.failed"), "{saga_trace}");
    let nobody = through(url, &["trace", "nobody"]).await;
    assert!(
        failure(&nobody).contains("`nobody`"),
        "{}",
        failure(&nobody)
    );

    // Replay: the application's own subscriber gets the orders again.
    let orders_handled = |count: usize| {
        let placed_seen = Arc::clone(&placed_seen);
        move || {
            let seen = placed_seen.load(Ordering::SeqCst);
            async move { seen == count }
        }
    };
    let wait = Duration::from_secs(30);
    support::wait_until("the three orders are handled", wait, orders_handled(3)).await;
    let replayed = stdout(&through(url, &["replay", "--type", "order.placed"]).await);
    assert_eq!(replayed.trim(), "replayed 3 events");
    support::wait_until("the replayed orders are handled", wait, orders_handled(6)).await;

    // The dead-letter queue: listed, shown, reprocessed into the application's handler.
    let payment = app
        .publish_event("payment.requested", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    let dead = app.dead_letters();
    support::wait_until(
        "the payment is dead-lettered",
        Duration::from_secs(30),
        || {
            let dead = dead.clone();
            async move { dead.count().await.unwrap() == 1 }
        },
    )
    .await;
    let letters = stdout(&through(url, &["dlq", "list"]).await);
    assert!(
        letters.contains("payment.requested")
            && letters.contains("subscription=billing")
            && letters.contains("ledger rejected it"),
        "{letters}"
    );
    let letters = json_out(&through(url, &["--json", "dlq", "list"]).await);
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    assert_eq!(letters[0]["event"]["id"], payment.as_str());
    assert_eq!(
        letters,
        json_out(&direct(d, &["--json", "dlq", "list"]).await)
    );
    let letter = letters[0]["id"].as_str().unwrap().to_owned();
    let shown = stdout(&through(url, &["dlq", "show", &letter]).await);
    assert!(shown.contains("subscription  billing"), "{shown}");
    assert!(
        shown.contains(r#"payload       {"order_id":"o-1"}"#),
        "{shown}"
    );
    healthy.store(true, Ordering::SeqCst);
    let reprocessed = stdout(&through(url, &["dlq", "reprocess", &letter]).await);
    assert_eq!(reprocessed.trim(), format!("reprocessed {letter}"));
    let got = tokio::time::timeout(Duration::from_secs(30), handled.recv())
        .await
        .expect("the reprocessed payment reaches the handler within 30 s")
        .unwrap();
    assert_eq!(got, payment.as_str());
    assert_eq!(
        stdout(&through(url, &["dlq", "list"]).await).trim(),
        "no dead letters"
    );
    let again = through(url, &["dlq", "reprocess", &letter]).await;
    let again = failure(&again);
    assert!(
        again.contains(&format!("dead letter `{letter}` not found")) && again.contains("NOT_FOUND"),
        "{again}"
    );
    let missing = through(url, &["dlq", "show", "no-such-letter"]).await;
    assert!(
        failure(&missing).contains("not found"),
        "{}",
        failure(&missing)
    );
    app.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_unreachable_servers_and_refusals_are_clear_errors() {
    let app = EventOrchestrator::new();
    app.publish_event("order.placed", json!({})).await.unwrap();
    let server = support::start(app.clone(), support::config().read_only(true)).await;
    let url = format!("http://{}", server.addr);

    let wrong = cli()
        .args([
            "--server",
            &url,
            "--token",
            "not-the-token",
            "streams",
            "list",
        ])
        .output()
        .await
        .unwrap();
    let wrong = failure(&wrong);
    assert!(
        wrong.contains(&format!(
            "the orchestrator server at {url} refused the token (HTTP 401)"
        )),
        "{wrong}"
    );
    assert!(
        !wrong.contains("not-the-token"),
        "the token is not echoed: {wrong}"
    );
    let none = cli()
        .args(["--server", &url, "sagas", "list"])
        .output()
        .await
        .unwrap();
    assert!(
        failure(&none).contains("needs a bearer token"),
        "{}",
        failure(&none)
    );
    let tail = cli()
        .args([
            "--server", &url, "--token", "nope", "tail", "#", "--count", "1",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        failure(&tail).contains("refused the token"),
        "{}",
        failure(&tail)
    );

    // Mutations on a read-only server.
    let publish = through(&url, &["publish", "order.placed", "{}"]).await;
    let publish = failure(&publish);
    assert!(
        publish.contains("read-only") && publish.contains("READ_ONLY"),
        "{publish}"
    );
    let replay = through(&url, &["replay"]).await;
    assert!(
        failure(&replay).contains("READ_ONLY"),
        "{}",
        failure(&replay)
    );
    assert_eq!(app.store().head_position().await.unwrap(), 1);

    // Nothing listening: a port that was free a moment ago.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}");
    let gone = through(&url, &["streams", "list"]).await;
    assert!(
        failure(&gone).contains(&format!("cannot reach the orchestrator server at {url}")),
        "{}",
        failure(&gone)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tail_that_falls_behind_goes_on_where_the_server_stopped_it() {
    let app = EventOrchestrator::new();
    // A window of one event: a batch stored at once puts a live tail over it at once.
    let server = support::start(app.clone(), support::config().subscription_window(1)).await;
    let url = format!("http://{}", server.addr);
    let (mut tail, mut said) = start_tail(&url, &["batch.*", "--count", "41"]).await;
    let mut printed = BufReader::new(tail.stdout.take().unwrap()).lines();
    let next_line = async |printed: &mut Lines<BufReader<ChildStdout>>| {
        tokio::time::timeout(Duration::from_secs(60), printed.next_line())
            .await
            .expect("the tail prints a line within 60 s")
            .unwrap()
            .expect("the tail goes on")
    };
    // One event first: once the tail printed it, its subscription is live on the server.
    let first = EventEnvelope::new("batch.item", &json!({ "n": 0 })).unwrap();
    app.store()
        .append("batch", ExpectedVersion::Any, vec![first])
        .await
        .unwrap();
    assert!(next_line(&mut printed).await.ends_with(r#"{"n":0}"#));
    let batch: Vec<EventEnvelope> = (1..=40)
        .map(|n| EventEnvelope::new("batch.item", &json!({ "n": n })).unwrap())
        .collect();
    app.store()
        .append("batch", ExpectedVersion::Any, batch)
        .await
        .unwrap();
    let mut numbers = Vec::new();
    for _ in 1..=40 {
        let line = next_line(&mut printed).await;
        numbers.push(line.rsplit(' ').next().unwrap().to_owned());
    }
    let expected: Vec<String> = (1..=40).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    assert_eq!(numbers, expected, "every event once, in order");
    let ended = tokio::time::timeout(Duration::from_secs(60), tail.wait())
        .await
        .expect("the tail ends after --count events")
        .unwrap();
    assert!(ended.success(), "{ended:?}");
    let note = tokio::time::timeout(Duration::from_secs(10), said.next_line())
        .await
        .expect("the tail said it went on")
        .unwrap()
        .unwrap_or_default();
    assert!(note.contains("fell behind the server's window"), "{note}");
}

/// `orchestrator serve` runs the server binary beside it over `--store`, handing the store
/// and the token over through its environment, and passes the server's own options on.
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread")]
async fn orchestrator_serve_runs_the_server_over_the_store() {
    // The server binary this package builds for its tests sits next to the CLI.
    let server = Path::new(env!("CARGO_BIN_EXE_orchestrator-server"));
    assert_eq!(server.parent(), orchestrator_bin().parent());
    let dir = tempfile::tempdir().unwrap();
    // Events in the store before it is served.
    let seeded = direct(dir.path(), &["publish", "order.placed", r#"{"n":1}"#]).await;
    stdout(&seeded);

    let mut child = cli()
        .arg("--store")
        .arg(format!("file://{}", dir.path().display()))
        .args(["--token", support::TOKEN])
        .args(["serve", "--listen", "127.0.0.1:0", "--read-only"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!(
        "http://{}",
        support::listening_on(child.stdout.take().unwrap()).await
    );
    // Read through the served store, with the token `serve` was given.
    let streams = through(&url, &["--json", "streams", "list"]).await;
    assert!(
        stdout(&streams).contains("order.placed"),
        "{}",
        stdout(&streams)
    );
    // --read-only reached the server.
    let refused = through(&url, &["publish", "order.placed", "{}"]).await;
    assert!(
        failure(&refused).contains("READ_ONLY"),
        "{}",
        failure(&refused)
    );
    // Without the token the server refuses.
    let anonymous = cli()
        .args(["--server", &url, "streams", "list"])
        .output()
        .await
        .unwrap();
    assert!(
        failure(&anonymous).contains("401"),
        "{}",
        failure(&anonymous)
    );
    child.kill().await.unwrap();
}

/// `serve` without a store says what to pass.
#[tokio::test]
async fn orchestrator_serve_needs_a_store() {
    let output = cli().args(["serve"]).output().await.unwrap();
    assert!(failure(&output).contains("--store"), "{}", failure(&output));
}
