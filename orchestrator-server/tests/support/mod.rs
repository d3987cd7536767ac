//! Shared by the API tests: a plain HTTP/1 client, and the story every backend must tell the
//! same way through a live server.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use orchestrator::prelude::*;
use orchestrator::store::projection::Checkpoints;
use orchestrator::store::schema::SchemaVersion;
use orchestrator_server::{Server, ServerConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The token the test servers require.
pub(crate) const TOKEN: &str = "test-token-3f9a";

/// A server running on a port of its own; stops when dropped.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Starts a server over `orchestrator` on 127.0.0.1, port chosen by the system.
pub(crate) async fn start(orchestrator: EventOrchestrator, config: ServerConfig) -> Running {
    let server = Server::bind(orchestrator, config).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(server.run_until(async {
        stopped.await.ok();
    }));
    Running { addr, _stop: stop }
}

/// A loopback config on port 0 requiring [`TOKEN`].
pub(crate) fn config() -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().unwrap()).bearer_token(TOKEN)
}

/// One HTTP/1 request on a fresh connection: the status and the body.
pub(crate) async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        sender.send_request(
            builder
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        ),
    )
    .await
    .expect("the server answers within 30 s")
    .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// A GraphQL request with the right token: the status and the JSON response.
pub(crate) async fn graphql(
    addr: SocketAddr,
    query: &str,
    variables: Value,
) -> (StatusCode, Value) {
    let body = json!({ "query": query, "variables": variables }).to_string();
    let (status, body) = request(addr, Method::POST, "/graphql", Some(TOKEN), &body).await;
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, value)
}

/// The `data` of a GraphQL request that must succeed.
pub(crate) async fn query(addr: SocketAddr, query: &str, variables: Value) -> Value {
    let (status, response) = graphql(addr, query, variables).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert!(response.get("errors").is_none(), "{query}: {response}");
    response["data"].clone()
}

/// The `extensions.code` of the first error of a response.
pub(crate) fn error_code(response: &Value) -> &str {
    response["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("an error with a code: {response}"))
}

/// Polls `check` until it is true, for at most `within`.
pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const EVENTS: &str = r"query($filter: EventsFilter, $first: Int, $after: String) {
  events(filter: $filter, first: $first, after: $after) {
    events { id type correlationId causationId streamId globalPosition data }
    pageInfo { endCursor hasNextPage }
  }
}";

