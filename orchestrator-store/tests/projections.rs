//! Projection runners: catch-up then live, no skips under racing appends, checkpoints in the
//! store, restarts, exactly-once through a stored position, retries, parking and rebuilds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::ExpectedVersion::Any;
use orchestrator_core::{
    EventEnvelope, EventFilter, EventStore, HandlerError, Jitter, ManualClock, ReadAll, RetryPolicy,
};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
use orchestrator_store::projection::{
    CHECKPOINT_EVENT_TYPE, HandlerProjection, Projection, ProjectionOptions, ProjectionRunner,
    ProjectionState, checkpoint_stream, load_checkpoint,
};
use tokio::task::JoinSet;

/// Records every position applied; fails at chosen positions.
#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<u64>>,
    /// Position → how many more times to fail there (`u32::MAX`: always, permanently).
    failures: Mutex<Vec<(u64, u32)>>,
    resets: Mutex<u32>,
    /// Report the last applied position as stored with the state (exactly-once mode).
    stores_position: bool,
}

impl Recorder {
    fn applied(&self) -> Vec<u64> {
        self.applied.lock().unwrap().clone()
    }
}

#[async_trait]
impl Projection for Recorder {
    async fn apply(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        let position = event.global_position().unwrap();
        for (at, left) in self.failures.lock().unwrap().iter_mut() {
            if *at == position && *left > 0 {
                if *left == u32::MAX {
                    return Err(HandlerError::permanent(format!("cannot apply {position}")));
                }
                *left -= 1;
                return Err(HandlerError::retryable(format!("busy at {position}")));
            }
        }
        self.applied.lock().unwrap().push(position);
        Ok(())
    }

    async fn reset(&self) -> Result<(), HandlerError> {
        self.applied.lock().unwrap().clear();
        *self.resets.lock().unwrap() += 1;
        Ok(())
    }

    async fn stored_position(&self) -> Result<Option<u64>, HandlerError> {
        Ok(self
            .stores_position
            .then(|| self.applied.lock().unwrap().last().copied().unwrap_or(0)))
    }
}

fn event(n: u64) -> EventEnvelope {
    EventEnvelope::new("test.counted", &n).unwrap()
}

async fn append_n(store: &dyn EventStore, stream: &str, n: u64) -> u64 {
    let mut last = 0;
    for i in 0..n {
        last = store
            .append(stream, Any, vec![event(i)])
            .await
            .unwrap()
            .last_position;
    }
    last
}

/// The positions of every non-system event, in order.
async fn user_positions(store: &dyn EventStore) -> Vec<u64> {
    store
        .read_all(ReadAll::from(0, usize::MAX))
        .await
        .unwrap()
        .iter()
        .filter(|e| !e.stream_id().unwrap().starts_with('$'))
        .map(|e| e.global_position().unwrap())
        .collect()
}

fn file_store(dir: &tempfile::TempDir) -> Arc<dyn EventStore> {
    let options = FileStoreOptions::default().fsync(FsyncPolicy::Never);
    Arc::new(FileEventStore::open_with(dir.path(), options).unwrap())
}

#[tokio::test]
async fn catches_up_then_follows_live_with_the_checkpoint_in_the_store() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    append_n(&*store, "s", 50).await;
    let projection = Arc::new(Recorder::default());
    let handle = ProjectionRunner::new(store.clone(), "recorder", projection.clone()).spawn();
    let status = handle.wait_for_position(50).await.unwrap();
    assert_eq!(status.applied, 50);
    let last = append_n(&*store, "s", 10).await;
    let status = handle.wait_for_position(last).await.unwrap();
    assert!(matches!(status.state, ProjectionState::Live), "{status:?}");
    let status = handle.stop().await;
    assert_eq!(status.state, ProjectionState::Stopped);
    assert_eq!(status.checkpoint, last);
    assert_eq!(projection.applied(), user_positions(&*store).await);
    assert_eq!(load_checkpoint(&*store, "recorder").await.unwrap(), last);
    let checkpoints = store
        .read_stream(&checkpoint_stream("recorder"), 1, 1000)
        .await
        .unwrap();
    assert!(!checkpoints.is_empty());
    assert!(
        checkpoints
            .iter()
            .all(|e| e.event_type() == CHECKPOINT_EVENT_TYPE)
    );
}

