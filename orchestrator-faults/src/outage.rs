//! A broker outage under a publishing application: the Redis that carries the events goes
//! away for a few seconds while 8 tasks publish through `EventOrchestrator` on the file
//! store. Store-first delivery means `publish` keeps succeeding through the outage (it only
//! appends), and once Redis is back the outbox relay delivers every event: none lost.
//!
//! Redis is a spare redis-server of the scenario's own (AOF, fsync always), stopped with
//! `SHUTDOWN` and started again on the same port and data after the pause.

use crate::Failure;

/// Runs the scenario with `events` events.
pub(crate) async fn run(target: &str, events: usize) -> Result<(), Failure> {
    if target != "redis" {
        return Err(Failure::Failed(
            format!("unknown target `{target}` (redis)").into(),
        ));
    }
    #[cfg(feature = "redis")]
    {
        Ok(redis::run(events).await?)
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = events;
        Err(crate::not_built("redis"))
    }
}

/// The scenario on a spare Redis (feature `redis`).
#[cfg(feature = "redis")]
mod redis {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use orchestrator::prelude::*;
    use serde_json::json;

    use crate::{Report, Res, ensure};

    use orchestrator::backends::redis::{RedisConfig, RedisTransport};

    /// Tasks publishing at once.
    const PUBLISHERS: usize = 8;
    /// How long Redis stays down.
    const OUTAGE: Duration = Duration::from_secs(3);

    pub(super) async fn run(events: usize) -> Res {
        let spare = Arc::new(Mutex::new(crate::spare::SpareRedis::start()?));
        let url = spare.lock().map_err(|_| "poisoned")?.url();
        let dir = std::env::temp_dir().join(format!(
            "orchestrator-faults-outage-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let result = async {
            let transport = RedisTransport::connect(RedisConfig::new(&url)?).await?;
            let orchestrator = EventOrchestrator::builder()
                .store(Arc::new(FileEventStore::open(dir.join("store"))?))
                .transport(Arc::new(transport))
                .build()
                .await?;
            scenario(&orchestrator, spare, events).await
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn scenario(
        orchestrator: &EventOrchestrator,
        spare: Arc<Mutex<crate::spare::SpareRedis>>,
        events: usize,
    ) -> Res {
        eprintln!(
            "publisher-outage: file store + Redis transport; {PUBLISHERS} tasks publish {events} \
             events; at 30% Redis goes away for {OUTAGE:?}"
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

        // The outage, from a blocking thread: stop Redis at 30% published.
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
        eprintln!("  Redis was away {down:.1?}; {during} events were published meanwhile");

        let mut ids = Vec::with_capacity(events);
        let mut errors = 0;
        for task in tasks {
            let (task_ids, task_errors) = task.await?;
            ids.extend(task_ids);
            errors += task_errors;
        }
        // Every stored event must reach the subscriber once Redis is back.
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
        drop(spare);
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
            "nothing was published while Redis was away: the outage proved nothing".to_owned()
        })?;
        ensure(lost == 0, || {
            format!("{lost} stored events were never delivered")
        })?;
        ensure(status.dead_lettered == 0, || {
            format!("the relay dead-lettered {} events", status.dead_lettered)
        })?;
        let mut line = Report::new("publisher-outage", "file store + Redis transport");
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
