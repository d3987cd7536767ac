//! A broker outage under a publishing application: the broker that carries the events
//! (Redis, or RabbitMQ) goes away for a few seconds while 8 tasks publish through
//! `EventOrchestrator` on the file store. Store-first delivery means `publish` keeps
//! succeeding through the outage (it only appends), and once the broker is back the outbox
//! relay delivers every event: none lost.
//!
//! The broker is a spare of the scenario's own, stopped cleanly and started again on the
//! same ports and data after the pause: a redis-server (AOF, fsync always) gets `SHUTDOWN`;
//! a RabbitMQ node of its own (see [`crate::spare::SpareRabbitMq`]) gets SIGTERM — the
//! machine's shared RabbitMQ is never stopped.

use crate::Failure;

/// Runs the scenario with `events` events.
pub(crate) async fn run(target: &str, events: usize) -> Result<(), Failure> {
    #[cfg(not(any(feature = "redis", feature = "rabbitmq")))]
    let _ = events;
    match target {
        "redis" => {
            #[cfg(feature = "redis")]
            return Ok(spared::redis(events).await?);
            #[cfg(not(feature = "redis"))]
            return Err(crate::not_built("redis"));
        }
        "rabbitmq" => {
            #[cfg(feature = "rabbitmq")]
            return Ok(spared::rabbitmq(events).await?);
            #[cfg(not(feature = "rabbitmq"))]
            return Err(crate::not_built("rabbitmq"));
        }
        other => Err(Failure::Failed(
            format!("unknown target `{other}` (redis, rabbitmq)").into(),
        )),
    }
}

/// The scenario on a spare broker (features `redis`, `rabbitmq`).
#[cfg(any(feature = "redis", feature = "rabbitmq"))]
mod spared {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use orchestrator::prelude::*;
    use serde_json::json;

    use crate::{Report, Res, ensure};

    /// Tasks publishing at once.
    const PUBLISHERS: usize = 8;
    /// How long the broker stays down (its stop and boot come on top).
    const OUTAGE: Duration = Duration::from_secs(3);