/// Four writers append single events and batches while the runner catches up and then
/// follows: the projection sees every event exactly once, in order.
async fn racing_appends_are_never_skipped(store: Arc<dyn EventStore>) {
    append_n(&*store, "before", 100).await;
    let projection = Arc::new(Recorder::default());
    let options = ProjectionOptions::default().checkpoint_every(7);
    let mut writers = JoinSet::new();
    for w in 0..4 {
        let store = store.clone();
        writers.spawn(async move {
            let mut last = 0;
            for n in 0..150 {
                let batch = (0..1 + n % 3).map(event).collect();
                last = store
                    .append(&format!("w{w}"), Any, batch)
                    .await
                    .unwrap()
                    .last_position;
                if n % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            last
        });
    }
    let handle = ProjectionRunner::new(store.clone(), "racer", projection.clone())
        .with_options(options)
        .spawn();
    let mut last = 0;
    while let Some(done) = writers.join_next().await {
        last = last.max(done.unwrap());
    }
    handle.wait_for_position(last).await.unwrap();
    let status = handle.stop().await;
    let applied = projection.applied();
    let unique: HashSet<_> = applied.iter().collect();
    assert_eq!(unique.len(), applied.len(), "an event was applied twice");
    assert_eq!(
        applied,
        user_positions(&*store).await,
        "an event was skipped"
    );
    assert_eq!(status.applied as usize, applied.len());
    assert_eq!(applied.len(), 100 + 4 * 50 * (1 + 2 + 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_appends_are_never_skipped_in_memory() {
    racing_appends_are_never_skipped(Arc::new(InMemoryEventStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_appends_are_never_skipped_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileEventStore::open(dir.path()).unwrap();
    racing_appends_are_never_skipped(Arc::new(store)).await;
}

/// Stopping, reopening the store and starting again applies each event once.
#[tokio::test]
async fn a_restart_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let projection = Arc::new(Recorder::default());
    for round in 0..3 {
        let store = file_store(&dir);
        append_n(&*store, "s", 25).await;
        let head = store.head_position().await.unwrap();
        let last_user = *user_positions(&*store).await.last().unwrap();
        assert!(last_user <= head);
        let handle = ProjectionRunner::new(store.clone(), "restarts", projection.clone()).spawn();
        handle.wait_for_position(last_user).await.unwrap();
        let status = handle.stop().await;
        assert_eq!(status.applied, 25, "round {round}");
        assert_eq!(
            projection.applied(),
            user_positions(&*store).await,
            "round {round}"
        );
    }
}

/// A crash (an aborted runner) after events were applied but not checkpointed: with the
/// position stored in the projection's state, the restart resumes right after it.
#[tokio::test]
async fn a_stored_position_makes_a_crash_exactly_once() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    append_n(&*store, "s", 30).await;
    let projection = Arc::new(Recorder {
        stores_position: true,
        ..Recorder::default()
    });
    // State stored up to 20 (as by a previous run), no checkpoint written at all.
    projection.applied.lock().unwrap().extend(1..=20);
    assert_eq!(load_checkpoint(&*store, "exact").await.unwrap(), 0);
    let handle = ProjectionRunner::new(store.clone(), "exact", projection.clone()).spawn();
    handle.wait_for_position(30).await.unwrap();
    handle.abort();
    assert_eq!(projection.applied(), (1..=30).collect::<Vec<_>>());

    let handle = ProjectionRunner::new(store.clone(), "exact", projection.clone()).spawn();
    let last = append_n(&*store, "s", 5).await;
    handle.wait_for_position(last).await.unwrap();
    handle.stop().await;
    assert_eq!(projection.applied(), user_positions(&*store).await);
}

fn retry_options(clock: &ManualClock) -> ProjectionOptions {
    ProjectionOptions::default()
        .retry(RetryPolicy::exponential(3, Duration::from_secs(1)).with_jitter(Jitter::None))
        .clock(Arc::new(clock.clone()))
}

async fn sleeping(clock: &ManualClock) {
    // The runner registers its sleep right after publishing its status.
    while clock.sleepers() == 0 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_is_retried_then_parked_and_visible() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    append_n(&*store, "s", 10).await;
    let projection = Arc::new(Recorder::default());
    projection.failures.lock().unwrap().push((6, 5));
    let clock = ManualClock::starting_at_epoch();
    let handle = ProjectionRunner::new(store.clone(), "parks", projection.clone())
        .with_options(retry_options(&clock))
        .spawn();
    for (attempt, delay) in [(1, 1), (2, 2)] {
        let status = handle
            .wait_for(
                |s| matches!(s.state, ProjectionState::Retrying { attempt: a, .. } if a == attempt),
            )
            .await;
        assert_eq!(status.position, 5);
        sleeping(&clock).await;
        clock.advance(Duration::from_secs(delay));
    }
    let status = handle.wait_for(|s| s.is_finished()).await;
    assert_eq!(status.state, ProjectionState::Parked);
    let parked = status.parked.as_ref().unwrap();
    assert_eq!(parked.event.global_position(), Some(6));
    assert_eq!((parked.attempts, parked.retryable), (3, true));
    assert_eq!(parked.error, "busy at 6");
    assert_eq!((status.position, status.checkpoint), (5, 5));
    assert_eq!(load_checkpoint(&*store, "parks").await.unwrap(), 5);
    let stopped = handle.stop().await;
    assert_eq!(stopped.state, ProjectionState::Stopped);
    assert!(stopped.parked.is_some(), "the failing event stays visible");

    // Restarted (the trouble over), it begins with the failing event.
    projection.failures.lock().unwrap().clear();
    let handle = ProjectionRunner::new(store.clone(), "parks", projection.clone())
        .with_options(retry_options(&clock))
        .spawn();
    let status = handle
        .wait_for(|s| s.position == 10 || s.is_finished())
        .await;
    assert_eq!(status.position, 10, "{status:?}");
    handle.stop().await;
    assert_eq!(projection.applied(), (1..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_permanent_failure_parks_at_once() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    append_n(&*store, "s", 5).await;
    let projection = Arc::new(Recorder::default());
    projection.failures.lock().unwrap().push((3, u32::MAX));
    let handle = ProjectionRunner::new(store, "permanent", projection.clone()).spawn();
    let status = handle.wait_for(|s| s.is_finished()).await;
    let parked = status.parked.unwrap();
    assert_eq!((parked.attempts, parked.retryable), (1, false));
    assert_eq!(parked.error, "cannot apply 3");
    assert_eq!(projection.applied(), [1, 2]);
}

#[tokio::test]
async fn a_rebuild_starts_from_scratch() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let last = append_n(&*store, "s", 20).await;
    let projection = Arc::new(Recorder::default());
    let runner = || ProjectionRunner::new(store.clone(), "rebuilt", projection.clone());
    let handle = runner().spawn();
    handle.wait_for_position(last).await.unwrap();
    handle.stop().await;
    let handle = runner().rebuild().await.unwrap();
    handle.wait_for_position(last).await.unwrap();
    let status = handle.stop().await;
    assert_eq!(status.applied, 20);
    assert_eq!(*projection.resets.lock().unwrap(), 1);
    assert_eq!(projection.applied(), user_positions(&*store).await);
}

#[tokio::test]
async fn a_filtered_handler_projection_and_a_second_runner_of_the_same_name() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    store
        .append(
            "a",
            Any,
            vec![
                event(1),
                EventEnvelope::new("other.kind", &2).unwrap(),
                event(3),
            ],
        )
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let handler = move |e: EventEnvelope| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(e.global_position().unwrap());
            Ok::<_, HandlerError>(())
        }
    };
    let options = ProjectionOptions::default()
        .filter(EventFilter::all().event_type("test.counted"))
        .checkpoint_every(1);
    let first = ProjectionRunner::new(store.clone(), "twins", Arc::new(HandlerProjection(handler)))
        .with_options(options.clone())
        .spawn();
    first.wait_for_position(3).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [1, 3]);

    // A second runner under the same name starts from the same checkpoint; when both
    // write the next one, the loser finds the checkpoint stream moved and fails loudly.
    let twin = ProjectionRunner::new(store.clone(), "twins", Arc::new(Recorder::default()))
        .with_options(options)
        .spawn();
    twin.wait_for(|s| matches!(s.state, ProjectionState::Live))
        .await;
    let next = store
        .append("a", Any, vec![event(4)])
        .await
        .unwrap()
        .last_position;
    let (a, b) = tokio::join!(
        first.wait_for(|s| s.is_finished() || s.checkpoint == next),
        twin.wait_for(|s| s.is_finished() || s.checkpoint == next),
    );
    let failed = [&a, &b]
        .into_iter()
        .filter(|s| {
            matches!(&s.state, ProjectionState::Failed { error } if error.contains("another runner"))
        })
        .count();
    assert_eq!(failed, 1, "{a:?} {b:?}");
    assert!(a.checkpoint == next || b.checkpoint == next, "{a:?} {b:?}");
    first.stop().await;
    twin.stop().await;
}
