//! Dead letters in embedded mode: with a `file://` store and the in-process transport they
//! are kept on disk beside the store, and reprocessing and discarding survive restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use orchestrator::EventOrchestratorBuilder;
use orchestrator::bus::InMemoryDeadLetterQueue;
use orchestrator::prelude::*;
use orchestrator::store::FileDeadLetterQueue;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

const SUBSCRIPTION: &str = "billing";

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Subscribes the `billing` subscription with a handler that always fails for good.
async fn subscribe_failing(orchestrator: &EventOrchestrator) {
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("payment.requested").named(SUBSCRIPTION),
            |_event: EventEnvelope| async {
                Err::<(), _>(HandlerError::permanent("ledger rejected it"))
            },
        )
        .await
        .unwrap();
}

/// Subscribes the `billing` subscription with a handler that forwards what it gets.
async fn subscribe_working(
    orchestrator: &EventOrchestrator,
) -> mpsc::UnboundedReceiver<EventEnvelope> {
    let (tx, rx) = mpsc::unbounded_channel();
    orchestrator
        .subscribe_with(
            SubscriptionConfig::new("payment.requested").named(SUBSCRIPTION),
            move |event: EventEnvelope| {
                let tx = tx.clone();
                async move {
                    tx.send(event).ok();
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await
        .unwrap();
    rx
}

/// Waits until `count` letters are parked.
async fn wait_for_letters(orchestrator: &EventOrchestrator, count: usize) {
    let dead = orchestrator.dead_letters();
    timeout(Duration::from_secs(10), async {
        while dead.count().await.unwrap() < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the failed deliveries dead-lettered in time");
}

/// Runs an orchestrator on `builder` whose handler fails every `payment.requested`,
/// publishes `orders` of them, and stops it once all are dead-lettered.
async fn park(builder: EventOrchestratorBuilder, orders: &[&str]) -> Vec<DeadLetter> {
    let orchestrator = builder.build().await.unwrap();
    subscribe_failing(&orchestrator).await;
    for order in orders {
        orchestrator
            .publish_event("payment.requested", json!({ "order_id": order }))
            .await
            .unwrap();
    }
    wait_for_letters(&orchestrator, orders.len()).await;
    let letters = orchestrator
        .dead_letters()
        .list(&DeadLetterQuery::default())
        .await
        .unwrap();
    orchestrator.shutdown(Duration::from_secs(5)).await;
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_a_restart_and_are_reprocessed_there() {
    let dir = tempfile::tempdir().unwrap();
    let builder = || EventOrchestrator::builder().store_url(url(dir.path()));
    let parked = park(builder(), &["o-1"]).await;
    assert_eq!(parked.len(), 1);
    let letter = parked[0].clone();
    assert_eq!(letter.subscription, SUBSCRIPTION);
    assert_eq!(letter.reason, "ledger rejected it");
    let on_disk = FileDeadLetterQueue::dir_in_store(dir.path());
    assert_eq!(
        std::fs::read_dir(&on_disk).unwrap().count(),
        1,
        "one letter file"
    );

    // A new process on the same directory sees the letter, and reprocessing it delivers
    // the event to the new subscriber and removes the letter.
    let orchestrator = builder().build().await.unwrap();
    let dead = orchestrator.dead_letters();
    assert_eq!(dead.queue().name(), "file");
    assert_eq!(
        dead.list(&DeadLetterQuery::default()).await.unwrap(),
        std::slice::from_ref(&letter)
    );
    let mut rx = subscribe_working(&orchestrator).await;
    dead.reprocess(&letter.id).await.unwrap();
    let got = timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the reprocessed event in time")
        .unwrap();
    assert_eq!(got.id(), letter.event.id());
    assert_eq!(got.data::<serde_json::Value>().unwrap()["order_id"], "o-1");
    assert_eq!(dead.count().await.unwrap(), 0);
    orchestrator.shutdown(Duration::from_secs(5)).await;
    drop(orchestrator);

    // And it stays reprocessed.
    let orchestrator = builder().build().await.unwrap();
    assert_eq!(orchestrator.dead_letters().count().await.unwrap(), 0);
    assert_eq!(std::fs::read_dir(&on_disk).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_dead_letters_stay_gone_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // The store given by value, with `file_store`.
    let builder =
        || EventOrchestrator::builder().file_store(FileEventStore::open(dir.path()).unwrap());
    let parked = park(builder(), &["o-1", "o-2"]).await;
    assert_eq!(parked.len(), 2);

    let orchestrator = builder().build().await.unwrap();
    let discarded = orchestrator
        .dead_letters()
        .discard(&parked[0].id)
        .await
        .unwrap();
    assert_eq!(discarded, parked[0]);
    drop(orchestrator);

    for _restart in 0..2 {
        let orchestrator = builder().build().await.unwrap();
        let dead = orchestrator.dead_letters();
        assert_eq!(
            dead.list(&DeadLetterQuery::default()).await.unwrap(),
            [parked[1].clone()],
            "the discarded letter is gone, the other one kept"
        );
        assert!(dead.inspect(&parked[0].id).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_queue_or_another_store_keeps_dead_letters_off_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let on_disk = FileDeadLetterQueue::dir_in_store(dir.path());

    // A queue the user gives wins over the file one.
    let queue = Arc::new(InMemoryDeadLetterQueue::new());
    let builder = EventOrchestrator::builder()
        .store_url(url(dir.path()))
        .dead_letter_queue(queue.clone());
    park(builder, &["o-1"]).await;
    assert_eq!(queue.len().await.unwrap(), 1);
    assert!(!on_disk.exists(), "nothing parked on disk");

    // A file store given as a plain `Arc<dyn EventStore>` cannot be seen through: memory.
    let store: Arc<dyn EventStore> = Arc::new(FileEventStore::open(dir.path()).unwrap());
    let orchestrator = EventOrchestrator::builder()
        .store(store)
        .build()
        .await
        .unwrap();
    assert_eq!(orchestrator.dead_letters().queue().name(), "in-memory");
    drop(orchestrator);

    // The in-memory store keeps the in-memory queue.
    let orchestrator = EventOrchestrator::builder()
        .store_url("memory:")
        .build()
        .await
        .unwrap();
    assert_eq!(orchestrator.dead_letters().queue().name(), "in-memory");
}

/// The dead-letter cases of the transport conformance suite, on the in-process transport
/// parking its letters in a `FileDeadLetterQueue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_transport_passes_the_dead_letter_cases_on_the_file_queue() {
    use orchestrator::core::testkit::transport;
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(FileDeadLetterQueue::open(dir.path()).unwrap());
    let make = || InProcessTransport::with_dead_letter_queue(queue.clone());
    transport::dead_letter_parks_the_event(&make()).await;
    transport::dead_letter_queue_queries(&make()).await;
}
