//! The query server under load: the GraphQL `events` query against reading the store
//! directly, and live events fanned out over WebSocket to many subscribers.
//!
//! `cargo bench -p orchestrator-server --bench server [-- memory|file …]`
//!
//! For each store (the in-memory store, and the embedded file store in a temporary folder),
//! a server on 127.0.0.1 (port chosen by the system, no token, the page cap raised to 1,000):
//!
//! - **events query:** one page of 1,000 events (200-byte JSON payloads, one exact type)
//!   asked for as `events(filter: {types: [...]}, first: 1000) { events { id type time
//!   correlationId streamId globalPosition data } pageInfo { … } }`, POSTed over one
//!   keep-alive HTTP/1.1 connection; latency from sending the request to having the whole
//!   body. The baseline, measured alternately with it: what a program holding the store
//!   does for the same answer — `store.read_all` of the same 1,001 events with the same
//!   filter (the server reads one more to know whether a page follows), each payload decoded
//!   into a `serde_json::Value`, the same fields put in the same response shape and
//!   serialized with `serde_json::to_vec`. direct/query is the ratio of the medians: higher
//!   is better, 1.00 would mean GraphQL and HTTP cost nothing.
//! - **WebSocket fan-out:** 100 clients subscribe (graphql-transport-ws, `events(types,
//!   fromPosition)`, live) while one publisher calls `EventOrchestrator::publish` at a paced
//!   rate for a few seconds; each payload carries the instant of its `publish` call and its
//!   sequence number, and each client measures publish → message received and checks that
//!   it got every event once, in increasing global position (publishes overlap when one
//!   waits for a file store's sync, so sequence numbers may be stored out of order). From
//!   10,000 events/s down, rate after rate, until one is
//!   sustained: nothing lost, the publisher reached 95% of the rate and deliveries 90% of
//!   the rate × subscribers. CPU comes from `/proc`: the server runtime's threads (the HTTP
//!   and WebSocket server, GraphQL, the orchestrator's relay) and the whole process (the
//!   subscribers and the publisher too, who share the same 2 cores), as cores busy over the
//!   window.
//!
//! An event missing without the server having said so (`SLOW_CONSUMER`) is a failure,
//! printed as `server failed: …`; subscribers cut off with `SLOW_CONSUMER` at a rate the
//! server cannot keep up with are counted as lost and the rate as not sustained.
//! `SERVER_BENCH_SECONDS` (3) sets the publishing window, `SERVER_BENCH_REQUESTS` (200) the
//! measured requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use orchestrator::EventOrchestrator;
use orchestrator::core::{EventEnvelope, EventFilter, EventStore, ExpectedVersion, ReadAll};
use orchestrator::store::FileEventStore;
use orchestrator_server::{DEFAULT_SUBSCRIPTION_WINDOW, Server, ServerConfig};
use serde_json::{Map, Value, json};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// The type (and stream) of every event.
const EVENT_TYPE: &str = "bench.order";
/// Events in the queried page.
const PAGE: usize = 1_000;
/// Requests before the measured ones.
const WARM_UP: usize = 20;
/// Measured requests unless `SERVER_BENCH_REQUESTS` says otherwise.
const REQUESTS: usize = 200;
/// WebSocket subscribers.
const SUBSCRIBERS: usize = 100;
/// The rate issue 22 asks for, events/s.
const TARGET_RATE: u64 = 10_000;
/// The rates tried, highest first, until one is sustained.
const RATES: [u64; 11] = [
    10_000, 5_000, 3_000, 2_000, 1_500, 1_000, 700, 500, 300, 200, 100,
];
/// Publishing window unless `SERVER_BENCH_SECONDS` says otherwise.
const SECONDS: u64 = 3;
/// How long after the last publish subscribers may take to receive the rest.
const GRACE: Duration = Duration::from_secs(10);
/// The most publishes in flight at once.
const MAX_IN_FLIGHT: usize = 1_024;
/// The name of the server runtime's threads (`/proc/self/task/*/comm`, 15 bytes at most).
const SERVER_THREADS: &str = "bench-server";

