//! The `orchestrator` CLI against an embedded durable store in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use orchestrator::prelude::*;
use serde_json::{Value, json};

/// Runs the CLI on the store in `dir`.
fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--store")
        .arg(format!("file://{}", dir.display()))
        .args(args)
        .env_remove("ORCHESTRATOR_STORE")
        .env_remove("ORCHESTRATOR_TRANSPORT")
        .output()
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
    serde_json::from_str(&stdout(output)).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn publish_then_list_and_show_streams() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let published = stdout(&cli(
        d,
        &["publish", "order.placed", r#"{"order_id":"o-1"}"#],
    ));
    assert!(
        published.starts_with("published order.placed "),
        "{published}"
    );
    let id = json_out(&cli(
        d,
        &["--json", "publish", "order.placed", r#"{"order_id":"o-2"}"#],
    ))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    stdout(&cli(
        d,
        &["publish", "user.created", "{}", "--stream", "user-7"],
    ));

    let list = stdout(&cli(d, &["streams", "list"]));
    assert!(
        list.contains("order.placed") && list.contains("user-7"),
        "{list}"
    );
    let streams = json_out(&cli(d, &["--json", "streams", "list"]));
    let orders = streams
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "order.placed")
        .unwrap();
    assert_eq!(orders["events"], 2);
    assert_eq!(orders["version"], 2);

    let shown = stdout(&cli(d, &["streams", "show", "order.placed"]));
    assert_eq!(shown.lines().count(), 2, "{shown}");
    assert!(shown.contains(r#"{"order_id":"o-1"}"#), "{shown}");
    let events = json_out(&cli(
        d,
        &["--json", "streams", "show", "order.placed", "--from", "2"],
    ));
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], id.as_str());
    assert_eq!(
        events[0]["specversion"], "1.0",
        "events print as CloudEvents"
    );
    assert_eq!(events[0]["data"]["order_id"], "o-2");

    let tailed = stdout(&cli(
        d,
        &["tail", "order.*", "--from-start", "--count", "2"],
    ));
    assert_eq!(tailed.lines().count(), 2, "{tailed}");
}

#[test]
fn an_empty_dead_letter_queue() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        stdout(&cli(dir.path(), &["dlq", "list"])).trim(),
        "no dead letters"
    );
    assert_eq!(
        json_out(&cli(dir.path(), &["--json", "dlq", "list"])),
        json!([])
    );
    let missing = cli(dir.path(), &["dlq", "show", "nope"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn bad_input_is_a_clear_error_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let invalid = cli(d, &["publish", "order.placed", "{not json"]);
    assert!(!invalid.status.success());
    assert!(
        stderr(&invalid).contains("not valid JSON"),
        "{}",
        stderr(&invalid)
    );

    let unknown = cli(d, &["frobnicate"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("frobnicate"),
        "{}",
        stderr(&unknown)
    );

    let bad_type = cli(d, &["publish", "", "{}"]);
    assert!(!bad_type.status.success());
    assert!(
        stderr(&bad_type).contains("event type"),
        "{}",
        stderr(&bad_type)
    );

    let bad_time = cli(d, &["replay", "--from", "last tuesday"]);
    assert!(!bad_time.status.success());
    assert!(
        stderr(&bad_time).contains("not a time"),
        "{}",
        stderr(&bad_time)
    );

    let bad_url = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["--store", "ftp://example.com", "streams", "list"])
        .output()
        .unwrap();
    assert!(!bad_url.status.success());
    assert!(
        stderr(&bad_url).contains("file://DIR"),
        "{}",
        stderr(&bad_url)
    );

    if !cfg!(feature = "redis") {
        let disabled = cli(d, &["--transport", "redis://127.0.0.1:6379", "dlq", "list"]);
        assert!(!disabled.status.success());
        assert!(
            stderr(&disabled).contains("`redis` feature"),
            "{}",
            stderr(&disabled)
        );
    }

    let no_store = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["streams", "list"])
        .env_remove("ORCHESTRATOR_STORE")
        .output()
        .unwrap();
    assert!(!no_store.status.success());
    assert!(
        stderr(&no_store).contains("--store"),
        "{}",
        stderr(&no_store)
    );
}

