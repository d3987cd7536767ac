//! The dashboard: the page and its assets are served embedded, with their content types,
//! fetching nothing from elsewhere; every GraphQL operation its JavaScript sends runs
//! against the real schema on a live orchestrator holding events, a saga and dead letters
//! (so a schema change that breaks the page fails here); a read-only server says so to the
//! page.
//!
//! No browser runs here: `tests/browser/` drives the page itself in headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Socket, receive, send};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use orchestrator::prelude::*;
use orchestrator::store::projection::Checkpoints;
use serde_json::{Value, json};
use support::{
    TOKEN, charge, config, error_code, graphql, release, request, reserve, start, wait_until,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// The one `http://` string the assets may hold: the SVG namespace, a name that is never
/// fetched.
const SVG_NAMESPACE: &str = "http://www.w3.org/2000/svg";

/// A GET with optional headers: status, headers, body.
async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, hyper::HeaderMap, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        sender.send_request(builder.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("the server answers within 30 s")
    .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn header<'a>(headers: &'a hyper::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("a `{name}` header in {headers:?}"))
        .to_str()
        .unwrap()
}

/// The `/assets/…` paths the page references (`src="…"`, `href="…"`).
fn referenced_assets(html: &str) -> Vec<String> {
    let mut assets = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(at) = rest.find(attribute) {
            rest = &rest[at + attribute.len()..];
            let end = rest.find('"').unwrap();
            let target = &rest[..end];
            if target.starts_with("/assets/") && !assets.iter().any(|a| a == target) {
                assets.push(target.to_owned());
            }
        }
    }
    assets
}