    /// A spare broker the scenario stops and starts again.
    trait Spare: Send + 'static {
        /// Stops it, waits `pause`, starts it again; returns how long it was away.
        fn restart_after(&mut self, pause: Duration) -> Res<Duration>;
    }

    #[cfg(feature = "redis")]
    impl Spare for crate::spare::SpareRedis {
        fn restart_after(&mut self, pause: Duration) -> Res<Duration> {
            crate::spare::SpareRedis::restart_after(self, pause)
        }
    }

    #[cfg(feature = "rabbitmq")]
    impl Spare for crate::spare::SpareRabbitMq {
        fn restart_after(&mut self, pause: Duration) -> Res<Duration> {
            crate::spare::SpareRabbitMq::restart_after(self, pause)
        }
    }

    /// What the run is on, for the report.
    struct Target {
        name: &'static str,
        describe: &'static str,
        broker: &'static str,
    }

    /// A fresh folder for the run's file store.
    fn run_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "orchestrator-faults-outage-{}",
            uuid::Uuid::now_v7().simple()
        ))
    }

    /// On a spare redis-server, with the Redis transport.
    #[cfg(feature = "redis")]
    pub(super) async fn redis(events: usize) -> Res {
        use orchestrator::backends::redis::{RedisConfig, RedisTransport};
        let spare = Arc::new(Mutex::new(crate::spare::SpareRedis::start()?));
        let url = spare.lock().map_err(|_| "poisoned")?.url();
        let transport = RedisTransport::connect(RedisConfig::new(&url)?).await?;
        let target = Target {
            name: "redis",
            describe: "file store + Redis transport",
            broker: "Redis",
        };
        on_dir(Arc::new(transport), spare, events, &target).await
    }

    /// On a spare RabbitMQ node, with the RabbitMQ transport.
    #[cfg(feature = "rabbitmq")]
    pub(super) async fn rabbitmq(events: usize) -> Res {
        use orchestrator::backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
        eprintln!("publisher-outage: starting a spare RabbitMQ node");
        let booting = Instant::now();
        let spare = tokio::task::spawn_blocking(crate::spare::SpareRabbitMq::start).await??;
        eprintln!("  it listens after {:.1?}", booting.elapsed());
        let url = spare.url();
        let spare = Arc::new(Mutex::new(spare));
        let transport = RabbitMqTransport::connect(RabbitMqConfig::new(url)).await?;
        let target = Target {
            name: "rabbitmq",
            describe: "file store + RabbitMQ transport",
            broker: "RabbitMQ",
        };
        let result = on_dir(
            Arc::new(transport.clone()),
            Arc::clone(&spare),
            events,
            &target,
        )
        .await;
        transport.close().await;
        // The node stops (cleanly) when the last handle goes, off the runtime's threads.
        tokio::task::spawn_blocking(move || drop(spare)).await?;
        result
    }

    /// Runs the scenario on a file store of its own, removed afterwards.
    async fn on_dir<S: Spare>(
        transport: Arc<dyn Transport>,
        spare: Arc<Mutex<S>>,
        events: usize,
        target: &Target,
    ) -> Res {
        let dir = run_dir();
        let result = on_store(transport, spare, events, target, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn on_store<S: Spare>(
        transport: Arc<dyn Transport>,
        spare: Arc<Mutex<S>>,
        events: usize,
        target: &Target,
        dir: &Path,
    ) -> Res {
        let orchestrator = EventOrchestrator::builder()
            .store(Arc::new(FileEventStore::open(dir.join("store"))?))
            .transport(transport)
            .build()
            .await?;
        scenario(&orchestrator, spare, events, target).await
    }

    async fn scenario<S: Spare>(
        orchestrator: &EventOrchestrator,
        spare: Arc<Mutex<S>>,
        events: usize,
        target: &Target,
    ) -> Res {
        let broker = target.broker;
        eprintln!(
            "publisher-outage: {}; {PUBLISHERS} tasks publish {events} events; at 30% {broker} \
             goes away for {OUTAGE:?} (its stop and start on top)",
            target.describe
        );
        let delivered: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen = Arc::clone(&delivered);
        let _subscription = orchestrator
            .subscribe_with(
                SubscriptionConfig::new("outage.#").named("outage-check"),
                move |event: EventEnvelope| {
                    let seen = Arc::clone(&seen);
                    async move {
                        *seen
                            .lock()
                            .map_err(|_| HandlerError::permanent("poisoned"))?
                            .entry(event.id().to_string())
                            .or_insert(0) += 1;
                        Ok::<_, HandlerError>(())
                    }
                },
            )
            .await?;

        let started = Instant::now();
        let published = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for task in 0..PUBLISHERS {
            let (orchestrator, published) = (orchestrator.clone(), Arc::clone(&published));
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                let mut errors = 0usize;
                for seq in (task..events).step_by(PUBLISHERS) {
                    match orchestrator
                        .publish_event("outage.event", json!({ "seq": seq }))
                        .await
                    {
                        Ok(id) => ids.push(id.to_string()),
                        Err(e) => {
                            errors += 1;
                            eprintln!("  publish failed: {e}");
                        }
                    }
                    published.fetch_add(1, Ordering::Relaxed);
                    // Spread the publishing over the outage, as an application would.
                    if seq % 64 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                (ids, errors)
            }));
        }

        // The outage, from a blocking thread: stop the broker at 30% published.
        while published.load(Ordering::Relaxed) < events * 3 / 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = published.load(Ordering::Relaxed);
        // A clone goes to the thread: the last handle dropped stops the server for good.
        let restarting = Arc::clone(&spare);
        let down = tokio::task::spawn_blocking(move || {
            let mut spare = restarting.lock().map_err(|_| "poisoned")?;
            spare.restart_after(OUTAGE)
        })
        .await??;
        let during = published.load(Ordering::Relaxed) - before;
        eprintln!("  {broker} was away {down:.1?}; {during} events were published meanwhile");

        let mut ids = Vec::with_capacity(events);
        let mut errors = 0;
        for task in tasks {
            let (task_ids, task_errors) = task.await?;
            ids.extend(task_ids);
            errors += task_errors;
        }
        // Every stored event must reach the subscriber once the broker is back.
        let waited = Instant::now();
        loop {
            let count = delivered.lock().map_err(|_| "poisoned")?.len();
            if count >= ids.len() || waited.elapsed() > Duration::from_secs(120) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = started.elapsed();
        let delivered = delivered.lock().map_err(|_| "poisoned")?.clone();
        let lost = ids.iter().filter(|id| !delivered.contains_key(*id)).count();
        let redeliveries: usize = delivered.values().map(|n| n - 1).sum();
        let status = orchestrator.relay_status();
        orchestrator.shutdown(Duration::from_secs(5)).await;
        eprintln!(
            "  {} published ({errors} publish errors), {} delivered, {redeliveries} redeliveries, \
             {lost} lost; relay {:?}; {took:.1?}",
            ids.len(),
            delivered.len(),
            status.state
        );
        ensure(errors == 0, || {
            format!("{errors} publishes failed during the outage: publish must only append")
        })?;
        ensure(during > 0, || {
            format!("nothing was published while {broker} was away: the outage proved nothing")
        })?;
        ensure(lost == 0, || {
            format!("{lost} stored events were never delivered")
        })?;
        ensure(status.dead_lettered == 0, || {
            format!("the relay dead-lettered {} events", status.dead_lettered)
        })?;
        let mut line = Report::new("publisher-outage", target.name);
        line.add("events", ids.len())
            .add("published_during_outage", during)
            .add("publish_errors", errors)
            .add("delivered", delivered.len())
            .add("redeliveries", redeliveries)
            .add("lost", lost)
            .add("downtime_ms", down.as_millis())
            .add("seconds", format!("{:.1}", took.as_secs_f64()));
        line.print();
        Ok(())
    }
}
