//! Event-sourced aggregates: conflicts retried without lost updates, snapshots, refusals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use orchestrator_core::testkit::store::Limited;
use orchestrator_core::{EventStore, Jitter, RetryPolicy};
use orchestrator_cqrs::{Aggregate, AggregateRepository, Error};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::snapshot::{InMemorySnapshotStore, SnapshotPolicy, SnapshotStore};
use serde::{Deserialize, Serialize};

fn quick_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(attempts, Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(5))
        .with_jitter(Jitter::Full)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_commands_on_one_aggregate_all_apply() {
    let events = store_with_open_account("a-1").await;
    // All eight load version 1 before any appends: one wins, seven conflict and retry.
    let store = Arc::new(BarrierStore::new(events.clone(), 8));
    let accounts = AggregateRepository::<Account>::new(store.clone())
        .unwrap()
        .with_retry(quick_retries(16));
    let tasks: Vec<_> = (1..=8)
        .map(|amount| {
            let accounts = accounts.clone();
            tokio::spawn(async move {
                accounts
                    .execute("a-1", AccountCommand::Deposit(amount))
                    .await
            })
        })
        .collect();
    let mut attempts = 0;
    let mut positions = Vec::new();
    for task in tasks {
        let executed = task.await.unwrap().unwrap();
        attempts += executed.attempts;
        positions.push(executed.position.unwrap());
    }
    assert!(
        attempts >= 8 + 7,
        "at least seven conflicts, got {attempts} attempts"
    );
    assert_eq!(store.appends() as u32, attempts);
    positions.sort_unstable();
    assert_eq!(positions, (2..=9).collect::<Vec<u64>>());

    let account = accounts.load("a-1").await.unwrap();
    assert_eq!(account.state.balance, 36, "no deposit was lost");
    assert_eq!((account.version, account.state.movements), (9, 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_outlasting_the_policy_is_reported_and_writes_nothing() {
    let events = store_with_open_account("a-1").await;
    let store = Arc::new(BarrierStore::new(events.clone(), 2));
    let accounts = AggregateRepository::<Account>::new(store)
        .unwrap()
        .with_retry(RetryPolicy::never());
    let (a, b) = tokio::join!(
        accounts.execute("a-1", AccountCommand::Deposit(5)),
        accounts.execute("a-1", AccountCommand::Deposit(7)),
    );
    let (won, lost) = match (a, b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        other => panic!("one must win and one conflict: {other:?}"),
    };
    match lost {
        Error::Conflict { stream, attempts } => {
            assert_eq!((stream.as_str(), attempts), ("account-a-1", 1));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        Error::Conflict {
            stream: String::new(),
            attempts: 1
        }
        .is_temporary()
    );
    let account = accounts.load("a-1").await.unwrap();
    assert_eq!(account.state.balance, won.state.balance);
    assert_eq!(account.version, 2);
}

#[tokio::test]
async fn loading_from_a_snapshot_equals_a_full_replay() {
    let events = shared(InMemoryEventStore::new());
    let snapshots = Arc::new(InMemorySnapshotStore::new());
    let with_snapshots = AggregateRepository::<Account>::new(events.clone())
        .unwrap()
        .with_snapshots(snapshots.clone(), SnapshotPolicy::every_n_events(5));
    let replaying = AggregateRepository::<Account>::new(events.clone()).unwrap();

    let mut taken = Vec::new();
    let open = with_snapshots
        .execute(
            "a-1",
            AccountCommand::Open {
                owner: "ann".into(),
            },
        )
        .await
        .unwrap();
    assert!(!open.snapshot_taken);
    for i in 1..=22 {
        let command = if i % 4 == 0 {
            AccountCommand::Withdraw(i)
        } else {
            AccountCommand::Deposit(i * 10)
        };
        let executed = with_snapshots.execute("a-1", command).await.unwrap();
        if executed.snapshot_taken {
            taken.push(executed.version);
        }
    }
    assert_eq!(taken, [5, 10, 15, 20]);
    assert_eq!(
        snapshots
            .load("account-a-1")
            .await
            .unwrap()
            .unwrap()
            .version,
        20
    );

    let from_snapshot = with_snapshots.load("a-1").await.unwrap();
    let full = replaying.load("a-1").await.unwrap();
    assert_eq!(from_snapshot.state, full.state);
    assert_eq!(
        (from_snapshot.version, from_snapshot.position),
        (full.version, full.position)
    );
    assert_eq!(
        (from_snapshot.snapshot_version, from_snapshot.events_read),
        (Some(20), 3)
    );
    assert_eq!((full.snapshot_version, full.events_read), (None, 23));
    assert_eq!(full.version, 23);
}

/// The account under a new state shape: snapshots of the old one must be ignored.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct AccountV2(Account);

impl Aggregate for AccountV2 {
    const TYPE: &'static str = Account::TYPE;
    const STATE_VERSION: u32 = 2;
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = Refused;
    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, Refused> {
        self.0.handle(command)
    }
    fn apply(&mut self, event: AccountEvent) {
        self.0.apply(event);
    }
}

#[tokio::test]
async fn snapshots_of_another_state_version_are_ignored() {
    let events = shared(InMemoryEventStore::new());
    let snapshots: Arc<dyn SnapshotStore> = Arc::new(InMemorySnapshotStore::new());
    let v1 = AggregateRepository::<Account>::new(events.clone())
        .unwrap()
        .with_snapshots(snapshots.clone(), SnapshotPolicy::every_n_events(2));
    v1.execute(
        "a-1",
        AccountCommand::Open {
            owner: "ann".into(),
        },
    )
    .await
    .unwrap();
    let second = v1.execute("a-1", AccountCommand::Deposit(3)).await.unwrap();
    assert!(second.snapshot_taken);

    let v2 = AggregateRepository::<AccountV2>::new(events)
        .unwrap()
        .with_snapshots(snapshots, SnapshotPolicy::every_n_events(2));
    let loaded = v2.load("a-1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.events_read), (None, 2));
    assert_eq!(loaded.state.0.balance, 3);
}

#[tokio::test]
async fn refused_commands_write_nothing() {
    let events = shared(InMemoryEventStore::new());
    let accounts = AggregateRepository::<Account>::new(events.clone()).unwrap();
    let err = accounts
        .execute("a-1", AccountCommand::Deposit(5))
        .await
        .unwrap_err();
    assert_eq!(err.rejection::<Refused>(), Some(&Refused::NotOpen));
    accounts
        .execute(
            "a-1",
            AccountCommand::Open {
                owner: "ann".into(),
            },
        )
        .await
        .unwrap();
    let err = accounts
        .execute("a-1", AccountCommand::Withdraw(5))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Rejected {
            aggregate: "account",
            ..
        }
    ));
    assert_eq!(
        err.rejection::<Refused>(),
        Some(&Refused::InsufficientFunds {
            balance: 0,
            asked: 5
        })
    );
    assert!(err.to_string().contains("insufficient funds"));
    assert_eq!(events.stream_version("account-a-1").await.unwrap(), Some(1));
    assert_eq!(
        AggregateRepository::<Account>::stream_id("a-1"),
        "account-a-1"
    );

    // Events are stored with their own types.
    let stored = events.read_stream("account-a-1", 1, 10).await.unwrap();
    assert_eq!(stored[0].event_type(), "account.opened");
    assert_eq!(
        stored[0].data::<AccountEvent>().unwrap(),
        AccountEvent::Opened {
            owner: "ann".into()
        }
    );
}

#[tokio::test]
async fn a_cached_aggregate_is_not_read_back_and_a_stale_one_is_caught_by_its_version() {
    let events = store_with_open_account("a-1").await;
    let store = Arc::new(BarrierStore::new(events.clone(), 0));
    let accounts = AggregateRepository::<Account>::new(store.clone())
        .unwrap()
        .with_cache(16)
        .with_retry(quick_retries(4));
    accounts
        .execute("a-1", AccountCommand::Deposit(10))
        .await
        .unwrap();
    let reads = store.reads();
    assert!(reads > 0, "the first command loads from the store");
    for _ in 0..5 {
        let done = accounts
            .execute("a-1", AccountCommand::Deposit(1))
            .await
            .unwrap();
        assert_eq!(done.attempts, 1);
    }
    // A refusal keeps the cached state too.
    let refused = accounts
        .execute("a-1", AccountCommand::Withdraw(1_000))
        .await
        .unwrap_err();
    assert!(refused.rejection::<Refused>().is_some());
    assert_eq!(store.reads(), reads, "later commands start from the cache");
    assert_eq!(accounts.cached(), Some(1));

    // Another writer appends behind the cache's back: the cached state's version check
    // fails, and the retry loads the store's state.
    AggregateRepository::<Account>::new(shared(events.clone()))
        .unwrap()
        .execute("a-1", AccountCommand::Deposit(100))
        .await
        .unwrap();
    let done = accounts
        .execute("a-1", AccountCommand::Deposit(1))
        .await
        .unwrap();
    assert_eq!(done.attempts, 2, "one conflict, then a fresh load");
    assert_eq!(done.state.balance, 10 + 5 + 100 + 1);
    assert!(store.reads() > reads);
    let loaded = accounts.load("a-1").await.unwrap();
    assert_eq!((loaded.state, loaded.version), (done.state, done.version));
    assert_eq!(done.version, 9);
}

#[tokio::test]
async fn the_cache_keeps_at_most_its_capacity_and_forgets_the_least_recent() {
    let events = shared(InMemoryEventStore::new());
    let accounts = AggregateRepository::<Account>::new(events.clone())
        .unwrap()
        .with_cache(8);
    for i in 0..20 {
        accounts
            .execute(
                &format!("a-{i}"),
                AccountCommand::Open {
                    owner: format!("owner {i}"),
                },
            )
            .await
            .unwrap();
        assert!(accounts.cached().unwrap() <= 8);
    }
    // Forgotten or not, every aggregate carries on from its stored state.
    for i in 0..20 {
        let done = accounts
            .execute(&format!("a-{i}"), AccountCommand::Deposit(i + 1))
            .await
            .unwrap();
        assert_eq!((done.state.balance, done.version), (i + 1, 2));
        assert_eq!(done.state.owner, format!("owner {i}"));
    }
    assert!(
        AggregateRepository::<Account>::new(events)
            .unwrap()
            .with_cache(0)
            .cached()
            .is_none(),
        "capacity 0 turns the cache off"
    );
}

#[tokio::test]
async fn store_errors_come_through() {
    // A control character makes an invalid stream id: the store's error comes through.
    let accounts = AggregateRepository::<Account>::new(shared(InMemoryEventStore::new())).unwrap();
    let err = accounts
        .execute("bad\nid", AccountCommand::Open { owner: "x".into() })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Core(orchestrator_core::Error::InvalidInput { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn a_store_without_exact_versions_is_refused_at_construction() {
    let store = Arc::new(Limited::without_exact_versions(InMemoryEventStore::new()));
    let refused = AggregateRepository::<Account>::new(store).unwrap_err();
    let message = refused.to_string();
    assert!(message.contains("limited"), "{message}");
    assert!(
        message.contains("in-memory, file or Redis"),
        "names the stores that can: {message}"
    );
    assert!(matches!(
        refused,
        Error::Core(orchestrator_core::Error::Unsupported { .. })
    ));
}