#[test]
fn replay_counts_what_it_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in 0..3 {
        stdout(&cli(
            d,
            &["publish", "order.completed", &format!(r#"{{"n":{n}}}"#)],
        ));
    }
    stdout(&cli(d, &["publish", "user.created", "{}"]));
    let replayed = json_out(&cli(
        d,
        &[
            "--json",
            "replay",
            "--type",
            "order.completed",
            "--from",
            "1h",
        ],
    ));
    assert_eq!(replayed["replayed"], 3);
    let none = json_out(&cli(
        d,
        &[
            "--json",
            "replay",
            "--type",
            "order.completed",
            "--to",
            "1h",
        ],
    ));
    assert_eq!(none["replayed"], 0);
    assert_eq!(stdout(&cli(d, &["replay"])).trim(), "replayed 4 events");
}

/// Writes a request's events and a saga into the store in `dir`, as an application would.
async fn record_a_request(dir: &Path) -> (String, String) {
    let orchestrator = EventOrchestrator::builder()
        .store_url(format!("file://{}", dir.display()))
        .build()
        .await
        .unwrap();
    orchestrator
        .define_saga(
            "order_processing",
            vec![
                SagaStep::new("payment", |_: Value| async {
                    Ok::<_, HandlerError>(json!({"transaction_id": "TXN123"}))
                })
                .with_compensation(|_: Value| async { Ok::<_, HandlerError>(()) }),
                SagaStep::new("shipping", |_: Value| async {
                    Err::<Value, _>(HandlerError::permanent("no carrier"))
                }),
            ],
        )
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = orchestrator.clone();
    orchestrator
        .subscribe("order.placed", move |_event: EventEnvelope| {
            let (publisher, tx) = (publisher.clone(), tx.clone());
            async move {
                publisher.publish_event("order.paid", json!({})).await?;
                tx.send(()).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    let placed = EventEnvelope::new("order.placed", &json!({"order_id": "o-1"}))
        .unwrap()
        .with_correlation_id("checkout-42");
    orchestrator.publish(placed).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    let saga = orchestrator
        .start_saga("order_processing", json!({"order_id": "o-1"}))
        .await
        .unwrap();
    assert_eq!(saga.status, SagaStatus::Compensated);
    orchestrator.shutdown(Duration::from_secs(1)).await;
    ("checkout-42".to_owned(), saga.id.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn sagas_and_traces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (correlation, saga_id) = record_a_request(d).await;

    let listed = stdout(&cli(d, &["sagas", "list"]));
    assert!(
        listed.contains(&saga_id) && listed.contains("compensated"),
        "{listed}"
    );
    let shown = stdout(&cli(d, &["sagas", "show", &saga_id]));
    assert!(shown.contains("status      compensated"), "{shown}");
    assert!(shown.contains("failed at   shipping"), "{shown}");
    assert!(shown.contains("saga.compensation.completed"), "{shown}");
    let shown = json_out(&cli(d, &["--json", "sagas", "show", &saga_id]));
    assert_eq!(shown["compensated_steps"], json!(["payment"]));
    assert_eq!(shown["log"].as_array().unwrap().len(), 5);

    let traced = json_out(&cli(d, &["--json", "trace", &correlation]));
    let roots = traced["events"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{traced}");
    assert_eq!(roots[0]["event"]["type"], "order.placed");
    assert_eq!(roots[0]["caused"][0]["event"]["type"], "order.paid");
    let tree = stdout(&cli(d, &["trace", &correlation]));
    assert!(tree.contains("└─ +"), "{tree}");

    let saga_trace = stdout(&cli(d, &["trace", &saga_id]));
    assert!(saga_trace.contains("saga order_processing"), "{saga_trace}");
    assert!(saga_trace.contains("saga.step.failed"), "{saga_trace}");

    let nothing = cli(d, &["trace", "nobody"]);
    assert!(!nothing.status.success());
    assert!(stderr(&nothing).contains("nobody"), "{}", stderr(&nothing));
}

/// An application on the store in `dir` whose `billing` handler fails every
/// `payment.requested`; returns it (still running) once `orders` are dead-lettered.
async fn park_dead_letters(dir: &Path, orders: &[&str]) -> EventOrchestrator {
    let orchestrator = EventOrchestrator::builder()
        .store_url(format!("file://{}", dir.display()))
        .build()
        .await
        .unwrap();
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("payment.requested").named("billing"),
            |_event: EventEnvelope| async {
                Err::<(), _>(HandlerError::permanent("ledger rejected it"))
            },
        )
        .await
        .unwrap();
    for order in orders {
        orchestrator
            .publish_event("payment.requested", json!({ "order_id": order }))
            .await
            .unwrap();
    }
    let dead = orchestrator.dead_letters();
    tokio::time::timeout(Duration::from_secs(10), async {
        while dead.count().await.unwrap() < orders.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    orchestrator
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_dead_letters_are_listed_shown_and_discarded_beside_a_running_app() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = park_dead_letters(d, &["o-1", "o-2"]).await;

    // Listed and shown from DIR/dead-letters while the application runs.
    let listed = json_out(&cli(d, &["--json", "dlq", "list"]));
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["subscription"], "billing");
    assert_eq!(
        listed[0]["event"]["data"]["order_id"], "o-1",
        "oldest first"
    );
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    let text = stdout(&cli(d, &["dlq", "list", "--subscription", "billing"]));
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("reason=ledger rejected it"), "{text}");
    let shown = stdout(&cli(d, &["dlq", "show", &id]));
    assert!(
        shown.contains("reason        ledger rejected it"),
        "{shown}"
    );
    assert!(shown.contains(r#""order_id":"o-1""#), "{shown}");

    // Reprocessing is refused with what to do instead, and the letter is kept.
    let refused = cli(d, &["dlq", "reprocess", &id]);
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(message.contains("cannot reprocess"), "{message}");
    assert!(message.contains("dead_letters().reprocess"), "{message}");
    assert!(message.contains("dlq discard"), "{message}");
    assert_eq!(app.dead_letters().count().await.unwrap(), 2);
    let missing = cli(d, &["dlq", "reprocess", "nope"]);
    assert!(
        stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );

    // Discarded for good: the running application sees it gone, and so does a restart.
    assert_eq!(
        stdout(&cli(d, &["dlq", "discard", &id])).trim(),
        format!("discarded {id}")
    );
    assert_eq!(app.dead_letters().count().await.unwrap(), 1);
    let again = cli(d, &["dlq", "discard", &id]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not found"), "{}", stderr(&again));
    app.shutdown(Duration::from_secs(5)).await;
    drop(app);
    let app = EventOrchestrator::builder()
        .store_url(format!("file://{}", d.display()))
        .build()
        .await
        .unwrap_or_else(|e| panic!("reopening the store after shutdown and drop: {e}"));
    let left = app
        .dead_letters()
        .list(&DeadLetterQuery::default())
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].id, id);
    assert_eq!(
        json_out(&cli(d, &["--json", "dlq", "list"]))[0]["id"],
        left[0].id.as_str()
    );
}

/// Reads `reader`'s lines into a channel, so a test can wait for one with a deadline.
fn lines(reader: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(reader)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread")]
async fn read_commands_work_beside_a_running_writer_and_publish_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // This test process is the running application: it holds the store open for writing.
    let store = FileEventStore::open(d).unwrap();
    let placed = EventEnvelope::new("order.placed", &json!({ "order_id": "o-1" })).unwrap();
    store
        .append("order-o-1", ExpectedVersion::NoStream, vec![placed])
        .await
        .unwrap();

    let list = stdout(&cli(d, &["streams", "list"]));
    assert!(list.contains("order-o-1"), "{list}");
    let shown = stdout(&cli(d, &["streams", "show", "order-o-1"]));
    assert!(shown.contains("order.placed"), "{shown}");
    let tailed = stdout(&cli(d, &["tail", "#", "--from-start", "--count", "1"]));
    assert!(tailed.contains("order.placed"), "{tailed}");
    stdout(&cli(d, &["sagas", "list"]));

    let refused = cli(d, &["publish", "order.placed", r#"{"order_id":"o-2"}"#]);
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains(&format!("held by process {}", std::process::id())),
        "{message}"
    );
    assert!(message.contains(&d.display().to_string()), "{message}");
    assert!(
        message.contains("publish through that application"),
        "{message}"
    );
    assert_eq!(store.head_position().await.unwrap(), 1);

    // A tail follows what the application appends.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--store")
        .arg(format!("file://{}", d.display()))
        .args(["tail", "order.*", "--count", "2"])
        .env_remove("ORCHESTRATOR_STORE")
        .env_remove("ORCHESTRATOR_TRANSPORT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let printed = lines(tail.stdout.take().unwrap());
    let said = lines(tail.stderr.take().unwrap());
    // It starts after the head it saw when it said so.
    let started = said.recv_timeout(Duration::from_secs(60));
    assert!(
        started.as_deref().is_ok_and(|l| l.starts_with("tailing")),
        "{started:?}"
    );
    for n in 2..=3 {
        let shipped = EventEnvelope::new("order.shipped", &json!({ "n": n })).unwrap();
        store
            .append("order-o-1", ExpectedVersion::Any, vec![shipped])
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match printed.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = tail.kill();
                panic!("the tail printed {seen:?}, then {e}");
            }
        }
    }
    assert!(seen.iter().all(|l| l.contains("order.shipped")), "{seen:?}");
    assert!(tail.wait().unwrap().success());

    // Once the application is gone, publishing works.
    drop(store);
    stdout(&cli(
        d,
        &["publish", "order.placed", r#"{"order_id":"o-2"}"#],
    ));
}
