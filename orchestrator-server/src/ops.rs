//! `/healthz`, `/readyz` and `/metrics`.

use std::fmt::Write as _;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use orchestrator::RelayState;
use serde_json::json;

use crate::graphql::relay_state_name;
use crate::http::AppState;

/// How long a readiness probe waits for the store.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: the process serves requests.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the store answers, and the outbox relay is relaying, standing by for another
/// process's relay, or idle (not started yet) — not retrying a failing transport, not
/// stopped. 200 when ready, 503 otherwise; the body says which check failed, never why
/// (errors may name hosts: they go to the log).
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let store = match tokio::time::timeout(
        STORE_PROBE_TIMEOUT,
        state.orchestrator.store().head_position(),
    )
    .await
    {
        Ok(Ok(_)) => "ok",
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: the event store failed");
            "failing"
        }
        Err(_) => {
            tracing::warn!(timeout = ?STORE_PROBE_TIMEOUT, "readiness: the event store did not answer");
            "timeout"
        }
    };
    let relay = state.orchestrator.relay_status().state;
    let relay_ok = match &relay {
        RelayState::Idle | RelayState::Standby | RelayState::Relaying => true,
        RelayState::Retrying(reason) => {
            tracing::warn!(%reason, "readiness: the outbox relay is retrying (transport failing?)");
            false
        }
        _ => false,
    };
    let ready = store == "ok" && relay_ok;
    // The transport has no probe of its own: the relay publishing to it (or standing by)
    // is the sign it is reachable, and a failing transport puts the relay in `retrying`.
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "store": store,
            "relay": relay_state_name(&relay),
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus text: the gauges read from the orchestrator (store head, relay, dead
/// letters), then what the configured Prometheus recorder collected.
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = String::new();
    let store = state.orchestrator.store();
    let labels = format!(
        "store=\"{}\",transport=\"{}\"",
        store.name(),
        state.orchestrator.transport().name()
    );
    let mut gauge = |name: &str, kind: &str, help: &str, value: u64| {
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}\n"
        );
    };
    gauge("orchestrator_server_up", "gauge", "The server is up.", 1);
    let head = match store.head_position().await {
        Ok(head) => {
            gauge(
                "orchestrator_store_head_position",
                "gauge",
                "Global position of the last stored event.",
                head,
            );
            Some(head)
        }
        Err(error) => {
            tracing::warn!(%error, "metrics: the event store failed");
            None
        }
    };
    let relay = state.orchestrator.relay_status();
    gauge(
        "orchestrator_relay_relayed_position",
        "gauge",
        "Every event up to this position has been published by this process's outbox relay.",
        relay.relayed_position,
    );
    gauge(
        "orchestrator_relay_checkpoint",
        "gauge",
        "The outbox relay's last checkpoint.",
        relay.checkpoint,
    );
    if let Some(head) = head {
        gauge(
            "orchestrator_relay_lag_events",
            "gauge",
            "Events stored but not yet published by this process's outbox relay.",
            head.saturating_sub(relay.relayed_position),
        );
    }
    gauge(
        "orchestrator_relay_dead_lettered_total",
        "counter",
        "Events the outbox relay dead-lettered because the transport refused them.",
        relay.dead_lettered,
    );
    gauge(
        "orchestrator_relay_relaying",
        "gauge",
        "1 while this process's outbox relay holds the lease and publishes.",
        u64::from(relay.state == RelayState::Relaying),
    );
    match state.orchestrator.dead_letters().count().await {
        Ok(count) => gauge(
            "orchestrator_dead_letters",
            "gauge",
            "Dead letters waiting in the queue.",
            count as u64,
        ),
        Err(error) => tracing::warn!(%error, "metrics: the dead-letter queue failed"),
    }
    if let Some(prometheus) = &state.prometheus {
        text.push_str(&prometheus.render());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
