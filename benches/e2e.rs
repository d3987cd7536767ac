//! The facade end to end: `EventOrchestrator::publish` → the subscriber's handler, against
//! the same store's plain `append` of the same events, measured in the same run.
//!
//! `cargo bench -p orchestrator --features redis,rabbitmq[,kafka] --bench e2e [-- <name>…]`
//!
//! For each combination of store and transport — memory/memory, file/in-process (the
//! embedded [`FileEventStore`] in a temporary folder, default fsync policy: one sync per
//! group of appends), file/Redis, Redis/Redis, RabbitMQ/RabbitMQ, Kafka/Kafka — one
//! subscriber, at concurrency 1 (one task publishing one event after another) and 64 (64
//! tasks publishing at once):
//!
//! - **end to end:** each event's latency from the call to `publish` to the handler's
//!   entry (p50, p99, and the slowest event's), and the throughput: events ÷ the time from the first `publish` to the
//!   handler seeing the last event. `publish` returns once the event is stored; the outbox
//!   relay carries it to the transport, the subscription to the handler.
//! - **plain append:** the same store's `append` of events of the same size, one per call,
//!   at the same concurrency: the rate a publisher could reach if nothing were delivered.
//!   The target is end to end ≥ 0.7× plain append (the relay must not be the bottleneck),
//!   and, on memory/memory (everything in process), p50 ≤ 50 µs at concurrency 1. In
//!   process (memory/memory, file/in-process) at concurrency 64, back-pressure must be fair:
//!   the slowest event's latency within 10× the median.
//!
//! A third figure, the publishers' rate (events ÷ the time from the first `publish` to the
//! last one returning), tells the two ways end to end can fall behind apart: when it is close
//! to the end-to-end rate the relay kept up and the publishers were slowed down (by what
//! delivery costs on the same cores and broker); when it is well above, the relay or the
//! subscriber lagged.
//!
//! Payloads are 200 bytes of JSON; events are made before the clock starts. Every
//! measurement runs on fresh backends (a new store, a new key prefix, exchange, stream or
//! topic prefix) which are deleted afterwards. Each round measures both back to back, end to
//! end first in even rounds and last in odd ones; the bench prints the medians over rounds
//! and the median of the per-round ratios. `E2E_BENCH_ROUNDS` overrides the rounds (5);
//! `E2E_BENCH_TRACE`, when set, prints every 100 ms how far the store, the relay and the
//! handler have got. Arguments other than `--bench` pick combinations by name (`memory`,
//! `file`, `redis`, …). A measurement that fails ends its row with an `e2e failed:` line and
//! the bench goes on with the others.
//!
//! Brokers: `ORCHESTRATOR_REDIS_URL`, `ORCHESTRATOR_AMQP_URL`, `ORCHESTRATOR_KAFKA_BROKERS`
//! (see `orchestrator_core::testkit::services`). A combination whose broker is unreachable,
//! or whose feature is not compiled in, is skipped with a printed reason — except under
//! `CI=true`, where an unreachable broker fails the bench.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use orchestrator::EventOrchestrator;
use orchestrator::core::testkit::services;
use orchestrator::core::{
    EventEnvelope, EventId, EventStore, ExpectedVersion, HandlerError, Transport,
};
use orchestrator::store::{FileEventStore, InMemoryEventStore};
use tokio::sync::Notify;

/// Rounds unless `E2E_BENCH_ROUNDS` says otherwise.
const ROUNDS: usize = 5;
/// The concurrencies measured.
const CONCURRENCY: [usize; 2] = [1, 64];
/// The event type (and so the stream) every event is published as.
const EVENT_TYPE: &str = "bench.order";
/// Events published and handled before the clock starts: connections, consumer groups and
/// the relay's subscription are live by then.
const WARM_UP: usize = 20;
/// How long one measurement may take before the bench gives up on it.
const PATIENCE: Duration = Duration::from_secs(120);

