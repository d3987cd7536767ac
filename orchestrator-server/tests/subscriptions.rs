//! Live events over WebSocket (graphql-transport-ws): catch-up from a position then live
//! with no gap, a slow subscriber told and cut off, a dropped connection that harms nothing,
//! the token, saga updates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Socket, receive, send};

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt as _;
use hyper::{Method, StatusCode};
use orchestrator::prelude::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const EVENTS: &str = r"subscription($types: [String!], $from: Int) {
  events(types: $types, fromPosition: $from) { type globalPosition data }
}";

/// A graphql-transport-ws connection, acknowledged.
async fn connect(addr: SocketAddr) -> Socket {
    let mut request = format!("ws://{addr}/graphql/ws")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    headers.insert(
        "authorization",
        format!("Bearer {}", support::TOKEN).parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    send(&mut socket, json!({"type": "connection_init"})).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    socket
}

async fn subscribe(socket: &mut Socket, variables: Value) {
    send(
        socket,
        json!({"id": "1", "type": "subscribe", "payload": {"query": EVENTS, "variables": variables}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_catches_up_then_goes_live_without_a_gap() {
    let orchestrator = EventOrchestrator::new();
    let server = support::start(orchestrator.clone(), support::config()).await;
    for n in 0..50 {
        orchestrator
            .publish_event("live.tick", json!({ "n": n }))
            .await
            .unwrap();
        orchestrator
            .publish_event("noise.tick", json!({ "n": n }))
            .await
            .unwrap();
    }
    let mut socket = connect(server.addr).await;
    subscribe(&mut socket, json!({"types": ["live.*"], "from": 1})).await;
    // The rest is published while the subscription catches up and after.
    let publisher = tokio::spawn({
        let orchestrator = orchestrator.clone();
        async move {
            for n in 50..200 {
                orchestrator
                    .publish_event("live.tick", json!({ "n": n }))
                    .await
                    .unwrap();
            }
        }
    });
    let mut last_position = 0;
    for n in 0..200 {
        let message = receive(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        let event = &message["payload"]["data"]["events"];
        assert_eq!(event["type"], "live.tick");
        assert_eq!(event["data"]["n"], n, "in order, none missing: {message}");
        let position = event["globalPosition"].as_u64().unwrap();
        assert!(position > last_position);
        last_position = position;
    }
    publisher.await.unwrap();

    // Dropped mid-stream: the server goes on serving.
    drop(socket);
    orchestrator
        .publish_event("live.tick", json!({ "n": 200 }))
        .await
        .unwrap();
    let (status, _) = support::request(server.addr, Method::GET, "/healthz", None, "").await;
    assert_eq!(status, StatusCode::OK);
    let mut again = connect(server.addr).await;
    subscribe(
        &mut again,
        json!({"types": ["live.*"], "from": last_position + 1}),
    )
    .await;
    let message = receive(&mut again).await;
    assert_eq!(
        message["payload"]["data"]["events"]["data"]["n"], 200,
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscriber_that_falls_behind_the_window_is_told_and_cut_off() {
    let orchestrator = EventOrchestrator::new();
    let server = support::start(
        orchestrator.clone(),
        support::config().subscription_window(10),
    )
    .await;
    let mut socket = connect(server.addr).await;
    // From the start of the (empty) store, so that the first event is not missed whether
    // it is stored before or after the server opens the subscription.
    subscribe(&mut socket, json!({"from": 1})).await;
    orchestrator
        .publish_event("burst.first", json!({}))
        .await
        .unwrap();
    let first = receive(&mut socket).await;
    assert_eq!(
        first["payload"]["data"]["events"]["type"], "burst.first",
        "{first}"
    );

    // A hundred events at once: far more than the window of 10 ahead of the subscriber.
    let burst: Vec<EventEnvelope> = (0..100)
        .map(|n| EventEnvelope::new("burst.event", &json!({ "n": n })).unwrap())
        .collect();
    orchestrator
        .store()
        .append("burst", ExpectedVersion::Any, burst)
        .await
        .unwrap();
    let mut delivered = 0;
    let error = loop {
        let message = receive(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        if let Some(errors) = message["payload"]["errors"].as_array() {
            break errors[0].clone();
        }
        delivered += 1;
    };
    assert!(delivered < 100, "cut off before the end of the burst");
    assert_eq!(error["extensions"]["code"], "SLOW_CONSUMER", "{error}");
    let resume_from = error["extensions"]["resumeFrom"].as_u64().unwrap();
    assert_eq!(resume_from, 2 + delivered, "resumes where delivery stopped");
    assert!(
        error["message"].as_str().unwrap().contains("window of 10"),
        "{error}"
    );
    assert_eq!(receive(&mut socket).await["type"], "complete");

    // Resuming from the position it was given misses nothing.
    subscribe(&mut socket, json!({"from": resume_from})).await;
    let message = receive(&mut socket).await;
    assert_eq!(
        message["payload"]["data"]["events"]["data"]["n"], delivered,
        "{message}"
    );
}

/// Opens `/graphql/ws` with `header` as the upgrade's bearer token (if any) and `payload` as
/// the `connection_init` payload: the first message back, or the close frame's reason.
async fn handshake(
    addr: SocketAddr,
    header: Option<&str>,
    payload: Value,
) -> Result<Value, String> {
    let mut request = format!("ws://{addr}/graphql/ws")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    if let Some(token) = header {
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    send(
        &mut socket,
        json!({"type": "connection_init", "payload": payload}),
    )
    .await;
    let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
        .await
        .expect("an answer within 30 s")
        .expect("a frame")
        .unwrap();
    match frame {
        Message::Text(text) => Ok(serde_json::from_str(text.as_str()).unwrap()),
        Message::Close(Some(close)) => Err(close.reason.to_string()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn websockets_need_the_token_in_the_upgrade_or_in_connection_init() {
    let server = support::start(EventOrchestrator::new(), support::config()).await;
    let addr = server.addr;
    let ack = json!({"type": "connection_ack"});
    assert_eq!(
        handshake(addr, Some(support::TOKEN), json!({})).await,
        Ok(ack.clone())
    );
    let in_payload = json!({"authorization": format!("Bearer {}", support::TOKEN)});
    assert_eq!(handshake(addr, None, in_payload).await, Ok(ack));
    for (header, payload) in [
        (None, json!({})),
        (Some("wrong"), json!({})),
        (None, json!({"authorization": "Bearer wrong"})),
        (None, json!({"authorization": support::TOKEN})),
    ] {
        let refused = handshake(addr, header, payload.clone()).await;
        let reason = refused.expect_err(&format!("{header:?} {payload}"));
        assert!(reason.contains("bearer token"), "{reason}");
    }
    let (status, _) = support::request(addr, hyper::Method::GET, "/healthz", None, "").await;
    assert_eq!(status, StatusCode::OK);
}

async fn hold(_context: Value) -> Result<Value, HandlerError> {
    Ok(json!({"held": true}))
}

async fn unhold(_context: Value) -> Result<(), HandlerError> {
    Ok(())
}

async fn decline(_context: Value) -> Result<Value, HandlerError> {
    Err(HandlerError::permanent("declined"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_updates_follow_a_saga_to_its_end() {
    let orchestrator = EventOrchestrator::new();
    orchestrator
        .define_saga(
            "booking",
            vec![
                SagaStep::new("hold", hold).with_compensation(unhold),
                SagaStep::new("pay", decline),
            ],
        )
        .unwrap();
    let server = support::start(orchestrator.clone(), support::config()).await;
    let mut socket = connect(server.addr).await;
    send(
        &mut socket,
        json!({"id": "s", "type": "subscribe", "payload": {"query":
            "subscription { sagaUpdates(fromPosition: 1) { sagaId type saga step status } }"}}),
    )
    .await;
    orchestrator
        .publish_event("not.a.saga", json!({}))
        .await
        .unwrap();
    let outcome = orchestrator.start_saga("booking", json!({})).await.unwrap();
    let mut updates = Vec::new();
    loop {
        let message = receive(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        let update = message["payload"]["data"]["sagaUpdates"].clone();
        assert_eq!(update["sagaId"], outcome.id.to_string(), "{message}");
        let done = update["type"] == "saga.finished";
        updates.push(update);
        if done {
            break;
        }
    }
    assert_eq!(updates[0]["type"], "saga.started");
    assert_eq!(updates[0]["saga"], "booking");
    assert!(updates.iter().any(|u| u["step"] == "pay"), "{updates:?}");
    assert_eq!(updates.last().unwrap()["status"], "COMPENSATED");

    // One saga by id, and an id that is not one.
    send(
        &mut socket,
        json!({"id": "bad", "type": "subscribe", "payload": {"query":
            "subscription { sagaUpdates(sagaId: \"nope\") { type } }"}}),
    )
    .await;
    let refused = receive(&mut socket).await;
    assert_eq!(refused["id"], "bad", "{refused}");
    assert_eq!(
        refused["payload"]["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_arrivals_are_pushed_as_they_are_parked() {
    let orchestrator = EventOrchestrator::new();
    let _billing = orchestrator
        .subscribe_with(
            SubscriptionConfig::new("pay.failed").named("billing"),
            |_event: EventEnvelope| async {
                Err::<(), _>(HandlerError::permanent("the bank is down"))
            },
        )
        .await
        .unwrap();
    // Parked before: not an arrival.
    orchestrator
        .publish_event("pay.failed", json!({"n": 0}))
        .await
        .unwrap();
    support::wait_until(
        "the first letter is parked",
        Duration::from_secs(30),
        || {
            let orchestrator = orchestrator.clone();
            async move { orchestrator.dead_letters().count().await.unwrap() == 1 }
        },
    )
    .await;
    // Given as `since`, so that the next letter counts as an arrival however the
    // subscription's first look at the queue and its parking are ordered.
    let since = chrono::Utc::now();
    let server = support::start(orchestrator.clone(), support::config()).await;
    let mut socket = connect(server.addr).await;
    send(
        &mut socket,
        json!({"id": "d", "type": "subscribe", "payload": {
            "query": "subscription($since: DateTime) { deadLetterArrivals(since: $since, pollMs: 50) { reason subscription event { data } } }",
            "variables": {"since": since.to_rfc3339()},
        }}),
    )
    .await;
    for n in 1..=2 {
        orchestrator
            .publish_event("pay.failed", json!({ "n": n }))
            .await
            .unwrap();
        let message = receive(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        let letter = &message["payload"]["data"]["deadLetterArrivals"];
        assert_eq!(letter["event"]["data"]["n"], n, "{message}");
        assert_eq!(letter["subscription"], "billing");
        assert!(
            letter["reason"].as_str().unwrap().contains("bank is down"),
            "{message}"
        );
    }
}