const QUERY: &str = r#"query($first: Int) {
  events(filter: {types: ["bench.order"]}, first: $first) {
    events { id type time correlationId streamId globalPosition data }
    pageInfo { endCursor hasNextPage }
  }
}"#;

const SUBSCRIPTION: &str = r"subscription($types: [String!], $from: Int) {
  events(types: $types, fromPosition: $from) { id type globalPosition data }
}";

/// The instant every timestamp in a payload counts from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// A 200-byte JSON object carrying `seq` and `sent_ns` (padded with `note`).
fn payload(seq: u64, sent_ns: u64) -> Vec<u8> {
    let head = format!(r#"{{"seq":{seq},"sent_ns":{sent_ns},"note":""#);
    let pad = 200usize.saturating_sub(head.len() + 2);
    let mut text = head;
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text.into_bytes()
}

fn event(seq: u64, sent_ns: u64) -> EventEnvelope {
    EventEnvelope::from_bytes(EVENT_TYPE, "application/json", payload(seq, sent_ns)).unwrap()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// A store the server can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    File,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::File => "file",
        }
    }
}

/// An orchestrator and its server, started on the server runtime; the server stops when
/// this is dropped.
struct Served {
    orchestrator: EventOrchestrator,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh store of `kind`, an orchestrator over it and a server for it (call it on the
/// server runtime: the orchestrator's relay and the server run where it is called).
async fn serve(kind: Kind) -> Served {
    let (orchestrator, dir) = match kind {
        Kind::Memory => (EventOrchestrator::new(), None),
        Kind::File => {
            let dir = tempfile::Builder::new()
                .prefix("orchestrator-bench-server")
                .tempdir()
                .unwrap();
            let path = dir.path().to_owned();
            let store = tokio::task::spawn_blocking(move || FileEventStore::open(path))
                .await
                .unwrap()
                .unwrap();
            let orchestrator = EventOrchestrator::builder()
                .store(Arc::new(store))
                .build()
                .await
                .unwrap();
            (orchestrator, Some(dir))
        }
    };
    let config = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .max_page_size(PAGE)
        .dashboard(false);
    let server = Server::bind(orchestrator.clone(), config).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(server.run_until(async {
        stopped.await.ok();
    }));
    Served {
        orchestrator,
        addr,
        _stop: stop,
        _dir: dir,
    }
}

/// The value at quantile `q` of sorted `values`.
fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---- the events query ---------------------------------------------------------------

/// One store's query figures, µs.
struct QueryRow {
    kind: Kind,
    query: Vec<f64>,
    direct: Vec<f64>,
    response_bytes: usize,
    direct_bytes: usize,
}

/// A keep-alive HTTP/1.1 connection to `addr`.
async fn http_connection(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// POSTs `body` to `/graphql`: the whole response body.
async fn post(sender: &mut SendRequest<Full<Bytes>>, addr: SocketAddr, body: &Bytes) -> Bytes {
    sender.ready().await.unwrap();
    let request = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri("/graphql")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), hyper::StatusCode::OK);
    response.into_body().collect().await.unwrap().to_bytes()
}

/// What a program holding the store does for the same page: read, decode each payload, put
/// the same fields in the same shape, serialize.
async fn direct(store: &Arc<dyn EventStore>) -> Vec<u8> {
    let filter = EventFilter::all().event_type(EVENT_TYPE);
    let mut page = store
        .read_all(ReadAll::from(1, PAGE + 1).filter(filter))
        .await
        .unwrap();
    let has_next_page = page.len() > PAGE;
    page.truncate(PAGE);
    let events: Vec<Value> = page
        .iter()
        .map(|e| {
            let mut fields = Map::new();
            fields.insert("id".into(), e.id().as_str().into());
            fields.insert("type".into(), e.event_type().into());
            fields.insert(
                "time".into(),
                e.time()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .into(),
            );
            fields.insert("correlationId".into(), e.correlation_id().into());
            fields.insert("streamId".into(), e.stream_id().into());
            fields.insert("globalPosition".into(), e.global_position().into());
            fields.insert("data".into(), e.data::<Value>().ok().into());
            Value::Object(fields)
        })
        .collect();
    let end_cursor = page
        .last()
        .and_then(|e| e.global_position())
        .map(|p| p.to_string());
    let response = json!({"data": {"events": {
        "events": events,
        "pageInfo": {"endCursor": end_cursor, "hasNextPage": has_next_page},
    }}});
    serde_json::to_vec(&response).unwrap()
}

/// The events query and its direct baseline, alternately, on a fresh store of `kind`.
async fn events_query(server: &Runtime, kind: Kind, requests: usize) -> QueryRow {
    let served = server.spawn(serve(kind)).await.unwrap();
    let store = Arc::clone(served.orchestrator.store());
    for batch in 0..PAGE / 100 {
        let events = (0..100)
            .map(|n| event((batch * 100 + n) as u64, 0))
            .collect();
        store
            .append(EVENT_TYPE, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    let body = Bytes::from(json!({"query": QUERY, "variables": {"first": PAGE}}).to_string());
    let mut sender = http_connection(served.addr).await;
    let answer = post(&mut sender, served.addr, &body).await;
    let value: Value = serde_json::from_slice(&answer).unwrap();
    assert!(value.get("errors").is_none(), "{value}");
    let got = value["data"]["events"]["events"].as_array().unwrap().len();
    assert_eq!(got, PAGE, "one page of {PAGE} events");
    let mut row = QueryRow {
        kind,
        query: Vec::with_capacity(requests),
        direct: Vec::with_capacity(requests),
        response_bytes: answer.len(),
        direct_bytes: direct(&store).await.len(),
    };
    for i in 0..WARM_UP + requests {
        let started = Instant::now();
        let answer = post(&mut sender, served.addr, &body).await;
        let query = started.elapsed();
        assert_eq!(answer.len(), row.response_bytes, "the same page each time");
        let started = Instant::now();
        std::hint::black_box(direct(&store).await);
        let direct = started.elapsed();
        if i >= WARM_UP {
            row.query.push(micros(query));
            row.direct.push(micros(direct));
        }
    }
    drop(sender);
    served.orchestrator.shutdown(Duration::from_secs(5)).await;
    row
}

// ---- WebSocket fan-out ----------------------------------------------------------------

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What one subscriber received.
#[derive(Default)]
struct Delivery {
    /// Publish → received, µs, one per event.
    latencies_us: Vec<u32>,
    /// When the last event arrived.
    last_at: Option<Instant>,
    /// The error the server ended the subscription with (`SLOW_CONSUMER`, …).
    error: Option<String>,
    /// An event missing or out of order without an error: a bug.
    gap: Option<String>,
}

/// The number after `"<name>":` in `text`.
fn number_after(text: &str, name: &str) -> Option<u64> {
    let at = text.find(name)? + name.len();
    let digits = text[at..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .map(char::from)
        .collect::<String>();
    digits.parse().ok()
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .unwrap();
}

/// Waits until `deadline` holds an instant, then until that instant.
async fn until_deadline(mut deadline: watch::Receiver<Option<tokio::time::Instant>>) {
    loop {
        let at = *deadline.borrow_and_update();
        if let Some(at) = at {
            tokio::time::sleep_until(at).await;
            return;
        }
        if deadline.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Connects, subscribes from `from`, tells `ready` once the warm-up event (sequence 0)
/// arrived, then receives events 1..=`events` (in any order of sequence numbers, as
/// publishes in flight together may be stored in any order; in increasing global
/// position, each once) until it has them all or `deadline` passes.
async fn subscriber(
    addr: SocketAddr,
    from: u64,
    events: u64,
    ready: mpsc::Sender<()>,
    deadline: watch::Receiver<Option<tokio::time::Instant>>,
) -> Delivery {
    let mut request = format!("ws://{addr}/graphql/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    send(&mut socket, json!({"type": "connection_init"})).await;
    send(
        &mut socket,
        json!({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIPTION,
            "variables": {"types": [EVENT_TYPE], "from": from}}}),
    )
    .await;
    let mut delivery = Delivery {
        latencies_us: Vec::with_capacity(events as usize),
        ..Delivery::default()
    };
    let mut seen = vec![false; events as usize + 1];
    let mut last_position = 0;
    let deadline = until_deadline(deadline);
    tokio::pin!(deadline);
    while (delivery.latencies_us.len() as u64) < events {
        let next = tokio::select! {
            next = socket.next() => next,
            () = &mut deadline => break,
        };
        let Some(Ok(frame)) = next else {
            delivery.error = Some("the connection closed".to_owned());
            break;
        };
        let Message::Text(text) = frame else {
            continue;
        };
        let text = text.as_str();
        if text.contains(r#""type":"connection_ack""#) {
            continue;
        }
        if text.contains(r#""type":"ping""#) {
            send(&mut socket, json!({"type": "pong"})).await;
            continue;
        }
        if text.contains(r#""errors""#) || !text.contains(r#""type":"next""#) {
            // The code comes last, after the message: look for it before shortening.
            delivery.error = Some(if text.contains("SLOW_CONSUMER") {
                "SLOW_CONSUMER".to_owned()
            } else {
                text.chars().take(300).collect()
            });
            break;
        }
        let received = base().elapsed().as_nanos() as u64;
        let (Some(seq), Some(sent), Some(position)) = (
            number_after(text, r#""seq":"#),
            number_after(text, r#""sent_ns":"#),
            number_after(text, r#""globalPosition":"#),
        ) else {
            delivery.gap = Some(format!("unreadable message: {text}"));
            break;
        };
        if position <= last_position {
            delivery.gap = Some(format!(
                "position {position} after {last_position}: out of order"
            ));
            break;
        }
        last_position = position;
        match seen.get_mut(seq as usize) {
            Some(seen) if !*seen => *seen = true,
            _ => {
                delivery.gap = Some(format!("event {seq} twice or unknown"));
                break;
            }
        }
        if seq == 0 {
            ready.send(()).await.unwrap();
        } else {
            let us = received.saturating_sub(sent) / 1_000;
            delivery
                .latencies_us
                .push(u32::try_from(us).unwrap_or(u32::MAX));
            delivery.last_at = Some(Instant::now());
        }
    }
    delivery
}

/// When the publisher published.
struct Published {
    started: Instant,
    finished: Instant,
}

/// Publishes events 1..=`events` at `rate` per second on a thread of its own, each payload
/// carrying the instant of its `publish` call (taken as the call begins).
fn publish_paced(
    orchestrator: EventOrchestrator,
    rate: u64,
    events: u64,
) -> std::thread::JoinHandle<Published> {
    std::thread::Builder::new()
        .name("bench-publish".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let started = Instant::now();
                let spacing = Duration::from_secs_f64(1.0 / rate as f64);
                // Publishes in flight together when one takes longer than the spacing (a
                // file store's publish waits for its sync; several share one), so that the
                // pace is the store's group commit's, not one sync after another.
                let mut in_flight = tokio::task::JoinSet::<orchestrator::Result<_>>::new();
                for seq in 1..=events {
                    let due = started + spacing.mul_f64((seq - 1) as f64);
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    while let Some(done) = in_flight.try_join_next() {
                        done.unwrap().unwrap();
                    }
                    if in_flight.len() >= MAX_IN_FLIGHT
                        && let Some(done) = in_flight.join_next().await
                    {
                        done.unwrap().unwrap();
                    }
                    let orchestrator = orchestrator.clone();
                    in_flight.spawn(async move {
                        let sent = base().elapsed().as_nanos() as u64;
                        orchestrator.publish(event(seq, sent)).await
                    });
                }
                while let Some(done) = in_flight.join_next().await {
                    done.unwrap().unwrap();
                }
                Published {
                    started,
                    finished: Instant::now(),
                }
            })
        })
        .unwrap()
}

/// CPU time of this process's threads whose name starts with `prefix` (all of them for
/// `None`), from `/proc` (zero where it cannot be read). Clock ticks are 10 ms.
fn cpu(prefix: Option<&str>) -> Duration {
    let ticks = |stat: &str| -> Option<u64> {
        // After the command name (which may hold spaces): utime is field 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut fields = rest.split(' ').skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(utime + stime)
    };
    let total = match prefix {
        None => std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ticks(&s))
            .unwrap_or(0),
        Some(prefix) => std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|comm| comm.starts_with(prefix))
            })
            .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
            .filter_map(|s| ticks(&s))
            .sum(),
    };
    // USER_HZ is 100 on every Linux this bench runs on.
    Duration::from_millis(total * 10)
}

/// One fan-out measurement.
struct FanOut {
    kind: Kind,
    rate: u64,
    published_rate: f64,
    delivered_rate: f64,
    delivered: u64,
    expected: u64,
    latencies_us: Vec<u32>,
    server_cores: f64,
    process_cores: f64,
    slow_consumers: usize,
    failures: Vec<String>,
}

impl FanOut {
    fn lost(&self) -> u64 {
        self.expected - self.delivered
    }

    fn sustained(&self) -> bool {
        self.lost() == 0
            && self.failures.is_empty()
            && self.published_rate >= 0.95 * self.rate as f64
            && self.delivered_rate >= 0.9 * (self.rate * SUBSCRIBERS as u64) as f64
    }
}

/// 100 subscribers on a fresh store of `kind` while one publisher publishes at `rate`.
async fn fan_out(server: &Runtime, kind: Kind, rate: u64, seconds: u64) -> FanOut {
    let served = server.spawn(serve(kind)).await.unwrap();
    let orchestrator = served.orchestrator.clone();
    let from = orchestrator.store().head_position().await.unwrap() + 1;
    orchestrator.publish(event(0, 0)).await.unwrap();
    let events = rate * seconds;
    let (ready, mut readied) = mpsc::channel(SUBSCRIBERS);
    let (deadline, deadline_rx) = watch::channel(None);
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            tokio::spawn(subscriber(
                served.addr,
                from,
                events,
                ready.clone(),
                deadline_rx.clone(),
            ))
        })
        .collect();
    drop(ready);
    for _ in 0..SUBSCRIBERS {
        tokio::time::timeout(Duration::from_secs(60), readied.recv())
            .await
            .expect("every subscriber gets the warm-up event within 60 s")
            .expect("no subscriber failed before the warm-up event");
    }