/// A 200-byte JSON object.
fn payload() -> Vec<u8> {
    let mut value = serde_json::json!({
        "order_id": "o-00000042",
        "customer": "c-000042",
        "amount_cents": 129_900,
        "currency": "EUR",
        "items": [{"sku": "sku-1", "qty": 2}, {"sku": "sku-2", "qty": 1}],
        "note": "",
    });
    let len = serde_json::to_vec(&value).unwrap().len();
    value["note"] = "x".repeat(200usize.saturating_sub(len)).into();
    serde_json::to_vec(&value).unwrap()
}

/// `n` fresh events (new ids: stores with idempotent appends must not take any for a retry).
fn events(n: usize) -> Vec<EventEnvelope> {
    let payload = payload();
    (0..n)
        .map(|_| {
            EventEnvelope::from_bytes(EVENT_TYPE, "application/json", payload.clone()).unwrap()
        })
        .collect()
}

/// A combination of store and transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Combination {
    Memory,
    FileInProcess,
    FileRedis,
    Redis,
    RabbitMq,
    Kafka,
}

const COMBINATIONS: [Combination; 6] = [
    Combination::Memory,
    Combination::FileInProcess,
    Combination::FileRedis,
    Combination::Redis,
    Combination::RabbitMq,
    Combination::Kafka,
];

impl Combination {
    /// `store/transport`, as the report names it.
    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory/memory",
            Self::FileInProcess => "file/in-process",
            Self::FileRedis => "file/Redis",
            Self::Redis => "Redis/Redis",
            Self::RabbitMq => "RabbitMQ/RabbitMQ",
            Self::Kafka => "Kafka/Kafka",
        }
    }

    /// Events per measurement at concurrency 1 and 64: a fraction of a second to a few
    /// seconds each, so that the whole bench takes minutes (Kafka store appends wait for
    /// the log to index them, RabbitMQ's for the broker's confirm and the log reader).
    fn events(self, concurrency: usize) -> usize {
        let (one, many) = match self {
            Self::Memory => (20_000, 50_000),
            Self::FileInProcess | Self::FileRedis => (2_000, 10_000),
            Self::Redis => (2_000, 10_000),
            Self::RabbitMq => (500, 3_000),
            Self::Kafka => (100, 640),
        };
        if concurrency == 1 { one } else { many }
    }

    /// The cargo feature this combination needs and this build lacks, if any.
    fn missing_feature(self) -> Option<&'static str> {
        match self {
            Self::Memory | Self::FileInProcess => None,
            Self::FileRedis | Self::Redis => (!cfg!(feature = "redis")).then_some("redis"),
            Self::RabbitMq => (!cfg!(feature = "rabbitmq")).then_some("rabbitmq"),
            Self::Kafka => (!cfg!(feature = "kafka")).then_some("kafka"),
        }
    }

    /// The name (`/proc/<pid>/comm`) of the broker's server process, if there is one.
    fn broker_process(self) -> Option<&'static str> {
        match self {
            Self::Memory | Self::FileInProcess => None,
            Self::FileRedis | Self::Redis => Some("redis-server"),
            Self::RabbitMq => Some("beam.smp"),
            Self::Kafka => Some("tansu"),
        }
    }

    /// Whether `filters` (the command line's names) pick this combination.
    fn picked(self, filters: &[String]) -> bool {
        let name = self.name().to_lowercase();
        filters.is_empty() || filters.iter().any(|f| name.contains(&f.to_lowercase()))
    }
}

/// Where the brokers are, and a run id that keeps this run's names apart from others'.
struct Env {
    redis: String,
    amqp: String,
    kafka: String,
    run: String,
    made: AtomicUsize,
}

impl Env {
    /// A name no other measurement of any run uses.
    fn unique(&self) -> String {
        format!("{}-{}", self.run, self.made.fetch_add(1, Ordering::Relaxed))
    }
}

/// Deletes what a measurement made on a broker.
type Cleanup = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// A fresh store, the transport to go with it (`None`: in-process), and their cleanup.
struct Parts {
    store: Arc<dyn EventStore>,
    transport: Option<Arc<dyn Transport>>,
    cleanup: Cleanup,
    /// Keeps a file store's folder until the measurement is over.
    _dir: Option<tempfile::TempDir>,
}

