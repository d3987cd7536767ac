//! Replay and temporal queries, on the in-memory and the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use orchestrator_core::ExpectedVersion::Any;
use orchestrator_core::{EventEnvelope, EventFilter, EventStore, HandlerError};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::file::FileEventStore;
use orchestrator_store::projection::Projection;
use orchestrator_store::replay::{Replay, ReplayProgress};
use orchestrator_store::temporal::{
    Aggregate, AsOf, fold_all, projection_state_at, stream_state_at,
};

fn minute(m: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(m)
}

/// 20 events: `n` in 0..20, type `deposit` (even) or `withdrawal` (odd), on `account-{n % 2}`,
/// at minute `n`, except that #10 happened at minute 3 (appended late); plus one checkpoint
/// in a system stream at position 11.
async fn history(store: &dyn EventStore) {
    for n in 0..20_i64 {
        let kind = if n % 2 == 0 { "deposit" } else { "withdrawal" };
        let time = if n == 10 { minute(3) } else { minute(n) };
        let e = EventEnvelope::new(kind, &n).unwrap().with_time(time);
        store
            .append(&format!("account-{}", n % 2), Any, vec![e])
            .await
            .unwrap();
        if n == 9 {
            let system = EventEnvelope::new("orchestrator.projection.checkpoint", &0).unwrap();
            store
                .append("$checkpoint-x", Any, vec![system])
                .await
                .unwrap();
        }
    }
}

async fn stores() -> Vec<(Arc<dyn EventStore>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let file: Arc<dyn EventStore> = Arc::new(FileEventStore::open(dir.path()).unwrap());
    let memory: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    for store in [&file, &memory] {
        history(&**store).await;
    }
    vec![(memory, None), (file, Some(dir))]
}

async fn replayed(replay: Replay, store: &dyn EventStore) -> (u64, Vec<i64>) {
    let mut seen = Vec::new();
    let count = replay
        .to_sink(store, |e| {
            seen.push(e.data::<i64>().unwrap());
            async { Ok(()) }
        })
        .await
        .unwrap();
    assert_eq!(count as usize, seen.len());
    (count, seen)
}

#[tokio::test]
async fn replay_selects_by_type_position_and_time() {
    for (store, _dir) in stores().await {
        let store = &*store;
        let (count, all) = replayed(Replay::all(), store).await;
        assert_eq!(
            (count, all),
            (20, (0..20).collect::<Vec<_>>()),
            "{}",
            store.name()
        );
        let (_, system) = replayed(Replay::all().include_system_streams(true), store).await;
        assert_eq!(system.len(), 21);
        let (_, deposits) = replayed(Replay::of_type("deposit"), store).await;
        assert_eq!(deposits, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]);
        // Position 12 is event #10 (the checkpoint sits at 11).
        let (_, from) = replayed(Replay::all().from_position(12).until_position(15), store).await;
        assert_eq!(from, [10, 11, 12, 13]);
        let (_, window) = replayed(
            Replay::of_type("deposit")
                .from_time(minute(3))
                .until_time(minute(8)),
            store,
        )
        .await;
        assert_eq!(window, [4, 6, 10], "{}", store.name());
    }
}

#[tokio::test]
async fn replay_reports_progress_and_ends_at_the_head_it_started_with() {
    for (store, _dir) in stores().await {
        let reports: Arc<Mutex<Vec<ReplayProgress>>> = Arc::default();
        let sink_store = store.clone();
        let log = reports.clone();
        let count = Replay::all()
            .page_size(4)
            .on_progress(move |p| log.lock().unwrap().push(*p))
            .to_sink(&*store, |e| {
                let store = sink_store.clone();
                async move {
                    // Appending during the replay does not make it longer.
                    let more = EventEnvelope::new("late", &e.data::<i64>()?)?;
                    store.append("late", Any, vec![more]).await?;
                    Ok(())
                }
            })
            .await
            .unwrap();
        assert_eq!(count, 20);
        let reports = reports.lock().unwrap().clone();
        assert!(reports.len() >= 6, "{reports:?}");
        assert!(
            reports
                .windows(2)
                .all(|w| w[0].position <= w[1].position && w[0].processed <= w[1].processed)
        );
        let last = reports.last().unwrap();
        assert!(
            last.done && last.processed == 20 && last.position == 21 && last.end_position == 21
        );
        assert_eq!(last.fraction(1), 1.0);
        assert!(reports.iter().filter(|p| p.done).count() == 1);
        assert_eq!(store.head_position().await.unwrap(), 41);
    }
}