    let (server_before, process_before, started) =
        (cpu(Some(SERVER_THREADS)), cpu(None), Instant::now());
    let publisher = publish_paced(orchestrator.clone(), rate, events);
    // Once the last publish returned, subscribers have GRACE to receive the rest.
    let published = tokio::spawn(async move {
        let published = tokio::task::spawn_blocking(move || publisher.join().unwrap())
            .await
            .unwrap();
        deadline.send_replace(Some(tokio::time::Instant::now() + GRACE));
        published
    });
    let mut deliveries = Vec::with_capacity(SUBSCRIBERS);
    for subscriber in subscribers {
        deliveries.push(subscriber.await.unwrap());
    }
    let took = started.elapsed().as_secs_f64();
    // Saturating: a thread that exits takes its CPU time out of the sum.
    let (server_cpu, process_cpu) = (
        cpu(Some(SERVER_THREADS)).saturating_sub(server_before),
        cpu(None).saturating_sub(process_before),
    );
    let published = published.await.unwrap();

    let mut latencies_us =
        Vec::with_capacity(deliveries.iter().map(|d| d.latencies_us.len()).sum());
    let mut failures = Vec::new();
    let mut slow_consumers = 0;
    let mut last_at = published.finished;
    for (n, delivery) in deliveries.iter_mut().enumerate() {
        let received = delivery.latencies_us.len() as u64;
        latencies_us.append(&mut delivery.latencies_us);
        last_at = last_at.max(delivery.last_at.unwrap_or(last_at));
        match (&delivery.error, &delivery.gap) {
            (_, Some(gap)) => failures.push(format!("subscriber {n}: {gap} (no error said so)")),
            (Some(error), None) if error.contains("SLOW_CONSUMER") => slow_consumers += 1,
            (Some(error), None) => failures.push(format!("subscriber {n}: {error}")),
            // Each subscriber not told otherwise must have had every event.
            (None, None) if received < events => failures.push(format!(
                "subscriber {n}: {} of {events} events not received within {} s of the last \
                 publish, and no error said why",
                events - received,
                GRACE.as_secs()
            )),
            (None, None) => {}
        }
    }
    latencies_us.sort_unstable();
    let delivered = latencies_us.len() as u64;
    let expected = events * SUBSCRIBERS as u64;
    drop(served);
    orchestrator.shutdown(Duration::from_secs(5)).await;
    FanOut {
        kind,
        rate,
        published_rate: events as f64
            / published
                .finished
                .duration_since(published.started)
                .as_secs_f64(),
        delivered_rate: delivered as f64 / last_at.duration_since(published.started).as_secs_f64(),
        delivered,
        expected,
        latencies_us,
        server_cores: server_cpu.as_secs_f64() / took,
        process_cores: process_cpu.as_secs_f64() / took,
        slow_consumers,
        failures,
    }
}