fn nothing() -> Cleanup {
    Box::new(|| Box::pin(async {}))
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The error of a backend this build does not carry ([`Combination::missing_feature`] keeps
/// the bench from asking for one).
#[cfg(not(all(feature = "redis", feature = "rabbitmq", feature = "kafka")))]
const NOT_COMPILED: &str = "the backend's feature is not compiled in";

/// Opens a file store in a fresh temporary folder, with the default options.
async fn file_store(env: &Env) -> BenchResult<(Arc<dyn EventStore>, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("orchestrator-bench-e2e-{}", env.unique()))
        .tempdir()?;
    let path = dir.path().to_owned();
    let store = tokio::task::spawn_blocking(move || FileEventStore::open(path)).await??;
    Ok((Arc::new(store), dir))
}

impl Combination {
    /// Fresh backends for one measurement; `transport`: whether the transport is needed
    /// (plain appends need only the store).
    async fn parts(self, env: &Env, transport_wanted: bool) -> BenchResult<Parts> {
        let transport = transport_wanted;
        match self {
            Self::Memory => Ok(Parts {
                store: Arc::new(InMemoryEventStore::new()),
                transport: None,
                cleanup: nothing(),
                _dir: None,
            }),
            Self::FileInProcess => {
                let (store, dir) = file_store(env).await?;
                Ok(Parts {
                    store,
                    transport: None,
                    cleanup: nothing(),
                    _dir: Some(dir),
                })
            }
            Self::FileRedis => {
                let (store, dir) = file_store(env).await?;
                let (transport, cleanup) = if transport {
                    let (_, transport, cleanup) = redis_parts(env, false).await?;
                    (transport, cleanup)
                } else {
                    (None, nothing())
                };
                Ok(Parts {
                    store,
                    transport,
                    cleanup,
                    _dir: Some(dir),
                })
            }
            Self::Redis => {
                let (store, transport, cleanup) = redis_parts(env, true).await?;
                Ok(Parts {
                    store: store.ok_or("a Redis store was asked for")?,
                    transport: if transport_wanted { transport } else { None },
                    cleanup,
                    _dir: None,
                })
            }
            Self::RabbitMq => rabbitmq_parts(env, transport).await,
            Self::Kafka => kafka_parts(env, transport).await,
        }
    }
}

/// What [`redis_parts`] makes: a store (when asked for), a transport, their cleanup.
type RedisParts = (
    Option<Arc<dyn EventStore>>,
    Option<Arc<dyn Transport>>,
    Cleanup,
);

/// A Redis transport and, with `store`, a Redis store, under a key prefix of their own.
#[cfg(feature = "redis")]
async fn redis_parts(env: &Env, store: bool) -> BenchResult<RedisParts> {
    use orchestrator::backends::redis::{RedisConfig, RedisEventStore, RedisTransport};
    let config = RedisConfig::new(&env.redis)?
        .with_prefix(format!("orchestrator-bench-e2e:{}:", env.unique()));
    let ours = if store {
        Some(RedisEventStore::connect(config.clone()).await?)
    } else {
        None
    };
    let transport = RedisTransport::connect(config).await?;
    let t = transport.clone();
    Ok((
        ours.map(|s| Arc::new(s) as Arc<dyn EventStore>),
        Some(Arc::new(transport)),
        Box::new(move || {
            Box::pin(async move {
                t.close().await;
                // The store's keys share the prefix: this deletes them too.
                if let Err(e) = t.delete_all().await {
                    eprintln!("e2e: cleaning up Redis failed: {e}");
                }
            })
        }),
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis_parts(_env: &Env, _store: bool) -> BenchResult<RedisParts> {
    Err(NOT_COMPILED.into())
}

#[cfg(feature = "rabbitmq")]
async fn rabbitmq_parts(env: &Env, transport: bool) -> BenchResult<Parts> {
    use orchestrator::backends::rabbitmq::{
        RabbitMqConfig, RabbitMqEventStore, RabbitMqStoreConfig, RabbitMqTransport,
    };
    let name = format!("orchestrator-bench-e2e.{}", env.unique());
    let store = RabbitMqEventStore::connect(
        RabbitMqStoreConfig::new(&env.amqp).with_stream(format!("{name}.log")),
    )
    .await?;
    let ours = if transport {
        let config = RabbitMqConfig::new(&env.amqp)
            .with_exchange(format!("{name}.events"))
            .with_queue_prefix(&name);
        Some(RabbitMqTransport::connect(config).await?)
    } else {
        None
    };
    let (s, t) = (store.clone(), ours.clone());
    Ok(Parts {
        store: Arc::new(store),
        transport: ours.map(|t| Arc::new(t) as Arc<dyn Transport>),
        cleanup: Box::new(move || {
            Box::pin(async move {
                if let Some(t) = t {
                    if let Err(e) = t.delete_topology().await {
                        eprintln!("e2e: deleting the RabbitMQ exchange and queues failed: {e}");
                    }
                    t.close().await;
                }
                if let Err(e) = s.delete_log().await {
                    eprintln!("e2e: deleting the RabbitMQ stream failed: {e}");
                }
                s.close().await;
            })
        }),
        _dir: None,
    })
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbitmq_parts(_env: &Env, _transport: bool) -> BenchResult<Parts> {
    Err(NOT_COMPILED.into())
}

#[cfg(feature = "kafka")]
async fn kafka_parts(env: &Env, transport: bool) -> BenchResult<Parts> {
    use orchestrator::backends::kafka::{KafkaConfig, KafkaEventStore, KafkaTransport};
    // As the Kafka bench: a 10 ms fetch wait, so that a quiet topic does not decide the
    // latency (DESIGN.md: on a quiet topic `fetch.wait.max.ms` decides the consume rate).
    let config = KafkaConfig::new(&env.kafka)
        .with_prefix(format!("bench-e2e-{}.", env.unique()))?
        .with_fetch_wait(Duration::from_millis(10))
        .with_operation_timeout(Duration::from_secs(20));
    let store = KafkaEventStore::connect(config.clone()).await?;
    let ours = if transport {
        Some(KafkaTransport::connect(config).await?)
    } else {
        None
    };
    let (s, t) = (store.clone(), ours.clone());
    Ok(Parts {
        store: Arc::new(store),
        transport: ours.map(|t| Arc::new(t) as Arc<dyn Transport>),
        cleanup: Box::new(move || {
            Box::pin(async move {
                if let Some(t) = t
                    && let Err(e) = t.delete_all_topics().await
                {
                    eprintln!("e2e: deleting the Kafka topics failed: {e}");
                }
                if let Err(e) = s.delete_topic().await {
                    eprintln!("e2e: deleting the Kafka log topic failed: {e}");
                }
            })
        }),
        _dir: None,
    })
}

#[cfg(not(feature = "kafka"))]
async fn kafka_parts(_env: &Env, _transport: bool) -> BenchResult<Parts> {
    Err(NOT_COMPILED.into())
}

/// CPU time spent by this process and by the broker's processes, read from `/proc` (Linux;
/// elsewhere, or when `/proc` cannot be read, nothing is reported). Clock ticks are 10 ms,
/// so a measurement needs a few hundred milliseconds to say much: the bench reports the
/// medians over rounds, per event.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTime {
    /// This process (publishers, relay, subscriber, handler, the clients' I/O).
    client: Duration,
    /// The broker's server processes (Redis, RabbitMQ's Erlang VM, tansu).
    broker: Duration,
}

impl CpuTime {
    /// Now, for `combination`'s broker.
    fn now(combination: Combination) -> Option<Self> {
        let client = process_cpu("self")?;
        let broker = match combination.broker_process() {
            None => Duration::ZERO,
            Some(name) => {
                let mut total = Duration::ZERO;
                for entry in std::fs::read_dir("/proc").ok()?.flatten() {
                    let pid = entry.file_name();
                    let Some(pid) = pid
                        .to_str()
                        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
                    else {
                        continue;
                    };
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    if comm.trim() == name {
                        total += process_cpu(pid).unwrap_or_default();
                    }
                }
                total
            }
        };
        Some(Self { client, broker })
    }

    /// What was spent since `earlier`, in microseconds per event: (client, broker).
    fn per_event(self, earlier: Self, events: usize) -> (f64, f64) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / events as f64;
        (
            per(self.client.saturating_sub(earlier.client)),
            per(self.broker.saturating_sub(earlier.broker)),
        )
    }
}

/// User and system CPU time of process `pid` (`self` for this one), all its threads.
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on: utime is
    // field 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux this bench runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// FNV-1a: the probe's map is looked up in the handler, on the path being measured, and
/// SipHash over a 36-byte id costs more than it needs to (the ids are not attacker-chosen).
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

/// What the handler sees: each timed event's publish start and handler entry, in
/// nanoseconds after `base` plus one (zero: not yet).
struct Probe {
    base: Instant,
    index: HashMap<EventId, usize, std::hash::BuildHasherDefault<Fnv>>,
    started: Vec<AtomicU64>,
    handled: Vec<AtomicU64>,
    /// When the last `publish` call returned.
    published: AtomicU64,
    count: AtomicUsize,
    all_handled: Notify,
    warm: AtomicUsize,
    warmed_up: Notify,
}

impl Probe {
    fn new(timed: &[EventEnvelope]) -> Self {
        Self {
            base: Instant::now(),
            index: timed
                .iter()
                .enumerate()
                .map(|(i, e)| (e.id().clone(), i))
                .collect(),
            started: timed.iter().map(|_| AtomicU64::new(0)).collect(),
            handled: timed.iter().map(|_| AtomicU64::new(0)).collect(),
            published: AtomicU64::new(0),
            count: AtomicUsize::new(0),
            all_handled: Notify::new(),
            warm: AtomicUsize::new(0),
            warmed_up: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
    }

    /// The handler: records the first delivery of each event (a redelivery is not counted).
    fn handle(&self, event: &EventEnvelope) {
        let now = self.now();
        match self.index.get(event.id()) {
            Some(&i) => {
                let first = self.handled[i]
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if first && self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.index.len() {
                    self.all_handled.notify_one();
                }
            }
            None => {
                if self.warm.fetch_add(1, Ordering::AcqRel) + 1 == WARM_UP {
                    self.warmed_up.notify_one();
                }
            }
        }
    }

    /// The rates and latencies, once every event was handled.
    fn sample(&self) -> Sample {
        let started: Vec<u64> = self
            .started
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect();
        let handled: Vec<u64> = self
            .handled
            .iter()
            .map(|h| h.load(Ordering::Acquire))
            .collect();
        let mut latencies: Vec<u64> = started
            .iter()
            .zip(&handled)
            .map(|(s, h)| h.saturating_sub(*s))
            .collect();
        latencies.sort_unstable();
        let first = started.iter().copied().min().unwrap_or(0);
        let last = handled.iter().copied().max().unwrap_or(0);
        let n = latencies.len();
        let published = self.published.load(Ordering::Acquire);
        Sample {
            rate: n as f64 / ((last - first) as f64 / 1e9),
            publish_rate: n as f64 / ((published - first) as f64 / 1e9),
            p50_us: latencies[n / 2] as f64 / 1e3,
            p99_us: latencies[(n * 99 / 100).min(n - 1)] as f64 / 1e3,
            max_us: latencies[n - 1] as f64 / 1e3,
            cpu: None,
        }
    }
}

/// One end-to-end measurement.
struct Sample {
    /// Events ÷ (first publish → last event handled).
    rate: f64,
    /// Events ÷ (first publish → last `publish` returned): how fast the publishers went.
    publish_rate: f64,
    p50_us: f64,
    p99_us: f64,
    /// The slowest event's latency: with many publishers, whether back-pressure is fair.
    max_us: f64,
    /// CPU per event, µs: this process's and the broker's (`None`: `/proc` unreadable).
    cpu: Option<(f64, f64)>,
}

/// `publish` → handler, `n` events by `concurrency` tasks, on fresh backends (deleted
/// afterwards, whatever happened).
async fn end_to_end(
    combination: Combination,
    env: &Env,
    n: usize,
    concurrency: usize,
) -> BenchResult<Sample> {
    let parts = combination.parts(env, true).await?;
    let sample = measure_end_to_end(combination, &parts, n, concurrency).await;
    (parts.cleanup)().await;
    sample
}

async fn measure_end_to_end(
    combination: Combination,
    parts: &Parts,
    n: usize,
    concurrency: usize,
) -> BenchResult<Sample> {
    let mut builder = EventOrchestrator::builder().store(Arc::clone(&parts.store));
    if let Some(transport) = &parts.transport {
        builder = builder.transport(Arc::clone(transport));
    }
    let orchestrator = builder.build().await?;
    let timed = events(n);
    let probe = Arc::new(Probe::new(&timed));
    let handler_probe = Arc::clone(&probe);
    let subscription = orchestrator
        .subscribe(EVENT_TYPE, move |event: EventEnvelope| {
            handler_probe.handle(&event);
            async { Ok::<_, HandlerError>(()) }
        })
        .await?;
    orchestrator.start_relay();

    for event in events(WARM_UP) {
        orchestrator.publish(event).await?;
    }
    tokio::time::timeout(PATIENCE, probe.warmed_up.notified())
        .await
        .map_err(|_| format!("{}: the warm-up events did not arrive", combination.name()))?;

    // With `E2E_BENCH_TRACE` set: where the events are every 100 ms, to tell a relay that
    // lags (relayed far behind stored) from a subscriber that does (handled behind relayed).
    let tracer = std::env::var_os("E2E_BENCH_TRACE").map(|_| {
        let (orchestrator, probe, store) = (
            orchestrator.clone(),
            probe.clone(),
            Arc::clone(&parts.store),
        );
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                eprintln!(
                    "  {:>6} ms: stored up to {}, relayed up to {}, handled {}",
                    start.elapsed().as_millis(),
                    store.head_position().await.unwrap_or(0),
                    orchestrator.relay_status().relayed_position,
                    probe.count.load(Ordering::Acquire),
                );
            }
        })
    });
    // Task `t` publishes events t, t + concurrency, t + 2 × concurrency, … one by one.
    let timed: Arc<[EventEnvelope]> = timed.into();
    let cpu_before = CpuTime::now(combination);
    let mut publishers = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let (orchestrator, probe, timed) = (orchestrator.clone(), probe.clone(), timed.clone());
        publishers.push(tokio::spawn(async move {
            for i in (task..timed.len()).step_by(concurrency) {
                probe.started[i].store(probe.now(), Ordering::Release);
                orchestrator.publish(timed[i].clone()).await?;
            }
            probe.published.fetch_max(probe.now(), Ordering::AcqRel);
            Ok::<_, orchestrator::Error>(())
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    tokio::time::timeout(PATIENCE, probe.all_handled.notified())
        .await
        .map_err(|_| {
            format!(
                "{}: {} of {n} events handled after {}s (relay: {:?})",
                combination.name(),
                probe.count.load(Ordering::Acquire),
                PATIENCE.as_secs(),
                orchestrator.relay_status()
            )
        })?;
    let cpu_after = CpuTime::now(combination);
    if let Some(tracer) = tracer {
        tracer.abort();
    }
    let mut sample = probe.sample();
    sample.cpu = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| after.per_event(before, n));
    drop(subscription);
    orchestrator.shutdown(Duration::from_secs(10)).await;
    Ok(sample)
}

/// The store's plain `append`, `n` events of one each by `concurrency` tasks, on a fresh
/// store (deleted afterwards): events/s, and the CPU per event (as [`Sample::cpu`]).
async fn plain_append(
    combination: Combination,
    env: &Env,
    n: usize,
    concurrency: usize,
) -> BenchResult<(f64, Option<(f64, f64)>)> {
    let parts = combination.parts(env, false).await?;
    let rate = measure_append(combination, Arc::clone(&parts.store), n, concurrency).await;
    (parts.cleanup)().await;
    rate
}

async fn measure_append(
    combination: Combination,
    store: Arc<dyn EventStore>,
    n: usize,
    concurrency: usize,
) -> BenchResult<(f64, Option<(f64, f64)>)> {
    for event in events(WARM_UP) {
        store
            .append(EVENT_TYPE, ExpectedVersion::Any, vec![event])
            .await?;
    }
    let timed: Arc<[EventEnvelope]> = events(n).into();
    let cpu_before = CpuTime::now(combination);
    let started = Instant::now();
    let mut appenders = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let (store, timed) = (Arc::clone(&store), timed.clone());
        appenders.push(tokio::spawn(async move {
            for i in (task..timed.len()).step_by(concurrency) {
                store
                    .append(EVENT_TYPE, ExpectedVersion::Any, vec![timed[i].clone()])
                    .await?;
            }
            Ok::<_, orchestrator::core::Error>(())
        }));
    }
    for appender in appenders {
        appender.await??;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(CpuTime::now(combination))
        .map(|(before, after)| after.per_event(before, n));
    Ok((rate, cpu))
}

/// Whether the combination's broker answers; why not, if it does not.
async fn reachable(combination: Combination, env: &Env) -> Result<(), String> {
    let (service, address) = match combination {
        Combination::Memory | Combination::FileInProcess => return Ok(()),
        Combination::FileRedis | Combination::Redis => ("Redis", env.redis.clone()),
        Combination::RabbitMq => ("RabbitMQ", orchestrator::connect::redact(&env.amqp)),
        Combination::Kafka => ("Kafka", env.kafka.clone()),
    };
    let probe = async {
        let parts = combination.parts(env, true).await?;
        (parts.cleanup)().await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    match tokio::time::timeout(Duration::from_secs(30), probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{service} at {address} is unreachable ({e})")),
        Err(_) => Err(format!(
            "{service} at {address} does not answer within 30 s"
        )),
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A combination at one concurrency: every round's figures.
struct Row {
    combination: Combination,
    concurrency: usize,
    events: usize,
    samples: Vec<Sample>,
    appends: Vec<f64>,
    /// The plain appends' CPU per event, as [`Sample::cpu`].
    append_cpu: Vec<(f64, f64)>,
}

impl Row {
    fn print(&self) {
        let ratios = self
            .samples
            .iter()
            .zip(&self.appends)
            .map(|(s, a)| s.rate / a)
            .collect();
        println!(
            "{:<20} {:>11} {:>8} {:>10.0} {:>9.1} {:>9.1} {:>12.0} {:>11.2} {:>12.0} {:>10.1}",
            self.combination.name(),
            self.concurrency,
            self.events,
            median(self.samples.iter().map(|s| s.rate).collect()),
            median(self.samples.iter().map(|s| s.p50_us).collect()),
            median(self.samples.iter().map(|s| s.p99_us).collect()),
            median(self.appends.clone()),
            median(ratios),
            median(self.samples.iter().map(|s| s.publish_rate).collect()),
            median(self.samples.iter().map(|s| s.max_us).collect()),
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rounds = std::env::var("E2E_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
        .max(1);
    let env = Env {
        redis: services::redis_url(),
        amqp: services::amqp_url(),
        kafka: services::kafka_brokers(),
        run: EventId::new().as_str().replace('-', ""),
        made: AtomicUsize::new(0),
    };
    println!(
        "e2e bench: 1 subscriber, payload {} B of JSON, {rounds} rounds, medians; file store: \
         FsyncPolicy::EveryAppend (the default: one sync per group of appends); Kafka: fetch \
         wait 10 ms; relay: default options",
        payload().len()
    );
    let mut rows = Vec::new();
    for combination in COMBINATIONS.into_iter().filter(|c| c.picked(&filters)) {
        if let Some(feature) = combination.missing_feature() {
            println!(
                "e2e skipped: {}: built without the `{feature}` feature",
                combination.name()
            );
            continue;
        }
        if let Err(why) = reachable(combination, &env).await {
            if services::is_ci() {
                panic!("CI=true: e2e {}: {why}", combination.name());
            }
            println!("e2e skipped: {}: {why}", combination.name());
            continue;
        }
        for concurrency in CONCURRENCY {
            let events = combination.events(concurrency);
            eprintln!(
                "e2e: {} at concurrency {concurrency}, {events} events",
                combination.name()
            );
            let mut row = Row {
                combination,
                concurrency,
                events,
                samples: Vec::new(),
                appends: Vec::new(),
                append_cpu: Vec::new(),
            };
            // A measurement that fails (a backend error, events that never arrive) ends its
            // row: the bench says so and goes on with the others.
            let measured = async {
                for round in 0..rounds {
                    // End to end first in even rounds, last in odd ones.
                    for step in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                        if step == 0 {
                            let sample =
                                end_to_end(combination, &env, events, concurrency)
                                    .await
                                    .map_err(|e| format!("end to end, round {}: {e}", round + 1))?;
                            row.samples.push(sample);
                        } else {
                            let (rate, cpu) = plain_append(combination, &env, events, concurrency)
                                .await
                                .map_err(|e| format!("plain append, round {}: {e}", round + 1))?;
                            row.appends.push(rate);
                            row.append_cpu.extend(cpu);
                        }
                    }
                }
                Ok::<_, String>(())
            };
            if let Err(why) = measured.await {
                println!(
                    "e2e failed: {} at concurrency {concurrency}: {why}",
                    combination.name()
                );
                continue;
            }
            rows.push(row);
        }
    }
    print_cpu(&rows, rounds);
    println!("\nfacade end to end (publish → handler) vs plain append, medians of {rounds} rounds");
    println!(
        "{:<20} {:>11} {:>8} {:>10} {:>9} {:>9} {:>12} {:>11} {:>12} {:>10}",
        "combination",
        "concurrency",
        "events",
        "e2e ev/s",
        "p50 µs",
        "p99 µs",
        "append ev/s",
        "e2e/append",
        "publish ev/s",
        "max µs"
    );
    for row in &rows {
        row.print();
    }
    println!(
        "(e2e/append is the median of the per-round ratios; target >= 0.7, and p50 <= 50 µs for \
         memory/memory at concurrency 1, and max <= 10 × p50 in process at concurrency 64; \
         publish ev/s: events ÷ (first publish → last publish returned), how fast the \
         publishers went while the relay delivered; max µs: the slowest event's latency)"
    );
}

/// Where the CPU went, per event: this process and the broker, end to end against plain
/// append. Printed before the main table (whose parser reads the lines after its heading).
fn print_cpu(rows: &[Row], rounds: usize) {
    if rows.iter().all(|r| r.append_cpu.is_empty()) {
        return;
    }
    println!(
        "\nCPU per event, µs (this process + the broker's processes, from /proc), medians of {rounds} rounds"
    );
    println!(
        "{:<20} {:>11} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "combination",
        "concurrency",
        "e2e client",
        "e2e broker",
        "app client",
        "app broker",
        "e2e cores",
        "cpu ratio"
    );
    for row in rows {
        let e2e: Vec<(f64, f64)> = row.samples.iter().filter_map(|s| s.cpu).collect();
        if e2e.is_empty() || row.append_cpu.is_empty() {
            continue;
        }
        let client = median(e2e.iter().map(|c| c.0).collect());
        let broker = median(e2e.iter().map(|c| c.1).collect());
        let app_client = median(row.append_cpu.iter().map(|c| c.0).collect());
        let app_broker = median(row.append_cpu.iter().map(|c| c.1).collect());
        // Cores busy while end to end ran: CPU per event × events per second.
        let rate = median(row.samples.iter().map(|s| s.rate).collect());
        let cores = (client + broker) * rate / 1e6;
        println!(
            "{:<20} {:>11} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>10.2} {:>10.2}",
            row.combination.name(),
            row.concurrency,
            client,
            broker,
            app_client,
            app_broker,
            cores,
            (app_client + app_broker) / (client + broker),
        );
    }
    println!(
        "(cpu ratio: a plain append's CPU ÷ an end-to-end event's; on a machine whose cores are \
         all busy, the throughput ratio cannot be above it)"
    );
}