#[tokio::test]
async fn a_failing_handler_stops_the_replay() {
    let store = InMemoryEventStore::new();
    history(&store).await;
    let handled = Arc::new(Mutex::new(0));
    let counter = handled.clone();
    let handler = move |e: EventEnvelope| {
        let counter = counter.clone();
        async move {
            if e.data::<i64>()? == 5 {
                return Err(HandlerError::permanent("five"));
            }
            *counter.lock().unwrap() += 1;
            Ok(())
        }
    };
    let err = Replay::all()
        .to_handler(&store, &handler)
        .await
        .unwrap_err();
    assert!(matches!(err, orchestrator_core::Error::Handler(_)), "{err}");
    assert_eq!(*handled.lock().unwrap(), 5);
}

#[derive(Default, Debug, PartialEq)]
struct Balance {
    cents: i64,
    moves: u32,
}

impl Aggregate for Balance {
    fn apply(&mut self, event: &EventEnvelope) -> orchestrator_core::Result<()> {
        let n: i64 = event.data()?;
        self.cents += if event.event_type() == "deposit" {
            n
        } else {
            -n
        };
        self.moves += 1;
        Ok(())
    }
}

#[tokio::test]
async fn a_streams_state_as_of_a_position_or_a_time() {
    for (store, _dir) in stores().await {
        let store = &*store;
        // account-0 holds the deposits 0, 2, …, 18 at positions 1, 3, …, 9, 12, 14, …, 20.
        let latest = stream_state_at::<Balance>(store, "account-0", AsOf::Latest)
            .await
            .unwrap();
        assert_eq!(
            (latest.state.cents, latest.version, latest.position),
            (90, 10, 20)
        );
        let at_position = stream_state_at::<Balance>(store, "account-0", AsOf::Position(9))
            .await
            .unwrap();
        assert_eq!((at_position.state.cents, at_position.version), (20, 5));
        // By time: events at or before minute 4, whatever their order: 0, 2, 4 and #10 (at 3).
        let at_time = stream_state_at::<Balance>(store, "account-0", AsOf::Time(minute(4)))
            .await
            .unwrap();
        assert_eq!((at_time.state.cents, at_time.state.moves), (16, 4));
        let before = stream_state_at::<Balance>(store, "account-0", AsOf::Position(0))
            .await
            .unwrap();
        assert_eq!((before.state, before.version), (Balance::default(), 0));
        let missing = stream_state_at::<Balance>(store, "nope", AsOf::Latest)
            .await
            .unwrap();
        assert_eq!(missing.events, 0);
    }
}

#[tokio::test]
async fn a_read_models_state_as_of_a_position_or_a_time() {
    for (store, _dir) in stores().await {
        let store = &*store;
        let total = |as_of| {
            fold_all(
                store,
                EventFilter::all(),
                as_of,
                Balance::default(),
                |b, e| b.apply(e),
            )
        };
        assert_eq!(total(AsOf::Latest).await.unwrap().state.cents, -10);
        let at = total(AsOf::Position(12)).await.unwrap();
        // Events 0..=10 (the checkpoint at 11 is a system event): 0-1+2-…-9+10.
        assert_eq!((at.state.cents, at.events, at.position), (5, 11, 12));
        let early = total(AsOf::Time(minute(3))).await.unwrap();
        assert_eq!(
            (early.state.cents, early.state.moves),
            (8, 5),
            "0,1,2,3 and #10"
        );
        let deposits = fold_all(
            store,
            EventFilter::all().event_type("deposit"),
            AsOf::Position(9),
            0_i64,
            |sum, e| {
                *sum += e.data::<i64>()?;
                Ok(())
            },
        )
        .await
        .unwrap();
        assert_eq!(deposits.state, 20);
    }
}

#[derive(Default)]
struct Sum(Mutex<(i64, u32)>);

#[async_trait]
impl Projection for Sum {
    async fn apply(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        let mut sum = self.0.lock().unwrap();
        sum.0 += event.data::<i64>()?;
        sum.1 += 1;
        Ok(())
    }
    async fn reset(&self) -> Result<(), HandlerError> {
        *self.0.lock().unwrap() = (0, 0);
        Ok(())
    }
}

#[tokio::test]
async fn a_projections_state_as_of_a_point() {
    for (store, _dir) in stores().await {
        let store = &*store;
        let sum = Sum::default();
        *sum.0.lock().unwrap() = (1000, 1000);
        let applied = projection_state_at(store, &sum, EventFilter::all(), AsOf::Position(5))
            .await
            .unwrap();
        assert_eq!(
            (applied, *sum.0.lock().unwrap()),
            (5, (10, 5)),
            "reset, then 0..5"
        );
        let applied = projection_state_at(store, &sum, EventFilter::all(), AsOf::Time(minute(3)))
            .await
            .unwrap();
        assert_eq!(
            (applied, sum.0.lock().unwrap().0),
            (5, 16),
            "0,1,2,3 and #10"
        );
    }
}
