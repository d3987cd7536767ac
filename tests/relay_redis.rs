//! The outbox relay on a Redis store shared by several processes: one relays, the others
//! stand by, and a standby takes over when the holder dies.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orchestrator::backends::redis::{RedisConfig, RedisEventStore, RedisTransport};
use orchestrator::core::testkit::services::{redis_url, unreachable};
use orchestrator::prelude::*;
use orchestrator::{RelayOptions, RelayState};
use serde_json::json;

async fn config(prefix: &str) -> Option<RedisConfig> {
    let url = redis_url();
    let config = RedisConfig::new(&url)
        .unwrap()
        .with_prefix(prefix.to_owned())
        .with_retry_for(Duration::from_secs(2));
    match tokio::time::timeout(
        Duration::from_secs(10),
        RedisTransport::connect(config.clone()),
    )
    .await
    {
        Ok(Ok(_)) => Some(config),
        Ok(Err(error)) => {
            unreachable("Redis", &url, &error);
            None
        }
        Err(elapsed) => {
            unreachable("Redis", &url, &elapsed);
            None
        }
    }
}

/// An application process: the shared Redis store and transport.
async fn process(config: &RedisConfig) -> EventOrchestrator {
    EventOrchestrator::builder()
        .store(Arc::new(
            RedisEventStore::connect(config.clone()).await.unwrap(),
        ))
        .transport(Arc::new(
            RedisTransport::connect(config.clone()).await.unwrap(),
        ))
        .build()
        .await
        .unwrap()
}

async fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_the_relay_when_the_holder_dies() {
    let prefix = format!("relay-failover-{}:", uuid_like());
    let Some(config) = config(&prefix).await else {
        return;
    };

    // The holder runs on a runtime of its own, so that it can die at once: dropping that
    // runtime drops its tasks mid-flight, without releasing the lease (as SIGKILL would).
    let holder_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let holder = {
        let config = config.clone();
        holder_runtime
            .spawn(async move { process(&config).await })
            .await
            .unwrap()
    };
    wait_until("the first process relays", Duration::from_secs(10), || {
        holder.relay_status().state == RelayState::Relaying
    })
    .await;
    let standbys = [process(&config).await, process(&config).await];
    wait_until("the others stand by", Duration::from_secs(10), || {
        standbys
            .iter()
            .all(|p| p.relay_status().state == RelayState::Standby)
    })
    .await;
    let lease = holder.relay_status().lease.unwrap();
    assert!(lease.contains("lease:relay.default"), "{lease}");

    // A consumer of its own (no relay), counting deliveries by event id.
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let consumer = EventOrchestrator::builder()
        .transport(Arc::new(
            RedisTransport::connect(config.clone()).await.unwrap(),
        ))
        .relay(RelayOptions::disabled())
        .build()
        .await
        .unwrap();
    let counted = Arc::clone(&seen);
    consumer
        .subscribe_with(
            SubscriptionConfig::new("failover.#").named("failover-check"),
            move |event: EventEnvelope| {
                let counted = Arc::clone(&counted);
                async move {
                    *counted
                        .lock()
                        .unwrap()
                        .entry(event.id().to_string())
                        .or_default() += 1;
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await
        .unwrap();

    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(
            standbys[0]
                .publish_event("failover.before", json!({ "n": i }))
                .await
                .unwrap(),
        );
    }
    wait_until(
        "the holder relays the first 300",
        Duration::from_secs(30),
        || seen.lock().unwrap().len() == 300,
    )
    .await;

    holder_runtime.shutdown_background();
    let died = Instant::now();
    for i in 0..300 {
        ids.push(
            standbys[1]
                .publish_event("failover.after", json!({ "n": i }))
                .await
                .unwrap(),
        );
    }
    wait_until(
        "a standby relays within the lease time (5 s) and its renewal period",
        Duration::from_secs(10),
        || {
            standbys
                .iter()
                .any(|p| p.relay_status().state == RelayState::Relaying)
        },
    )
    .await;
    let took_over = died.elapsed();
    wait_until("every event delivered", Duration::from_secs(30), || {
        seen.lock().unwrap().len() == 600
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(
        ids.iter().all(|id| seen.contains_key(&id.to_string())),
        "none lost"
    );
    let relaying = standbys
        .iter()
        .filter(|p| p.relay_status().state == RelayState::Relaying)
        .count();
    assert_eq!(relaying, 1, "exactly one process relays");
    eprintln!("a standby took over {took_over:?} after the holder died");

    for process in standbys {
        process.shutdown(Duration::from_secs(5)).await;
    }
    consumer.shutdown(Duration::from_secs(5)).await;
    delete_keys(config).await;
}

#[tokio::test]
async fn a_holder_that_shuts_down_hands_the_lease_over_at_once() {
    let prefix = format!("relay-handover-{}:", uuid_like());
    let Some(config) = config(&prefix).await else {
        return;
    };
    let first = process(&config).await;
    wait_until("the first process relays", Duration::from_secs(10), || {
        first.relay_status().state == RelayState::Relaying
    })
    .await;
    let second = process(&config).await;
    wait_until("the second stands by", Duration::from_secs(10), || {
        second.relay_status().state == RelayState::Standby
    })
    .await;
    first.shutdown(Duration::from_secs(5)).await;
    let stopped = Instant::now();
    // Released on shutdown: the standby needs only its next try (a third of 5 s).
    wait_until("the second relays", Duration::from_secs(4), || {
        second.relay_status().state == RelayState::Relaying
    })
    .await;
    eprintln!("handed over in {:?}", stopped.elapsed());
    // It resumes from the checkpoint the first one wrote when it stopped.
    second
        .publish_and_wait(EventEnvelope::new("handover.done", &json!({})).unwrap())
        .await
        .unwrap();
    second.shutdown(Duration::from_secs(5)).await;
    delete_keys(config).await;
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}-{}", std::process::id())
}

/// A restarted process of a named application rejoins its consumer group: what was
/// published while it was down reaches its unnamed subscription.
#[tokio::test]
async fn a_restarted_application_handles_what_was_published_while_it_was_down() {
    let prefix = format!("relay-rejoin-{}:", uuid_like());
    let Some(config) = config(&prefix).await else {
        return;
    };
    let app = |config: RedisConfig| async move {
        EventOrchestrator::builder()
            .application("shipping")
            .transport(Arc::new(RedisTransport::connect(config).await.unwrap()))
            .build()
            .await
            .unwrap()
    };
    let publisher = EventOrchestrator::builder()
        .transport(Arc::new(
            RedisTransport::connect(config.clone()).await.unwrap(),
        ))
        .build()
        .await
        .unwrap();
    let publish = |n: u64| {
        publisher.publish_and_wait(EventEnvelope::new("parcel.sent", &json!({ "n": n })).unwrap())
    };

    let first = app(config.clone()).await;
    let (subscription, mut rx) = support_collect(&first, "parcel.#").await;
    assert_eq!(subscription.name(), "shipping:parcel.all");
    publish(1).await.unwrap();
    assert_eq!(next_n(&mut rx).await, 1);
    first.shutdown(Duration::from_secs(5)).await;
    drop(first);

    // While the application is down.
    for n in 2..=4 {
        publish(n).await.unwrap();
    }

    let again = app(config.clone()).await;
    let (_subscription, mut rx) = support_collect(&again, "parcel.#").await;
    for n in 2..=4 {
        assert_eq!(next_n(&mut rx).await, n, "published while it was down");
    }
    again.shutdown(Duration::from_secs(5)).await;
    publisher.shutdown(Duration::from_secs(5)).await;
    delete_keys(config).await;
}

async fn support_collect(
    orchestrator: &EventOrchestrator,
    pattern: &str,
) -> (
    Subscription,
    tokio::sync::mpsc::UnboundedReceiver<EventEnvelope>,
) {
    support::collect(orchestrator, pattern).await
}

async fn next_n(rx: &mut tokio::sync::mpsc::UnboundedReceiver<EventEnvelope>) -> u64 {
    let event = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an event in time")
        .expect("the subscription is open");
    event.data::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

type Effects = Arc<Mutex<Vec<(&'static str, String, String)>>>;

/// Defines `trip` on `orchestrator`: three steps of 400 ms, each recording
/// (process, saga id, step) once done.
fn define_trip(orchestrator: &EventOrchestrator, process: &'static str, effects: &Effects) {
    let steps = ["book", "pay", "confirm"].map(|step| {
        let effects = Arc::clone(effects);
        SagaStep::new(step, move |context: serde_json::Value| {
            let effects = Arc::clone(&effects);
            async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let info = orchestrator::saga::StepInfo::from_context(&context).unwrap();
                effects
                    .lock()
                    .unwrap()
                    .push((process, info.saga_id, info.step));
                Ok::<_, HandlerError>(json!({}))
            }
        })
    });
    orchestrator.define_saga("trip", steps).unwrap();
}

/// Two processes run sagas on one Redis store. While both live, recovery leaves the other's
/// sagas alone (their runners hold their leases); when one dies, the other takes its sagas
/// over once their leases expire, and every saga completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_process_takes_over_the_sagas_of_a_dead_one() {
    let prefix = format!("saga-takeover-{}:", uuid_like());
    let Some(config) = config(&prefix).await else {
        return;
    };
    let effects: Effects = Arc::default();
    let doomed_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (doomed, ids) = {
        let (config, effects) = (config.clone(), Arc::clone(&effects));
        doomed_runtime
            .spawn(async move {
                let doomed = process(&config).await;
                define_trip(&doomed, "doomed", &effects);
                let mut ids = Vec::new();
                for n in 0..10 {
                    ids.push(
                        doomed
                            .spawn_saga("trip", json!({ "n": n }))
                            .await
                            .unwrap()
                            .id(),
                    );
                }
                (doomed, ids)
            })
            .await
            .unwrap()
    };
    let survivor = process(&config).await;
    define_trip(&survivor, "survivor", &effects);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recovery = survivor.sagas().recover().await.unwrap();
    assert!(recovery.resumed.is_empty(), "{:?}", recovery.resumed);
    assert_eq!(recovery.elsewhere.len(), 10, "all run by the live process");

    doomed_runtime.shutdown_background();
    drop(doomed);
    let died = Instant::now();
    assert!(
        effects.lock().unwrap().iter().all(|(p, ..)| *p == "doomed"),
        "nothing ran twice while both lived"
    );
    let _watch = survivor.sagas().watch_orphans(Duration::from_millis(500));
    wait_until("every saga completed", Duration::from_secs(60), || {
        ids.iter().all(|id| {
            survivor
                .sagas()
                .get(*id)
                .is_some_and(|h| h.status() == SagaStatus::Completed)
        })
    })
    .await;
    eprintln!(
        "took the sagas over and finished them {:?} after the death",
        died.elapsed()
    );
    let effects = effects.lock().unwrap().clone();
    for id in &ids {
        let id = id.as_uuid().to_string();
        for step in ["book", "pay", "confirm"] {
            let runs = effects
                .iter()
                .filter(|(_, s, st)| *s == id && st == step)
                .count();
            // A step cut off mid-way by the death runs again: at least once, at most twice.
            assert!(
                (1..=2).contains(&runs),
                "saga {id} step {step} ran {runs} times"
            );
        }
    }
    assert!(
        effects.iter().any(|(p, ..)| *p == "survivor"),
        "the survivor ran the rest"
    );
    survivor.shutdown(Duration::from_secs(5)).await;
    delete_keys(config).await;
}

/// Deletes every key under the test's prefix.
async fn delete_keys(config: RedisConfig) {
    RedisTransport::connect(config)
        .await
        .unwrap()
        .delete_all()
        .await
        .unwrap();
}
