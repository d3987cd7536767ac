//! The [`ReadModelStore`] conformance suite: documents, positions and, where the store has
//! them, transactions, checked the same way in memory and in PostgreSQL.
//!
//! ```
//! use orchestrator_core::read_model::InMemoryReadModelStore;
//! use orchestrator_core::testkit::read_model;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! read_model::run_all(|| async { InMemoryReadModelStore::new() }).await;
//! # }
//! ```
//!
//! [`run_all`] asks the factory for an empty store (position 0, or none recorded) for each
//! case. The transaction cases pass trivially for a store whose
//! [`begin`](ReadModelStore::begin) returns `None`.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use serde_json::json;

use crate::read_model::ReadModelStore;

/// Documents are stored, replaced, listed in key order and removed.
pub async fn documents_round_trip(store: &dyn ReadModelStore) {
    assert_eq!(
        store.get("b").await.unwrap(),
        None,
        "a new store has documents"
    );
    store.put("b", json!({"n": 1})).await.unwrap();
    store.put("a", json!([1, "two"])).await.unwrap();
    store.put("b", json!({"n": 2})).await.unwrap();
    assert_eq!(store.get("b").await.unwrap(), Some(json!({"n": 2})));
    assert_eq!(
        store.list().await.unwrap(),
        vec![
            ("a".to_owned(), json!([1, "two"])),
            ("b".to_owned(), json!({"n": 2}))
        ],
        "list is not every document in key order"
    );
    assert_eq!(store.remove("a").await.unwrap(), Some(json!([1, "two"])));
    assert_eq!(store.remove("a").await.unwrap(), None, "removed twice");
    assert_eq!(store.list().await.unwrap().len(), 1);
}

/// The position only moves forward; `clear` forgets it with the documents.
pub async fn positions_move_forward_and_clear_resets(store: &dyn ReadModelStore) {
    let start = store.position().await.unwrap();
    assert!(
        matches!(start, None | Some(0)),
        "a new store is at {start:?}"
    );
    store.set_position(5).await.unwrap();
    store.set_position(3).await.unwrap();
    if let Some(p) = store.position().await.unwrap() {
        assert_eq!(p, 5, "the position moved backwards or was lost");
    }
    store.put("k", json!(1)).await.unwrap();
    store.clear().await.unwrap();
    assert!(
        store.list().await.unwrap().is_empty(),
        "clear kept documents"
    );
    assert!(
        matches!(store.position().await.unwrap(), None | Some(0)),
        "clear kept the position"
    );
}

/// A transaction sees its own writes; nobody else does until it commits, and then all of
/// them, position included.
pub async fn transactions_commit_together(store: &dyn ReadModelStore) {
    store.put("old", json!("before")).await.unwrap();
    let Some(tx) = store.begin().await.unwrap() else {
        return;
    };
    tx.put("new", json!(1)).await.unwrap();
    assert_eq!(tx.remove("old").await.unwrap(), Some(json!("before")));
    tx.set_position(8).await.unwrap();
    assert_eq!(
        tx.get("new").await.unwrap(),
        Some(json!(1)),
        "own write unseen"
    );
    assert_eq!(tx.get("old").await.unwrap(), None, "own removal unseen");
    assert_eq!(tx.list().await.unwrap(), vec![("new".to_owned(), json!(1))]);
    assert_eq!(tx.position().await.unwrap(), Some(8));
    assert_eq!(
        store.get("new").await.unwrap(),
        None,
        "uncommitted write seen"
    );
    assert_eq!(store.get("old").await.unwrap(), Some(json!("before")));
    assert!(
        matches!(store.position().await.unwrap(), None | Some(0)),
        "uncommitted position seen"
    );
    tx.commit().await.unwrap();
    assert_eq!(
        store.list().await.unwrap(),
        vec![("new".to_owned(), json!(1))]
    );
    assert_eq!(store.position().await.unwrap(), Some(8));
    assert!(
        tx.put("late", json!(0)).await.is_err(),
        "a committed transaction takes writes"
    );
}

/// A rolled-back or dropped transaction leaves nothing behind.
pub async fn rolled_back_and_dropped_transactions_leave_nothing(store: &dyn ReadModelStore) {
    store.put("kept", json!(1)).await.unwrap();
    store.set_position(2).await.unwrap();
    let Some(tx) = store.begin().await.unwrap() else {
        return;
    };
    tx.put("kept", json!(99)).await.unwrap();
    tx.put("extra", json!(1)).await.unwrap();
    tx.set_position(3).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(
        tx.get("kept").await.is_err(),
        "a rolled-back transaction reads"
    );

    let tx = store.begin().await.unwrap().unwrap();
    assert_eq!(tx.position().await.unwrap(), Some(2));
    tx.clear().await.unwrap();
    tx.put("extra", json!(2)).await.unwrap();
    tx.set_position(4).await.unwrap();
    drop(tx);

    assert_eq!(
        store.list().await.unwrap(),
        vec![("kept".to_owned(), json!(1))]
    );
    assert_eq!(store.position().await.unwrap(), Some(2));
    // The store still takes transactions (a dropped one gave back what it held).
    let tx = store.begin().await.unwrap().unwrap();
    tx.set_position(5).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.position().await.unwrap(), Some(5));
}

/// Runs every case against a fresh store from `make()` and panics listing the failed ones.
pub async fn run_all<S, F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
    S: ReadModelStore,
{
    let mut failures = Vec::new();
    macro_rules! case {
        ($name:ident) => {{
            let store = make().await;
            let name = stringify!($name);
            eprintln!("read model store conformance: `{name}`");
            if let Err(why) = AssertUnwindSafe($name(&store)).catch_unwind().await {
                let why = why
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| why.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".to_owned());
                failures.push(format!("- `{name}`: {why}"));
            }
        }};
    }
    case!(documents_round_trip);
    case!(positions_move_forward_and_clear_resets);
    case!(transactions_commit_together);
    case!(rolled_back_and_dropped_transactions_leave_nothing);
    assert!(
        failures.is_empty(),
        "read model store conformance failed:\n{}",
        failures.join("\n")
    );
}