/// Fails if `text` names a URL elsewhere: `http://`, `https://` or a protocol-relative
/// `//host` in an attribute or `url(…)`.
fn assert_offline(name: &str, text: &str) {
    let cleaned = text.replace(SVG_NAMESPACE, "");
    for scheme in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "url(//",
        "url(\"//",
    ] {
        assert!(
            !cleaned.contains(scheme),
            "{name} refers to something outside the server (`{scheme}`): the dashboard must work offline"
        );
    }
    assert!(!cleaned.contains("@import"), "{name} imports a stylesheet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_embedded_typed_and_offline() {
    let server = start(EventOrchestrator::new(), config()).await;
    let addr = server.addr;

    // The page loads without the token (it asks for it); the API behind it does not.
    let (status, headers, html) = get(addr, "/", &[]).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&headers, "cache-control"), "no-cache");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    let csp = header(&headers, "content-security-policy");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(
        !html.contains("<script>"),
        "no inline script (the CSP forbids it)"
    );
    assert_offline("index.html", &html);
    let (status, _, same) = get(addr, "/index.html", &[]).await;
    assert_eq!((status, same.as_str()), (StatusCode::OK, html.as_str()));
    let (status, _) = request(
        addr,
        Method::POST,
        "/graphql",
        None,
        r#"{"query": "{ system { headPosition } }"}"#,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the data still needs the token"
    );

    // Every asset the page references, with its type.
    let assets = referenced_assets(&html);
    for expected in [
        "/assets/app.css",
        "/assets/queries.js",
        "/assets/app.js",
        "/assets/favicon.svg",
    ] {
        assert!(
            assets.iter().any(|a| a == expected),
            "{expected} in {assets:?}"
        );
    }
    for path in &assets {
        let (status, headers, body) = get(addr, path, &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let expected = match path.rsplit('.').next().unwrap() {
            "css" => "text/css; charset=utf-8",
            "js" => "text/javascript; charset=utf-8",
            "svg" => "image/svg+xml",
            other => panic!("an asset of a type this test does not know: .{other}"),
        };
        assert_eq!(header(&headers, "content-type"), expected, "{path}");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        assert!(!body.is_empty(), "{path}");
        assert_offline(path, &body);

        // Revalidation: the same bytes answer 304 to their entity tag.
        let etag = header(&headers, "etag").to_owned();
        let (status, _, body) = get(addr, path, &[("if-none-match", etag.as_str())]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(body.is_empty());
        let (status, _, _) = get(addr, path, &[("if-none-match", "\"stale\"")]).await;
        assert_eq!(status, StatusCode::OK, "{path}");

        // Data goes into the page as text, never as HTML.
        if path.ends_with(".js") {
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "javascript:",
            ] {
                assert!(!body.contains(sink), "{path} uses `{sink}`");
            }
        }
    }

    let (status, _, _) = get(addr, "/assets/missing.js", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Turned off, it is not there.
    let plain = start(EventOrchestrator::new(), config().dashboard(false)).await;
    let (status, _, _) = get(plain.addr, "/", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = get(plain.addr, "/assets/app.js", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The operations of `queries.js`: the template literal after each `/*op:NAME*/` marker.
fn operations(js: &str) -> BTreeMap<String, String> {
    let mut operations = BTreeMap::new();
    let mut rest = js;
    while let Some(at) = rest.find("/*op:") {
        rest = &rest[at + "/*op:".len()..];
        let end = rest.find("*/").unwrap();
        let name = rest[..end].to_owned();
        rest = rest[end + 2..].trim_start();
        let body = rest
            .strip_prefix('`')
            .unwrap_or_else(|| panic!("operation {name}: a template literal after its marker"));
        let end = body.find('`').unwrap();
        let text = body[..end].to_owned();
        assert!(
            !text.contains("${"),
            "operation {name} is built at run time; the test could not check it"
        );
        assert!(
            operations.insert(name.clone(), text).is_none(),
            "operation {name} twice"
        );
        rest = &body[end + 1..];
    }
    operations
}

/// The `data` of a query that must run without errors.
async fn run(addr: SocketAddr, name: &str, operation: &str, variables: Value) -> Value {
    let (status, response) = graphql(addr, operation, variables.clone()).await;
    assert_eq!(status, StatusCode::OK, "{name}: {response}");
    assert!(
        response.get("errors").is_none(),
        "the dashboard's `{name}` fails against the schema with {variables}: {response}"
    );
    response["data"].clone()
}

/// Connects as a browser does: no `Authorization` header, the token in `connection_init`.
async fn connect_like_a_browser(addr: SocketAddr) -> Socket {
    let mut request = format!("ws://{addr}/graphql/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    send(
        &mut socket,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {TOKEN}")}}),
    )
    .await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    socket
}

/// The first result of a subscription, which must carry no error.
async fn first_result(
    socket: &mut Socket,
    id: &str,
    name: &str,
    operation: &str,
    variables: Value,
) -> Value {
    send(
        socket,
        json!({"id": id, "type": "subscribe", "payload": {"query": operation, "variables": variables}}),
    )
    .await;
    // Results of subscriptions completed before may still be on their way.
    let message = loop {
        let message = receive(socket).await;
        if message["id"] == id {
            break message;
        }
    };
    assert_eq!(
        message["type"], "next",
        "the dashboard's `{name}` fails against the schema: {message}"
    );
    assert!(
        message["payload"].get("errors").is_none(),
        "the dashboard's `{name}` fails against the schema: {message}"
    );
    send(socket, json!({"id": id, "type": "complete"})).await;
    message["payload"]["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_the_dashboard_sends_runs_against_the_schema() {
    let orchestrator = EventOrchestrator::new();
    let server = start(orchestrator.clone(), config()).await;
    let addr = server.addr;
    let (status, _, js) = get(addr, "/assets/queries.js", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let operations = operations(&js);
    assert_eq!(
        operations.len(),
        js.matches("/*op:").count(),
        "every marker yields an operation"
    );
    let (_, _, app) = get(addr, "/assets/app.js", &[]).await;
    for name in operations.keys() {
        assert!(
            app.contains(&format!("Q.{name}")) || app.contains(&format!("\"{name}\"")),
            "app.js does not use `{name}`: drop it from queries.js"
        );
    }
    for literal in [
        "`query",
        "`mutation",
        "`subscription",
        "`{",
        "\"query ",
        "\"mutation ",
        "\"subscription ",
        "\"{ ",
        "'query ",
        "'{ ",
    ] {
        assert!(
            !app.contains(literal),
            "app.js writes an operation of its own (`{literal}`): keep them all in queries.js, \
             where this test checks them"
        );
    }

    // Data for every view: a request with a cause and its effect, a compensated saga, two
    // dead letters, a projection's checkpoint.
    let root = EventEnvelope::new("dash.order.placed", &json!({"order_id": 1}))
        .unwrap()
        .with_correlation_id("dash-request-1");
    orchestrator.publish(root.clone()).await.unwrap();
    orchestrator
        .publish(
            EventEnvelope::new("dash.order.shipped", &json!({"order_id": 1}))
                .unwrap()
                .with_correlation_id("dash-request-1")
                .with_causation_id(root.id().as_str()),
        )
        .await
        .unwrap();
    orchestrator
        .define_saga(
            "dash-checkout",
            vec![
                SagaStep::new("reserve", reserve).with_compensation(release),
                SagaStep::new("charge", charge),
            ],
        )
        .unwrap();
    let saga = orchestrator
        .start_saga("dash-checkout", json!({"cart": "C-1"}))
        .await
        .unwrap();
    assert_eq!(saga.status, SagaStatus::Compensated);
    let _failing = orchestrator
        .subscribe_with(
            SubscriptionConfig::new("dash.payment.failed").named("dash-billing"),
            |_event: EventEnvelope| async move {
                Err::<(), _>(HandlerError::permanent("the billing service is down"))
            },
        )
        .await
        .unwrap();
    for payment in ["P-1", "P-2"] {
        orchestrator
            .publish_event("dash.payment.failed", json!({ "payment": payment }))
            .await
            .unwrap();
    }
    wait_until("two dead letters", Duration::from_secs(30), || async {
        orchestrator.dead_letters().queue().len().await.unwrap_or(0) >= 2
    })
    .await;
    let store = orchestrator.store();
    let (mut checkpoints, _) = Checkpoints::load(store.as_ref(), "dash-orders-view")
        .await
        .unwrap();
    checkpoints
        .save(store.as_ref(), "dash-orders-view", 1)
        .await
        .unwrap();

    let operation = |name: &str| -> &str {
        operations
            .get(name)
            .unwrap_or_else(|| panic!("queries.js has no `{name}`"))
    };
    let mut checked = Vec::new();

    // The header and the numbers.
    let data = run(addr, "overview", operation("overview"), json!({})).await;
    assert_eq!(data["system"]["readOnly"], false, "{data}");
    assert!(data["system"]["headPosition"].as_u64().unwrap() >= 4);
    assert_eq!(data["system"]["deadLetters"], 2, "{data}");
    assert!(
        data["projections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "dash-orders-view"),
        "{data}"
    );
    checked.push("overview");

    // Live events, from a position, with and without a filter; then the detail of one.
    let mut socket = connect_like_a_browser(addr).await;
    let first = first_result(
        &mut socket,
        "1",
        "liveEvents",
        operation("liveEvents"),
        json!({"types": ["dash.order.*"], "fromPosition": 1}),
    )
    .await;
    assert_eq!(first["events"]["id"], root.id().as_str(), "{first}");
    let position = first["events"]["globalPosition"].clone();
    first_result(
        &mut socket,
        "2",
        "liveEvents",
        operation("liveEvents"),
        json!({"types": null, "fromPosition": 1}),
    )
    .await;
    checked.push("liveEvents");
    let data = run(
        addr,
        "eventAt",
        operation("eventAt"),
        json!({ "position": position }),
    )
    .await;
    assert_eq!(
        data["eventAt"]["cloudEvent"]["specversion"], "1.0",
        "{data}"
    );
    checked.push("eventAt");
    let data = run(
        addr,
        "eventById",
        operation("eventById"),
        json!({"id": root.id().as_str()}),
    )
    .await;
    assert_eq!(data["event"]["correlationId"], "dash-request-1", "{data}");
    checked.push("eventById");

    // The trace.
    let data = run(
        addr,
        "trace",
        operation("trace"),
        json!({"correlationId": "dash-request-1"}),
    )
    .await;
    let nodes = data["trace"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{data}");
    assert_eq!(nodes[1]["parentId"], root.id().as_str());
    checked.push("trace");

    // Sagas, one saga, the updates.
    for unfinished in [Value::Null, json!(true)] {
        run(
            addr,
            "sagas",
            operation("sagas"),
            json!({ "unfinished": unfinished }),
        )
        .await;
    }
    let data = run(addr, "sagas", operation("sagas"), json!({})).await;
    assert_eq!(data["sagas"][0]["id"], saga.id.to_string(), "{data}");
    checked.push("sagas");
    let data = run(
        addr,
        "saga",
        operation("saga"),
        json!({"id": saga.id.to_string()}),
    )
    .await;
    assert_eq!(data["saga"]["status"], "COMPENSATED", "{data}");
    assert!(!data["saga"]["log"].as_array().unwrap().is_empty());
    checked.push("saga");
    let update = first_result(
        &mut socket,
        "3",
        "sagaUpdates",
        operation("sagaUpdates"),
        json!({"fromPosition": 1}),
    )
    .await;
    assert_eq!(
        update["sagaUpdates"]["sagaId"],
        saga.id.to_string(),
        "{update}"
    );
    checked.push("sagaUpdates");

    // Dead letters: the list, one, live arrivals, reprocess one, discard the other.
    let data = run(
        addr,
        "deadLetters",
        operation("deadLetters"),
        json!({"first": 200}),
    )
    .await;
    let letters: Vec<String> = data["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(letters.len(), 2, "{data}");
    checked.push("deadLetters");
    let data = run(
        addr,
        "deadLetter",
        operation("deadLetter"),
        json!({"id": letters[0]}),
    )
    .await;
    assert_eq!(
        data["deadLetter"]["event"]["cloudEvent"]["type"], "dash.payment.failed",
        "{data}"
    );
    checked.push("deadLetter");
    let arrival = first_result(
        &mut socket,
        "4",
        "deadLetterArrivals",
        operation("deadLetterArrivals"),
        json!({"since": "2000-01-01T00:00:00Z"}),
    )
    .await;
    assert!(
        letters.contains(
            &arrival["deadLetterArrivals"]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        ),
        "{arrival}"
    );
    checked.push("deadLetterArrivals");
    let data = run(
        addr,
        "reprocessDeadLetter",
        operation("reprocessDeadLetter"),
        json!({"id": letters[0]}),
    )
    .await;
    assert_eq!(data["reprocessDeadLetter"]["id"], letters[0].as_str());
    checked.push("reprocessDeadLetter");
    let data = run(
        addr,
        "discardDeadLetter",
        operation("discardDeadLetter"),
        json!({"id": letters[1]}),
    )
    .await;
    assert_eq!(data["discardDeadLetter"]["id"], letters[1].as_str());
    checked.push("discardDeadLetter");

    // Nothing the page sends went unchecked.
    let mut unchecked: Vec<_> = operations
        .keys()
        .filter(|name| !checked.contains(&name.as_str()))
        .collect();
    unchecked.sort();
    assert!(
        unchecked.is_empty(),
        "operations of queries.js this test does not run: {unchecked:?} (give them realistic variables here)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_server_tells_the_page_which_hides_its_mutations() {
    let orchestrator = EventOrchestrator::new();
    let server = start(orchestrator, config().read_only(true)).await;
    let addr = server.addr;
    let (_, _, js) = get(addr, "/assets/queries.js", &[]).await;
    let operations = operations(&js);

    // The page reads `system.readOnly` with its first query…
    let data = run(addr, "overview", &operations["overview"], json!({})).await;
    assert_eq!(data["system"]["readOnly"], true, "{data}");

    // …turns the mutation buttons off by it, and hides them by a style…
    let (_, _, app) = get(addr, "/assets/app.js", &[]).await;
    assert!(
        app.contains("classList.toggle(\"read-only\", system.readOnly)"),
        "app.js marks the page read-only from system.readOnly"
    );
    assert!(
        app.contains("class: \"mutating"),
        "the mutation buttons are marked"
    );
    let (_, _, css) = get(addr, "/assets/app.css", &[]).await;
    assert!(
        css.contains(".read-only .mutating { display: none; }"),
        "app.css hides the mutation buttons on a read-only server"
    );

    // …and the server refuses them anyway.
    let (_, response) = graphql(
        addr,
        &operations["reprocessDeadLetter"],
        json!({"id": "no-such-letter"}),
    )
    .await;
    assert_eq!(error_code(&response), "READ_ONLY", "{response}");
}
