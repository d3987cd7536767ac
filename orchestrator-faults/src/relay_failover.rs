//! Relay failover: several processes publish through `EventOrchestrator` on one Redis
//! store and Redis transport (a spare redis-server). Publishing only appends; the outbox
//! relay of one of them — the holder of the store's lease, the Redis key
//! `<prefix>lease:relay.default` (`SET NX PX`, 5 s, renewed every 5/3 s) — carries what
//! is stored to the transport. The parent reads the key to find the holder (its value is
//! `<pid>/<uuid>`), kills that process with SIGKILL, and measures how long until another
//! process holds the key (*takeover*) and until the subscriber receives an event published
//! after the kill (*flow back*); then it kills the new holder, and so on, until one process
//! is left, which it lets finish. Checked: each takeover within the lease's time plus a
//! standby's retry and a margin; every acknowledged publish stored; every stored event
//! delivered at least once (duplicates, events the new holder published again after the
//! last checkpoint of the dead one, are counted); publishing never stopped while nobody
//! relayed.
//!
//! The child process is this binary again (`faults failover-child <url> <prefix> <dir>`):
//! it says `opened`, then `relaying` / `standby` as its relay's state changes, publishes
//! until its stdin closes, then shuts down (its relay drains what is stored) and says `done`.

use crate::Failure;

/// The child's command-line name.
pub(crate) const CHILD: &str = "failover-child";

/// The parent: `children` processes, killing the relaying one until one is left.
pub(crate) fn parent(target: &str, children: usize) -> Result<(), Failure> {
    if target != "redis" {
        return Err(Failure::Failed(
            format!("unknown target `{target}` (redis)").into(),
        ));
    }
    #[cfg(feature = "redis")]
    {
        Ok(redis::parent(children)?)
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = children;
        Err(crate::not_built("redis"))
    }
}