// ---- the report ---------------------------------------------------------------------------

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn print_queries(rows: &[QueryRow]) {
    println!(
        "\nevents query, one page of {PAGE} events over HTTP/1.1 (keep-alive) vs reading the store directly"
    );
    println!(
        "{:<8} {:>13} {:>13} {:>14} {:>14} {:>13} {:>11} {:>9}",
        "store",
        "query p50 µs",
        "query p99 µs",
        "direct p50 µs",
        "direct p99 µs",
        "direct/query",
        "response B",
        "direct B"
    );
    for row in rows {
        let mut query = row.query.clone();
        let mut direct = row.direct.clone();
        query.sort_by(f64::total_cmp);
        direct.sort_by(f64::total_cmp);
        println!(
            "{:<8} {:>13.1} {:>13.1} {:>14.1} {:>14.1} {:>13.2} {:>11} {:>9}",
            row.kind.name(),
            quantile(&query, 0.5),
            quantile(&query, 0.99),
            quantile(&direct, 0.5),
            quantile(&direct, 0.99),
            quantile(&direct, 0.5) / quantile(&query, 0.5),
            row.response_bytes,
            row.direct_bytes,
        );
    }
    println!(
        "(direct: store.read_all of the same {} events, same filter, each payload decoded into \
         a serde_json::Value, the same fields in the same shape, serde_json::to_vec; measured \
         alternately with the query; direct/query = direct p50 ÷ query p50, higher is better, \
         1.00 would mean the API adds nothing)",
        PAGE + 1
    );
}