/// The story: events published through the facade are read back through the API
/// (filters, pages, one event as a CloudEvent, streams, the trace of a request), a dead
/// letter is reprocessed through a mutation and reaches its handler, and the operations
/// endpoints answer. `tag` makes event types unique to the run.
pub(crate) async fn api_story(orchestrator: EventOrchestrator, tag: &str) {
    let server = start(orchestrator.clone(), config()).await;
    let addr = server.addr;
    let placed = format!("{tag}.order.placed");
    let shipped = format!("{tag}.order.shipped");
    let signed_up = format!("{tag}.user.created");
    let correlation = format!("{tag}-request-1");
    orchestrator
        .schemas()
        .register(SchemaVersion::new(
            &signed_up,
            1,
            json!({"type": "object", "required": ["user"]}),
        ))
        .unwrap();

    // A request: three orders placed, the first one shipped (caused by it); and an
    // unrelated sign-up.
    let first = EventEnvelope::new(&placed, &json!({"order_id": 1}))
        .unwrap()
        .with_correlation_id(&correlation);
    orchestrator.publish(first.clone()).await.unwrap();
    for order_id in [2, 3] {
        orchestrator
            .publish(
                EventEnvelope::new(&placed, &json!({ "order_id": order_id }))
                    .unwrap()
                    .with_correlation_id(&correlation),
            )
            .await
            .unwrap();
    }
    orchestrator
        .publish(
            EventEnvelope::new(&shipped, &json!({"order_id": 1}))
                .unwrap()
                .with_correlation_id(&correlation)
                .with_causation_id(first.id().as_str()),
        )
        .await
        .unwrap();
    orchestrator
        .publish_event(&signed_up, json!({"user": "ada"}))
        .await
        .unwrap();

    // A type pattern, two pages of two.
    let pattern = format!("{tag}.order.*");
    let page = query(
        addr,
        EVENTS,
        json!({"filter": {"types": [pattern]}, "first": 2}),
    )
    .await;
    let events = page["events"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{page}");
    assert_eq!(events[0]["data"], json!({"order_id": 1}));
    assert_eq!(page["events"]["pageInfo"]["hasNextPage"], true);
    let cursor = page["events"]["pageInfo"]["endCursor"].clone();
    let rest = query(
        addr,
        EVENTS,
        json!({"filter": {"types": [pattern]}, "first": 2, "after": cursor}),
    )
    .await;
    let events = rest["events"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{rest}");
    assert_eq!(events[0]["data"], json!({"order_id": 3}));
    assert_eq!(events[1]["type"], shipped.as_str());
    assert_eq!(rest["events"]["pageInfo"]["hasNextPage"], false, "{rest}");

    // An exact type, filtered by the store itself: pages of exactly what was asked.
    let exact = query(
        addr,
        EVENTS,
        json!({"filter": {"types": [placed]}, "first": 2}),
    )
    .await;
    assert_eq!(exact["events"]["events"].as_array().unwrap().len(), 2);
    assert_eq!(exact["events"]["pageInfo"]["hasNextPage"], true, "{exact}");
    let exact_rest = query(
        addr,
        EVENTS,
        json!({"filter": {"types": [placed]}, "first": 2, "after": exact["events"]["pageInfo"]["endCursor"]}),
    )
    .await;
    let events = exact_rest["events"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{exact_rest}");
    assert_eq!(events[0]["data"], json!({"order_id": 3}));
    assert_eq!(exact_rest["events"]["pageInfo"]["hasNextPage"], false);

    // An exact type, a stream, a correlation id.
    let signups = query(addr, EVENTS, json!({"filter": {"types": [signed_up]}})).await;
    assert_eq!(signups["events"]["events"].as_array().unwrap().len(), 1);
    let shipped_stream = query(addr, EVENTS, json!({"filter": {"stream": shipped}})).await;
    assert_eq!(
        shipped_stream["events"]["events"].as_array().unwrap().len(),
        1
    );
    let correlated = query(
        addr,
        EVENTS,
        json!({"filter": {"correlationId": correlation}, "first": 10}),
    )
    .await;
    assert_eq!(correlated["events"]["events"].as_array().unwrap().len(), 4);

    // One event as its CloudEvent, by position and by id.
    let position = correlated["events"]["events"][3]["globalPosition"].clone();
    let one = query(
        addr,
        "query($p: Int!) { eventAt(position: $p) { id cloudEvent } }",
        json!({"p": position}),
    )
    .await;
    let cloud_event = &one["eventAt"]["cloudEvent"];
    assert_eq!(cloud_event["specversion"], "1.0", "{one}");
    assert_eq!(cloud_event["type"], shipped.as_str());
    assert_eq!(cloud_event["correlationid"], correlation.as_str());
    assert_eq!(cloud_event["causationid"], first.id().as_str());
    let by_id = query(
        addr,
        "query($id: String!) { event(id: $id) { type } }",
        json!({"id": first.id().as_str()}),
    )
    .await;
    assert_eq!(by_id["event"]["type"], placed.as_str());

    // Streams and their versions.
    let stream = query(
        addr,
        "query($id: String!) { stream(id: $id) { version events { data } } }",
        json!({"id": placed}),
    )
    .await;
    assert_eq!(stream["stream"]["version"], 3, "{stream}");
    assert_eq!(
        stream["stream"]["events"][2]["data"],
        json!({"order_id": 3})
    );
    let streams = query(
        addr,
        "{ streams(first: 500) { streams { id version events } } }",
        json!({}),
    )
    .await;
    let listed = streams["streams"]["streams"].as_array().unwrap();
    let placed_summary = listed.iter().find(|s| s["id"] == placed.as_str()).unwrap();
    assert_eq!(placed_summary["events"], 3);

    // The request's causation tree: the shipment under the first order.
    let trace = query(
        addr,
        "query($c: String!) { trace(correlationId: $c) { nodes { event { id type } parentId depth } } }",
        json!({"c": correlation}),
    )
    .await;
    let nodes = trace["trace"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4, "{trace}");
    assert_eq!(nodes[0]["event"]["id"], first.id().as_str());
    assert_eq!(
        nodes[1]["event"]["type"],
        shipped.as_str(),
        "depth first: {trace}"
    );
    assert_eq!(nodes[1]["depth"], 1);
    assert_eq!(nodes[1]["parentId"], first.id().as_str());
    assert_eq!(nodes[2]["depth"], 0);

    // Schemas, and the relay.
    let data = query(
        addr,
        "{ schemas { eventType versions latestVersion } relay { state headPosition lag } }",
        json!({}),
    )
    .await;
    assert!(
        data["schemas"]
            .as_array()
            .unwrap()
            .contains(&json!({"eventType": signed_up, "versions": [1], "latestVersion": 1})),
        "{data}"
    );
    assert!(
        data["relay"]["headPosition"].as_u64().unwrap() >= 5,
        "{data}"
    );
    assert!(
        ["idle", "standby", "relaying"].contains(&data["relay"]["state"].as_str().unwrap()),
        "{data}"
    );

    // A projection's checkpoint, written as a ProjectionRunner writes it.
    let projection = format!("{tag}-orders-view");
    let store = orchestrator.store();
    let (mut checkpoints, _) = Checkpoints::load(store.as_ref(), &projection)
        .await
        .unwrap();
    checkpoints
        .save(store.as_ref(), &projection, 2)
        .await
        .unwrap();
    // The relay may checkpoint too (on durable stores), moving the head: the lag is at least
    // what it was when the checkpoint was written.
    let head = store.head_position().await.unwrap();
    let data = query(addr, "{ projections { name checkpoint lag } }", json!({})).await;
    let view = data["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == projection.as_str())
        .unwrap_or_else(|| panic!("{data}"));
    assert_eq!(view["checkpoint"], 2);
    assert!(view["lag"].as_u64().unwrap() >= head - 2, "{data}");

    saga_story(&orchestrator, addr, tag).await;
    dead_letter_story(&orchestrator, addr, tag).await;

    // Operations.
    let (status, body) = request(addr, Method::GET, "/healthz", None, "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    let (status, body) = request(addr, Method::GET, "/readyz", None, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["store"], "ok");
    let (status, metrics) = request(addr, Method::GET, "/metrics", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{metrics}");
    let head = metrics
        .lines()
        .find(|l| l.starts_with("orchestrator_store_head_position{"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let head: u64 = head.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(head >= 6, "{metrics}");
    assert!(metrics.contains("orchestrator_dead_letters{"), "{metrics}");
    let (status, _) = request(addr, Method::GET, "/metrics", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "/metrics needs the token");
}

/// A saga step that reserves: `{"reservation": "R-1"}`.
pub(crate) async fn reserve(_context: Value) -> Result<Value, HandlerError> {
    Ok(json!({"reservation": "R-1"}))
}

/// The compensation of [`reserve`].
pub(crate) async fn release(_context: Value) -> Result<(), HandlerError> {
    Ok(())
}

/// A saga step that always fails for good: "card declined".
pub(crate) async fn charge(_context: Value) -> Result<Value, HandlerError> {
    Err(HandlerError::permanent("card declined"))
}

/// A saga whose second step fails is compensated; the API lists it and shows its steps,
/// failure, compensation and timed log, and its trace names it.
async fn saga_story(orchestrator: &EventOrchestrator, addr: SocketAddr, tag: &str) {
    let name = format!("{tag}-checkout");
    orchestrator
        .define_saga(
            name.as_str(),
            vec![
                SagaStep::new("reserve", reserve).with_compensation(release),
                SagaStep::new("charge", charge),
            ],
        )
        .unwrap();
    let outcome = orchestrator
        .start_saga(&name, json!({"cart": "C-1"}))
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let id = outcome.id.to_string();

    let list = query(addr, "{ sagas { id saga status statusName } }", json!({})).await;
    let listed = list["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(listed["saga"], name.as_str());
    assert_eq!(listed["status"], "COMPENSATED");

    let detail = query(
        addr,
        "query($id: String!) { saga(id: $id) { status completedSteps compensatedSteps \
         failure { step error } context log { type step offsetMs } } }",
        json!({"id": id}),
    )
    .await;
    let saga = &detail["saga"];
    assert_eq!(saga["status"], "COMPENSATED", "{detail}");
    assert_eq!(saga["completedSteps"], json!(["reserve"]));
    assert_eq!(saga["compensatedSteps"], json!(["reserve"]));
    assert_eq!(saga["failure"]["step"], "charge");
    assert!(
        saga["failure"]["error"]
            .as_str()
            .unwrap()
            .contains("card declined")
    );
    assert_eq!(saga["context"]["reservation"], "R-1");
    let log = saga["log"].as_array().unwrap();
    assert!(log.len() >= 4, "start, steps, compensation, end: {detail}");
    assert_eq!(log[0]["offsetMs"], 0.0);
    assert!(log.iter().any(|r| r["step"] == "charge"), "{detail}");

    let missing = query(
        addr,
        "query($id: String!) { saga(id: $id) { id } }",
        json!({"id": "01890000-0000-7000-8000-000000000000"}),
    )
    .await;
    assert!(missing["saga"].is_null(), "{missing}");
    let trace = query(
        addr,
        "query($c: String!) { trace(correlationId: $c) { sagaIds } }",
        json!({"c": id}),
    )
    .await;
    assert_eq!(trace["trace"]["sagaIds"], json!([id]), "{trace}");
}

/// A handler that fails every event for good (so it is dead-lettered) until `healthy` is
/// set, then hands each event's id to `handled`.
pub(crate) struct Billing {
    /// Set it, and the handler succeeds from then on.
    pub(crate) healthy: Arc<AtomicBool>,
    /// The id of each event handled successfully.
    pub(crate) handled: tokio::sync::mpsc::UnboundedReceiver<EventId>,
    /// The subscription, alive as long as this is.
    pub(crate) subscription: Subscription,
}

impl Billing {
    /// Subscribes the handler with `config`; until healthy it fails with `reason`.
    pub(crate) async fn subscribe(
        orchestrator: &EventOrchestrator,
        config: SubscriptionConfig,
        reason: &'static str,
    ) -> Self {
        let healthy = Arc::new(AtomicBool::new(false));
        let (handled, handled_rx) = tokio::sync::mpsc::unbounded_channel();
        let subscription = orchestrator
            .subscribe_with(config, {
                let healthy = Arc::clone(&healthy);
                move |event: EventEnvelope| {
                    let healthy = Arc::clone(&healthy);
                    let handled = handled.clone();
                    async move {
                        if !healthy.load(Ordering::SeqCst) {
                            return Err(HandlerError::permanent(reason));
                        }
                        handled.send(event.id().clone()).ok();
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        Self {
            healthy,
            handled: handled_rx,
            subscription,
        }
    }
}

/// A handler fails an event for good; the API lists the dead letter, a mutation
/// reprocesses it, the handler (now healthy) gets it, and the queue is empty again.
async fn dead_letter_story(orchestrator: &EventOrchestrator, addr: SocketAddr, tag: &str) {
    let failed = format!("{tag}.payment.failed");
    let mut billing = Billing::subscribe(
        orchestrator,
        SubscriptionConfig::new(&failed).named(format!("{tag}-billing")),
        "the billing service is down",
    )
    .await;
    let id = orchestrator
        .publish_event(&failed, json!({"payment": "P-1"}))
        .await
        .unwrap();

    let letters_query = "query($t: String) { deadLetters(eventType: $t) { id reason attempts subscription event { id type } } }";
    wait_until(
        "the event is dead-lettered",
        Duration::from_secs(30),
        || async {
            let data = query(addr, letters_query, json!({"t": failed})).await;
            !data["deadLetters"].as_array().unwrap().is_empty()
        },
    )
    .await;
    let data = query(addr, letters_query, json!({"t": failed})).await;
    let letter = &data["deadLetters"][0];
    assert_eq!(letter["event"]["id"], id.as_str());
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("billing service is down"),
        "{letter}"
    );
    let letter_id = letter["id"].as_str().unwrap().to_owned();
    let inspected = query(
        addr,
        "query($id: String!) { deadLetter(id: $id) { id attempts } }",
        json!({"id": letter_id}),
    )
    .await;
    assert_eq!(inspected["deadLetter"]["id"], letter_id.as_str());

    billing.healthy.store(true, Ordering::SeqCst);
    let reprocessed = query(
        addr,
        "mutation($id: String!) { reprocessDeadLetter(id: $id) { id event { id } } }",
        json!({"id": letter_id}),
    )
    .await;
    assert_eq!(
        reprocessed["reprocessDeadLetter"]["event"]["id"],
        id.as_str()
    );
    let got = tokio::time::timeout(Duration::from_secs(30), billing.handled.recv())
        .await
        .expect("the reprocessed event reaches the handler within 30 s")
        .unwrap();
    assert_eq!(got, id);
    let data = query(addr, letters_query, json!({"t": failed})).await;
    assert_eq!(data["deadLetters"], json!([]), "the queue is empty again");

    // A second reprocess of the same letter: it is gone.
    let (status, response) = graphql(
        addr,
        "mutation($id: String!) { reprocessDeadLetter(id: $id) { id } }",
        json!({"id": letter_id}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(error_code(&response), "NOT_FOUND", "{response}");
}

/// A WebSocket client connection to the server.
pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends one graphql-transport-ws message.
pub(crate) async fn send(socket: &mut Socket, message: Value) {
    use futures::SinkExt as _;
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            message.to_string(),
        ))
        .await
        .unwrap();
}

/// The next protocol message (pings answered, other frames skipped).
pub(crate) async fn receive(socket: &mut Socket) -> Value {
    use futures::StreamExt as _;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a message within 30 s")
            .expect("the connection is open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            let message: Value = serde_json::from_str(text.as_str()).unwrap();
            if message["type"] == "ping" {
                send(socket, json!({"type": "pong"})).await;
                continue;
            }
            return message;
        }
    }
}

/// Where a server binary listens: the first line it prints on stdout
/// (`listening on http://ADDR`), within 30 s.
pub(crate) async fn listening_on(stdout: tokio::process::ChildStdout) -> SocketAddr {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the server says where it listens within 30 s")
        .unwrap()
        .unwrap();
    line.strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap()
}