/// The child: publish until told to finish.
pub(crate) fn child(args: &[String]) -> Result<(), Failure> {
    #[cfg(feature = "redis")]
    {
        let [url, prefix, dir] = args else {
            return Err(Failure::Failed(
                "usage: failover-child <url> <prefix> <dir>".into(),
            ));
        };
        let runtime = crate::runtime()?;
        Ok(runtime.block_on(redis::child(url, prefix, std::path::Path::new(dir)))?)
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = args;
        Err(crate::not_built("redis"))
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::collections::{BTreeSet, HashMap};
    use std::ffi::OsStr;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use orchestrator::backends::redis::{RedisConfig, RedisEventStore, RedisTransport};
    use orchestrator::prelude::*;
    use orchestrator::{RelayOptions, RelayState};
    use serde_json::json;

    use crate::child::{ChildProcess, Lines, epoch_ms, read_ids, say, stdin_closed};
    use crate::spare::SpareRedis;
    use crate::{Report, Res, ensure};

    /// The event type published.
    const EVENT_TYPE: &str = "failover.event";
    /// The named subscription that records deliveries.
    const GROUP: &str = "failover-check";
    /// Publishing tasks per child.
    const TASKS: usize = 2;
    /// Each task's pause between publishes.
    const PAUSE: Duration = Duration::from_millis(10);
    /// The Redis store's lease time (`RedisEventStore::lease`).
    const LEASE_TTL: Duration = Duration::from_secs(5);
    /// How long the holder relays before it is killed.
    const STEADY: Duration = Duration::from_millis(1500);
    /// The longest acceptable takeover: the lease runs out at most its time to live after
    /// the kill, a standby tries again every third of it, and 2 s for a loaded machine.
    fn takeover_limit() -> Duration {
        LEASE_TTL + LEASE_TTL / 3 + Duration::from_secs(2)
    }

    fn config(url: &str, prefix: &str) -> Res<RedisConfig> {
        Ok(RedisConfig::new(url)?.with_prefix(prefix.to_owned()))
    }

    pub(super) async fn child(url: &str, prefix: &str, dir: &Path) -> Res {
        let orchestrator = EventOrchestrator::builder()
            .store(Arc::new(
                RedisEventStore::connect(config(url, prefix)?).await?,
            ))
            .transport(Arc::new(
                RedisTransport::connect(config(url, prefix)?).await?,
            ))
            .build()
            .await?;
        say("opened")?;
        // Tell the parent when this process starts or stops relaying.
        let watcher = {
            let orchestrator = orchestrator.clone();
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    let state = orchestrator.relay_status().state;
                    let word = match state {
                        RelayState::Relaying => Some("relaying"),
                        RelayState::Standby => Some("standby"),
                        _ => None,
                    };
                    if word.is_some() && word != last {
                        let _ = say(word.unwrap_or_default());
                        last = word;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let acked = Lines::open(&dir.join("acked"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (orchestrator, acked, stop) =
                (orchestrator.clone(), acked.clone(), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let pid = std::process::id();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let data = json!({ "pid": pid, "task": task, "seq": seq, "at_ms": epoch_ms() });
                    let id = orchestrator.publish_event(EVENT_TYPE, data).await?;
                    acked.write(&id.to_string())?;
                    seq += 1;
                    tokio::time::sleep(PAUSE).await;
                }
                Ok::<_, crate::BoxError>(())
            }));
        }
        stdin_closed().await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await??;
        }
        let report = orchestrator.shutdown(Duration::from_secs(60)).await;
        watcher.abort();
        ensure(report.unfinished.is_empty(), || {
            format!("unfinished at shutdown: {:?}", report.unfinished)
        })?;
        say("done")
    }

    /// What the parent's subscriber received.
    #[derive(Default)]
    struct Deliveries {
        /// Deliveries of each event id.
        counts: HashMap<String, usize>,
        /// Each delivery: when the event was published and when it arrived (ms since the
        /// epoch).
        times: Vec<(u64, u64)>,
    }

    impl Deliveries {
        /// When the first event published after `ms` arrived.
        fn first_published_after(&self, ms: u64) -> Option<u64> {
            self.times
                .iter()
                .filter(|(published, _)| *published > ms)
                .map(|(_, received)| *received)
                .min()
        }
    }

    /// One kill: how long until another process held the lease, and until an event
    /// published after the kill arrived.
    struct Takeover {
        takeover: Duration,
        flow_back: Duration,
        /// Events acknowledged by the children between the kill and the takeover.
        published_meanwhile: usize,
    }

    pub(super) fn parent(children: usize) -> Res {
        ensure(children >= 2, || {
            "relay-failover needs at least 2 children".to_owned()
        })?;
        let spare = SpareRedis::start()?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("orchestrator-faults-failover-{id}"));
        std::fs::create_dir_all(&dir)?;
        let result = scenario(&spare, &format!("failover-{id}:"), &dir, children);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// The holder of the relay lease, as a process id (`None`: nobody holds it).
    fn holder(spare: &SpareRedis, key: &str) -> Option<u32> {
        spare.get(key)?.split('/').next()?.parse().ok()
    }

    fn scenario(spare: &SpareRedis, prefix: &str, dir: &Path, children: usize) -> Res {
        let url = spare.url();
        let lease_key = format!("{prefix}lease:relay.default");
        eprintln!(
            "relay-failover: {children} processes publish on one Redis store + Redis transport \
             (a spare redis-server); the relay lease holder is SIGKILLed until one is left"
        );
        // Its handlers run on the runtime's workers while this thread kills and waits.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        // The subscriber lives in this process, which is never killed; it does not relay.
        let deliveries: Arc<Mutex<Deliveries>> = Arc::default();
        let (subscriber, subscription) = runtime.block_on(async {
            let orchestrator = EventOrchestrator::builder()
                .transport(Arc::new(
                    RedisTransport::connect(config(&url, prefix)?).await?,
                ))
                .relay(RelayOptions::disabled())
                .build()
                .await?;
            let seen = Arc::clone(&deliveries);
            let subscription = orchestrator
                .subscribe_with(
                    SubscriptionConfig::new(EVENT_TYPE).named(GROUP),
                    move |event: EventEnvelope| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let data = event.data::<serde_json::Value>()?;
                            let published = data["at_ms"].as_u64().unwrap_or(0);
                            let mut seen = seen
                                .lock()
                                .map_err(|_| HandlerError::permanent("poisoned"))?;
                            *seen.counts.entry(event.id().to_string()).or_insert(0) += 1;
                            seen.times.push((published, epoch_ms()));
                            Ok::<_, HandlerError>(())
                        }
                    },
                )
                .await?;
            Ok::<_, crate::BoxError>((orchestrator, subscription))
        })?;

        let started = Instant::now();
        let exe = std::env::current_exe()?;
        let mut live = Vec::new();
        for _ in 0..children {
            let child = ChildProcess::spawn(
                &exe,
                [
                    OsStr::new(super::CHILD),
                    OsStr::new(&url),
                    OsStr::new(prefix),
                    dir.as_os_str(),
                ],
            )?;
            live.push(child);
        }
        for child in &mut live {
            child.expect("opened", Duration::from_secs(60))?;
        }
        let mut takeovers = Vec::new();
        while live.len() > 1 {
            takeovers.push(kill_holder(spare, &lease_key, &mut live, &deliveries, dir)?);
        }
        // The last one publishes a while on its own, then drains and ends.
        std::thread::sleep(STEADY);
        let mut last = live.pop().ok_or("no child left")?;
        last.close_stdin();
        let status = last.wait(Duration::from_secs(120))?;
        let said = last.finish();
        ensure(status.success(), || {
            format!("the last child failed ({status})")
        })?;
        ensure(said.iter().any(|(_, l)| l == "done"), || {
            "the last child did not say done".to_owned()
        })?;

        // What the store holds, and what the subscriber received of it.
        let stored: BTreeSet<String> = runtime.block_on(async {
            let store = RedisEventStore::connect(config(&url, prefix)?).await?;
            let mut stored = BTreeSet::new();
            let mut from = 1;
            loop {
                let page = store
                    .read_all(
                        ReadAll::from(from, 10_000)
                            .filter(EventFilter::all().event_type(EVENT_TYPE)),
                    )
                    .await?;
                let Some(last) = page.last().and_then(EventEnvelope::global_position) else {
                    break;
                };
                stored.extend(page.iter().map(|e| e.id().to_string()));
                from = last + 1;
            }
            Ok::<_, crate::BoxError>(stored)
        })?;
        let waited = Instant::now();
        let delivered = loop {
            let delivered = deliveries.lock().map_err(|_| "poisoned")?.counts.clone();
            if stored.iter().all(|id| delivered.contains_key(id))
                || waited.elapsed() > Duration::from_secs(60)
            {
                break delivered;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        runtime.block_on(async {
            subscription.unsubscribe().await;
            subscriber.shutdown(Duration::from_secs(5)).await;
        });
        let took = started.elapsed();

        let acked = read_ids(&dir.join("acked"))?;
        let lost_acked = acked.keys().filter(|id| !stored.contains(*id)).count();
        let undelivered = stored
            .iter()
            .filter(|id| !delivered.contains_key(*id))
            .count();
        let unknown = delivered.keys().filter(|id| !stored.contains(*id)).count();
        let duplicates: usize = delivered.values().map(|n| n - 1).sum();
        let secs = |d: Duration| format!("{:.1}", d.as_secs_f64());
        let list = |f: fn(&Takeover) -> Duration| {
            takeovers
                .iter()
                .map(|t| secs(f(t)))
                .collect::<Vec<_>>()
                .join("/")
        };
        let max_takeover = takeovers
            .iter()
            .map(|t| t.takeover)
            .max()
            .unwrap_or_default();
        eprintln!(
            "  {} kills; takeover {} s, flow back {} s; {} acknowledged, {} stored, {} delivered \
             ({duplicates} duplicates), {lost_acked} acknowledged but not stored, {undelivered} \
             stored but never delivered; {took:.1?}",
            takeovers.len(),
            list(|t| t.takeover),
            list(|t| t.flow_back),
            acked.len(),
            stored.len(),
            delivered.len(),
        );
        ensure(max_takeover <= takeover_limit(), || {
            format!(
                "a takeover took {max_takeover:.1?}, over the limit {:.1?}",
                takeover_limit()
            )
        })?;
        ensure(takeovers.iter().all(|t| t.published_meanwhile > 0), || {
            "nothing was published while nobody relayed: publishing must not wait for the relay"
                .to_owned()
        })?;
        ensure(lost_acked == 0, || {
            format!("{lost_acked} acknowledged publishes are not in the store")
        })?;
        ensure(undelivered == 0, || {
            format!("{undelivered} stored events were never delivered")
        })?;
        ensure(unknown == 0, || {
            format!("{unknown} delivered events are not in the store")
        })?;
        let mut line = Report::new("relay-failover", "redis");
        line.add("children", children)
            .add("kills", takeovers.len())
            .add("takeover_s", list(|t| t.takeover))
            .add("takeover_limit_s", secs(takeover_limit()))
            .add("flow_back_s", list(|t| t.flow_back))
            .add(
                "published_while_unrelayed",
                takeovers
                    .iter()
                    .map(|t| t.published_meanwhile)
                    .sum::<usize>(),
            )
            .add("acked", acked.len())
            .add("stored", stored.len())
            .add("delivered", delivered.len())
            .add("duplicates", duplicates)
            .add("missing", lost_acked + undelivered)
            .add("seconds", secs(took));
        line.print();
        Ok(())
    }

    /// Waits for a live child to hold the lease and relay a while, kills it, and measures
    /// the takeover.
    fn kill_holder(
        spare: &SpareRedis,
        lease_key: &str,
        live: &mut Vec<ChildProcess>,
        deliveries: &Mutex<Deliveries>,
        dir: &Path,
    ) -> Res<Takeover> {
        let waited = Instant::now();
        let index = loop {
            let pid = holder(spare, lease_key);
            if let Some(i) = live.iter().position(|c| Some(c.pid()) == pid) {
                break i;
            }
            ensure(waited.elapsed() < Duration::from_secs(30), || {
                format!("no live child took the relay lease within 30 s (holder {pid:?})")
            })?;
            std::thread::sleep(Duration::from_millis(20));
        };
        for child in live.iter_mut() {
            if let Some(status) = child.try_wait()? {
                return Err(format!("child {} ended on its own ({status})", child.pid()).into());
            }
        }
        // Events must be flowing through this holder before it dies.
        let before = deliveries.lock().map_err(|_| "poisoned")?.times.len();
        std::thread::sleep(STEADY);
        let after = deliveries.lock().map_err(|_| "poisoned")?.times.len();
        ensure(after > before, || {
            "nothing was delivered while the holder relayed".to_owned()
        })?;
        let mut dead = live.remove(index);
        let dead_pid = dead.pid();
        let kill_ms = epoch_ms();
        let killed = Instant::now();
        dead.kill()?;
        let acked_at_kill = read_ids(&dir.join("acked"))?.len();
        let takeover = loop {
            let pid = holder(spare, lease_key);
            if pid.is_some_and(|p| p != dead_pid && live.iter().any(|c| c.pid() == p)) {
                break killed.elapsed();
            }
            ensure(killed.elapsed() < takeover_limit() * 3, || {
                format!(
                    "no process took the relay lease over within {:.1?} (holder {pid:?})",
                    takeover_limit() * 3
                )
            })?;
            std::thread::sleep(Duration::from_millis(10));
        };
        let published_meanwhile = read_ids(&dir.join("acked"))?
            .len()
            .saturating_sub(acked_at_kill);
        let flow_back = loop {
            let first = deliveries
                .lock()
                .map_err(|_| "poisoned")?
                .first_published_after(kill_ms);
            if let Some(received) = first {
                break Duration::from_millis(received.saturating_sub(kill_ms));
            }
            ensure(killed.elapsed() < Duration::from_secs(60), || {
                "no event published after the kill was delivered within 60 s".to_owned()
            })?;
            std::thread::sleep(Duration::from_millis(10));
        };
        let new_holder = holder(spare, lease_key);
        eprintln!(
            "  killed the relay lease holder (pid {dead_pid}); pid {new_holder:?} took the lease \
             after {takeover:.1?}, events flowed again after {flow_back:.1?}; \
             {published_meanwhile} publishes acknowledged meanwhile"
        );
        Ok(Takeover {
            takeover,
            flow_back,
            published_meanwhile,
        })
    }
}