fn print_fan_outs(rows: &[FanOut], seconds: u64) {
    println!(
        "\nwebsocket fan-out, {SUBSCRIBERS} subscribers (graphql-transport-ws, live events), publish → received, {seconds} s per rate"
    );
    println!(
        "{:<8} {:>11} {:>14} {:>15} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>13} {:>9}",
        "store",
        "target ev/s",
        "published ev/s",
        "delivered msg/s",
        "delivered",
        "expected",
        "lost",
        "p50 µs",
        "p99 µs",
        "max µs",
        "server cores",
        "process cores",
        "sustained"
    );
    for row in rows {
        let (p50, p99, max) = if row.latencies_us.is_empty() {
            (0, 0, 0)
        } else {
            (
                quantile(&row.latencies_us, 0.5),
                quantile(&row.latencies_us, 0.99),
                quantile(&row.latencies_us, 1.0),
            )
        };
        println!(
            "{:<8} {:>11} {:>14.0} {:>15.0} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12.2} {:>13.2} {:>9}",
            row.kind.name(),
            row.rate,
            row.published_rate,
            row.delivered_rate,
            row.delivered,
            row.expected,
            row.lost(),
            p50,
            p99,
            max,
            row.server_cores,
            row.process_cores,
            if row.sustained() { "yes" } else { "no" },
        );
    }
    println!(
        "(sustained: nothing lost, the publisher reached 95% of the target and deliveries 90% of \
         target × subscribers; events lost at a rate not sustained are those after a \
         SLOW_CONSUMER cut-off (window {DEFAULT_SUBSCRIPTION_WINDOW} events); server cores: the \
         server runtime's threads (HTTP, WebSocket, GraphQL, the orchestrator's relay), process \
         cores: the whole process, subscribers and publisher included; target: {TARGET_RATE} \
         events/s to {SUBSCRIBERS} subscribers, none lost)"
    );
    for row in rows {
        if row.slow_consumers > 0 {
            println!(
                "server: {} at {}/s: {} of {SUBSCRIBERS} subscribers cut off with SLOW_CONSUMER",
                row.kind.name(),
                row.rate,
                row.slow_consumers
            );
        }
    }
}

