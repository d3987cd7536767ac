//! The facade's inbox: the one fitting the store, and a subscription using it handling each
//! event once although the outbox relay publishes again, after a crash, what it had
//! published since its last checkpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator::RelayOptions;
use orchestrator::core::InMemoryInbox;
use orchestrator::prelude::*;
use serde_json::json;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

type Counts = Arc<Mutex<HashMap<EventId, u32>>>;

/// Subscribes `name` to `parcel.#`, counting the calls per event id.
async fn count(
    orchestrator: &EventOrchestrator,
    name: &str,
    inbox: Option<Arc<dyn Inbox>>,
    counts: Counts,
) -> Subscription {
    let mut config = SubscriptionConfig::new("parcel.#").named(name);
    if let Some(inbox) = inbox {
        config = config.inbox(inbox);
    }
    orchestrator
        .subscribe_with(config, move |event: EventEnvelope| {
            let counts = counts.clone();
            async move {
                *counts
                    .lock()
                    .unwrap()
                    .entry(event.id().clone())
                    .or_default() += 1;
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap()
}

async fn wait_for(counts: &Counts, id: &EventId) {
    timeout(WAIT, async {
        while !counts.lock().unwrap().contains_key(id) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("not handled in time");
}

#[tokio::test]
async fn the_inbox_fits_the_store() {
    let memory = EventOrchestrator::new();
    assert!(!memory.inbox().durable(), "{}", memory.inbox().describe());

    let dir = tempfile::tempdir().unwrap();
    let file = EventOrchestrator::builder()
        .store(Arc::new(FileEventStore::open(dir.path()).unwrap()))
        .build()
        .await
        .unwrap();
    assert!(file.inbox().durable());
    let id = EventId::new();
    file.inbox().record("billing", &id).await.unwrap();
    assert!(file.inbox().seen("billing", &id).await.unwrap());
    assert!(
        dir.path().join("inbox").is_dir(),
        "kept beside the segments"
    );

    let given: Arc<dyn Inbox> = Arc::new(InMemoryInbox::new(InboxRetention::last(5)));
    let chosen = EventOrchestrator::builder()
        .inbox(Arc::clone(&given))
        .build()
        .await
        .unwrap();
    assert_eq!(chosen.inbox().retention(), InboxRetention::last(5));
}

#[test]
fn a_relay_publishing_again_after_a_crash_is_absorbed_by_the_file_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let billing: Counts = Arc::default();
    let audit: Counts = Arc::default();
    // The relay checkpoints rarely, so that a crash leaves its whole work to do again.
    let open = |path: std::path::PathBuf| async move {
        EventOrchestrator::builder()
            .store(Arc::new(FileEventStore::open(path).unwrap()))
            .relay(
                RelayOptions::default()
                    .checkpoint_every(1_000_000)
                    .checkpoint_interval(Duration::from_secs(3600)),
            )
            .build()
            .await
            .unwrap()
    };
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };

    // The first process handles 20 events, then dies: its runtime is dropped, nothing is
    // shut down.
    let first_ids: Vec<EventId> = {
        let process = runtime();
        let (orchestrator, ids) = process.block_on(async {
            let orchestrator = open(dir.path().to_owned()).await;
            let _billing = count(
                &orchestrator,
                "billing",
                Some(orchestrator.inbox()),
                billing.clone(),
            )
            .await;
            let mut ids = Vec::new();
            for n in 0..20u64 {
                let event = EventEnvelope::new("parcel.sent", &json!({ "n": n })).unwrap();
                ids.push(event.id().clone());
                orchestrator.publish(event).await.unwrap();
            }
            wait_for(&billing, ids.last().unwrap()).await;
            (orchestrator, ids)
        });
        drop(process);
        drop(orchestrator);
        ids
    };

    // The restart: the relay publishes the 20 events again, and one more.
    let process = runtime();
    process.block_on(async {
        let orchestrator = open(dir.path().to_owned()).await;
        let _billing = count(
            &orchestrator,
            "billing",
            Some(orchestrator.inbox()),
            billing.clone(),
        )
        .await;
        // Without an inbox: sees what the relay publishes.
        let _audit = count(&orchestrator, "audit", None, audit.clone()).await;
        orchestrator.start_relay();
        let last = EventEnvelope::new("parcel.sent", &json!({ "n": 20 })).unwrap();
        let last_id = last.id().clone();
        orchestrator.publish(last).await.unwrap();
        wait_for(&billing, &last_id).await;
        wait_for(&audit, &last_id).await;
        orchestrator.shutdown(Duration::from_secs(10)).await;
    });

    let audit = audit.lock().unwrap();
    assert!(
        first_ids.iter().all(|id| audit.contains_key(id)),
        "the relay did not publish the first process's events again: the test proves nothing"
    );
    let billing = billing.lock().unwrap();
    assert_eq!(billing.len(), 21);
    assert!(
        billing.values().all(|calls| *calls == 1),
        "an event was handled twice: {billing:?}"
    );
}
