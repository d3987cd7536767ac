//! The `orchestrator-server` binary: refuses an open address without a token, and serves
//! with one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;

use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::process::Command;

fn server() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orchestrator-server"));
    command
        .env_remove("ORCHESTRATOR_SERVER_TOKEN")
        .env_remove("ORCHESTRATOR_STORE")
        .env_remove("ORCHESTRATOR_TRANSPORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn an_open_address_without_a_token_is_refused() {
    let output = server()
        .args(["--store", "memory:", "--listen", "0.0.0.0:0"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs a bearer token"), "{stderr}");
}

#[tokio::test]
async fn it_serves_with_a_token() {
    let mut child = server()
        .args([
            "--store",
            "memory:",
            "--listen",
            "127.0.0.1:0",
            "--read-only",
        ])
        .args(["--max-page-size", "7", "--max-scan", "100"])
        .env("ORCHESTRATOR_SERVER_TOKEN", support::TOKEN)
        .spawn()
        .unwrap();
    let addr = support::listening_on(child.stdout.take().unwrap()).await;
    let (status, body) = support::request(addr, Method::GET, "/healthz", None, "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    let data = support::query(addr, "{ system { store readOnly maxPageSize } }", json!({})).await;
    assert_eq!(data["system"]["readOnly"], true);
    assert_eq!(data["system"]["maxPageSize"], 7);
    let (status, _) = support::request(addr, Method::POST, "/graphql", None, "{}").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    child.kill().await.unwrap();
}
