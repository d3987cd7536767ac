//! The API against a live server on the embedded stores (in memory, and the durable file
//! store), and what it does with bad input: each gets a clear error, and the server keeps
//! serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use hyper::{Method, StatusCode};
use orchestrator::prelude::*;
use orchestrator_server::{Server, ServerConfig};
use serde_json::json;
use support::{TOKEN, config, error_code, graphql, query, request, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_tells_the_story_of_an_in_memory_orchestrator() {
    support::api_story(EventOrchestrator::new(), "mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_tells_the_story_of_an_embedded_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let orchestrator = EventOrchestrator::builder()
        .file_store(FileEventStore::open(dir.path()).unwrap())
        .build()
        .await
        .unwrap();
    support::api_story(orchestrator.clone(), "file").await;
    orchestrator
        .shutdown(std::time::Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let orchestrator = EventOrchestrator::new();
    orchestrator
        .publish_event("probe.sent", json!({"n": 1}))
        .await
        .unwrap();
    let server = start(orchestrator, config().max_page_size(100)).await;
    let addr = server.addr;

    // Not JSON at all.
    let (status, body) = request(addr, Method::POST, "/graphql", Some(TOKEN), "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error_code(&body), "BAD_REQUEST");

    // JSON, but not GraphQL.
    let (status, response) = graphql(addr, "{ events { events { id } ", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let message = response["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("expected"), "a parser error: {response}");

    // A field that does not exist.
    let (_, response) = graphql(addr, "{ nope }", json!({})).await;
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nope"),
        "{response}"
    );

    // Too deep: introspection nests `ofType` as deep as one likes.
    let deep = format!(
        "{{ __schema {{ types {{ fields {{ type {{ {} name {} }} }} }} }} }}",
        "ofType { ".repeat(20),
        "} ".repeat(20)
    );
    let (status, response) = graphql(addr, &deep, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let message = response["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("too deep"), "{response}");
    assert!(
        response["data"].is_null(),
        "refused before it ran: {response}"
    );

    // Too complex: a thousand aliases of one field.
    let wide = format!(
        "{{ {} }}",
        (0..1100)
            .map(|i| format!("a{i}: system {{ headPosition }}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (_, response) = graphql(addr, &wide, json!({})).await;
    let message = response["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("too complex"), "{response}");

    // A page over the cap, a zero page, a cursor that is not one, a pattern that is not one.
    let (_, response) = graphql(addr, "{ events(first: 101) { events { id } } }", json!({})).await;
    assert_eq!(error_code(&response), "PAGE_TOO_LARGE", "{response}");
    assert_eq!(response["errors"][0]["extensions"]["maxPageSize"], 100);
    let (_, response) = graphql(addr, "{ events(first: 0) { events { id } } }", json!({})).await;
    assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
    let (_, response) = graphql(
        addr,
        r#"{ events(after: "page-two") { events { id } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
    let (_, response) = graphql(
        addr,
        r#"{ events(filter: {types: ["order..#"]}) { events { id } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");
    let (_, response) = graphql(addr, r#"{ saga(id: "not-a-saga") { id } }"#, json!({})).await;
    assert_eq!(error_code(&response), "BAD_USER_INPUT", "{response}");

    // No token, a wrong token, a token of the right length but wrong.
    let ok_body = json!({"query": "{ system { headPosition } }"}).to_string();
    for token in [None, Some("wrong"), Some("test-token-3f9b")] {
        let (status, body) = request(addr, Method::POST, "/graphql", token, &ok_body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error_code(&body), "UNAUTHENTICATED");
        assert!(
            !body.to_string().contains(TOKEN),
            "the token is never echoed"
        );
    }

    // Still serving.
    let data = query(
        addr,
        "{ system { headPosition maxPageSize readOnly } }",
        json!({}),
    )
    .await;
    assert_eq!(data["system"]["headPosition"], 1);
    assert_eq!(data["system"]["maxPageSize"], 100);
    let (status, _) = request(addr, Method::GET, "/healthz", None, "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_read_only_server_refuses_mutations_and_answers_queries() {
    let server = start(EventOrchestrator::new(), config().read_only(true)).await;
    let (status, response) = graphql(
        server.addr,
        r#"mutation { discardDeadLetter(id: "any") { id } }"#,
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(error_code(&response), "READ_ONLY", "{response}");
    for mutation in [
        r#"mutation { publishEvent(type: "order.placed", data: {}) { id } }"#,
        "mutation { replayEvents }",
    ] {
        let (_, response) = graphql(server.addr, mutation, json!({})).await;
        assert_eq!(error_code(&response), "READ_ONLY", "{mutation}: {response}");
    }
    let data = query(
        server.addr,
        "{ system { readOnly headPosition } deadLetters { id } }",
        json!({}),
    )
    .await;
    assert_eq!(data["system"]["readOnly"], true);
    assert_eq!(data["system"]["headPosition"], 0, "nothing was published");
    assert_eq!(data["deadLetters"], json!([]));
}

#[tokio::test]
async fn publish_and_replay_mutations_store_deliver_and_check_their_input() {
    let orchestrator = EventOrchestrator::new();
    let (delivered_tx, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    let _subscription = orchestrator
        .subscribe("order.placed", move |event: EventEnvelope| {
            let delivered_tx = delivered_tx.clone();
            async move {
                delivered_tx.send(event.data::<serde_json::Value>()?).ok();
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap();
    let server = start(orchestrator.clone(), config()).await;
    let published = query(
        server.addr,
        "mutation($data: JSON!) { publishEvent(type: \"order.placed\", data: $data, \
         stream: \"order-7\", correlationId: \"req-7\") { id type stream } }",
        json!({"data": {"order_id": 7}}),
    )
    .await;
    let published = &published["publishEvent"];
    assert_eq!(published["type"], "order.placed");
    assert_eq!(published["stream"], "order-7");
    let stored = orchestrator
        .store()
        .read_stream("order-7", 1, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id().as_str(), published["id"].as_str().unwrap());
    assert_eq!(stored[0].correlation_id(), Some("req-7"));
    let wait = std::time::Duration::from_secs(30);
    let first = tokio::time::timeout(wait, delivered.recv()).await.unwrap();
    assert_eq!(first, Some(json!({"order_id": 7})), "the relay delivers it");

    let replayed = query(
        server.addr,
        r#"mutation { replayEvents(types: ["order.placed"]) }"#,
        json!({}),
    )
    .await;
    assert_eq!(replayed["replayEvents"], 1);
    let again = tokio::time::timeout(wait, delivered.recv()).await.unwrap();
    assert_eq!(again, Some(json!({"order_id": 7})), "delivered again");

    for (bad, says) in [
        (
            r#"mutation { publishEvent(type: "not a type!", data: {}) { id } }"#,
            "event type",
        ),
        (
            r#"mutation { replayEvents(types: ["order.*"]) }"#,
            "not patterns",
        ),
    ] {
        let (status, response) = graphql(server.addr, bad, json!({})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(error_code(&response), "BAD_USER_INPUT", "{bad}: {response}");
        let message = response["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(says), "{bad}: {message}");
    }
    assert_eq!(orchestrator.store().head_position().await.unwrap(), 1);
}

#[tokio::test]
async fn an_open_address_without_a_token_is_refused_before_listening() {
    let open = ServerConfig::new("0.0.0.0:0".parse().unwrap());
    match Server::bind(EventOrchestrator::new(), open).await {
        Err(orchestrator_server::Error::TokenRequired { listen }) => {
            assert!(listen.ip().is_unspecified());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn cors_headers_only_for_configured_origins() {
    let plain = start(EventOrchestrator::new(), config()).await;
    let allowed = start(
        EventOrchestrator::new(),
        config().allow_origin("https://ops.example.com"),
    )
    .await;
    for (addr, expect) in [
        (plain.addr, None),
        (allowed.addr, Some("https://ops.example.com")),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(connection);
        let preflight = hyper::Request::builder()
            .method(Method::OPTIONS)
            .uri("/graphql")
            .header("host", addr.to_string())
            .header("origin", "https://ops.example.com")
            .header("access-control-request-method", "POST")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        let response = sender.send_request(preflight).await.unwrap();
        let origin = response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(origin.as_deref(), expect, "{addr}");
    }
}

#[tokio::test]
async fn metrics_add_what_a_prometheus_recorder_collected() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        metrics::counter!("orchestrator_test_probe_total").increment(3);
    });
    let orchestrator = EventOrchestrator::new();
    orchestrator
        .publish_event("probe.sent", json!({}))
        .await
        .unwrap();
    let server = start(orchestrator, config().prometheus(handle)).await;
    let (status, text) = request(server.addr, Method::GET, "/metrics", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("orchestrator_test_probe_total 3"), "{text}");
    assert!(
        text.contains("# TYPE orchestrator_store_head_position gauge"),
        "{text}"
    );
    assert!(
        text.contains(
            "orchestrator_store_head_position{store=\"in-memory\",transport=\"in-process\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn queries_that_scan_the_store_stop_at_the_scan_limit() {
    let orchestrator = EventOrchestrator::new();
    for n in 0..5 {
        orchestrator
            .publish_event("scan.me", json!({ "n": n }))
            .await
            .unwrap();
    }
    let server = start(orchestrator.clone(), config().max_scan(5)).await;
    let data = query(
        server.addr,
        "{ streams { streams { id events } } }",
        json!({}),
    )
    .await;
    assert_eq!(
        data["streams"]["streams"][0]["events"], 5,
        "at the limit: {data}"
    );
    orchestrator
        .publish_event("scan.me", json!({ "n": 5 }))
        .await
        .unwrap();
    for over in [
        "{ streams { streams { id } } }",
        r#"{ trace(correlationId: "any") { nodes { depth } } }"#,
        r#"{ event(id: "any") { id } }"#,
    ] {
        let (status, response) = graphql(server.addr, over, json!({})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(error_code(&response), "SCAN_LIMIT", "{over}: {response}");
    }
    // Pages of `events` are bounded on their own.
    let data = query(
        server.addr,
        "{ events(first: 10) { events { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(data["events"]["events"].as_array().unwrap().len(), 6);
}