fn main() {
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let kinds: Vec<Kind> = [Kind::Memory, Kind::File]
        .into_iter()
        .filter(|k| picked.is_empty() || picked.iter().any(|p| k.name().starts_with(p.as_str())))
        .collect();
    let seconds = env_number("SERVER_BENCH_SECONDS", SECONDS);
    let requests = env_number("SERVER_BENCH_REQUESTS", REQUESTS as u64) as usize;
    base();
    // The server (and the orchestrator's relay) on threads of their own, so that their CPU
    // can be told from the clients'; both runtimes share the machine's cores, as a server
    // and its clients on one host would.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    println!(
        "server bench: orchestrator-server on 127.0.0.1 (axum + async-graphql), payload 200 B \
         of JSON, stores: {}; query: {requests} requests after {WARM_UP} warm-up; fan-out: \
         {SUBSCRIBERS} subscribers, {seconds} s per rate; load average {} before",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        load_average()
    );
    let (queries, fan_outs) = clients.block_on(async {
        let mut queries = Vec::new();
        for &kind in &kinds {
            eprintln!("server: {}: events query", kind.name());
            queries.push(events_query(&server, kind, requests).await);
        }
        let mut fan_outs = Vec::new();
        for &kind in &kinds {
            for rate in RATES {
                eprintln!("server: {}: fan-out at {rate} events/s", kind.name());
                let row = fan_out(&server, kind, rate, seconds).await;
                let sustained = row.sustained();
                fan_outs.push(row);
                if sustained {
                    break;
                }
            }
        }
        (queries, fan_outs)
    });
    print_queries(&queries);
    print_fan_outs(&fan_outs, seconds);
    for &kind in &kinds {
        let best = fan_outs
            .iter()
            .filter(|r| r.kind == kind && r.sustained())
            .map(|r| r.rate)
            .max();
        match best {
            Some(rate) => println!(
                "server: {}: highest sustained rate {rate} events/s to {SUBSCRIBERS} subscribers",
                kind.name()
            ),
            None => println!(
                "server: {}: no rate tried was sustained (lowest: {} events/s)",
                kind.name(),
                RATES[RATES.len() - 1]
            ),
        }
    }
    for row in &fan_outs {
        for failure in &row.failures {
            println!(
                "server failed: {} fan-out at {}/s: {failure}",
                row.kind.name(),
                row.rate
            );
        }
    }
    println!("server: load average {} after", load_average());
}
