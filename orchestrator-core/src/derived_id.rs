//! Deterministic event ids for work that may run twice: a command sent again with the same
//! id, a saga step re-run after a crash with the same idempotency key.
//!
//! [`derive_ids`] runs a future in a scope named by a base id; inside it, each call of
//! [`next_derived_id`] hands out `<base>/1`, `<base>/2`, … in order. A facade `publish` inside
//! the scope takes those ids for the events it creates, so the same work, run again, emits
//! the same ids, and a store with idempotent appends
//! ([`StoreCapabilities::idempotent_append`](crate::StoreCapabilities)) writes them once.
//! Scopes nest: the innermost names the ids; the outer one carries on counting after it.
//! The scope belongs to the task that runs the future: work it spawns onto other tasks
//! gets no derived ids.
//!
//! ```
//! use orchestrator_core::derived_id::{derive_ids, next_derived_id};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let ids = derive_ids("cmd-42", async {
//!     (next_derived_id(), next_derived_id())
//! })
//! .await;
//! assert_eq!(ids, (Some("cmd-42/1".to_owned()), Some("cmd-42/2".to_owned())));
//! assert_eq!(next_derived_id(), None, "outside a scope");
//! # }
//! ```

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static SCOPE: Scope;
}

struct Scope {
    base: Arc<str>,
    emitted: Cell<u64>,
}

/// Runs `work` in a scope whose events get ids derived from `base` (see the
/// [module docs](self)).
pub async fn derive_ids<F: Future>(base: impl Into<Arc<str>>, work: F) -> F::Output {
    let scope = Scope {
        base: base.into(),
        emitted: Cell::new(0),
    };
    SCOPE.scope(scope, work).await
}

/// The next derived id of the running scope: `<base>/<n>` for its `n`-th call. `None`
/// outside any scope.
pub fn next_derived_id() -> Option<String> {
    SCOPE
        .try_with(|scope| {
            let n = scope.emitted.get() + 1;
            scope.emitted.set(n);
            format!("{}/{n}", scope.base)
        })
        .ok()
}

/// The base id of the running scope, if any.
pub fn current_base() -> Option<Arc<str>> {
    SCOPE.try_with(|scope| Arc::clone(&scope.base)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scopes_nest_and_the_outer_one_carries_on_counting() {
        let ids = derive_ids("saga-1:pay:1", async {
            let first = next_derived_id();
            let inner = derive_ids("cmd-7", async { next_derived_id() }).await;
            let second = next_derived_id();
            (first, inner, second, current_base())
        })
        .await;
        assert_eq!(ids.0.as_deref(), Some("saga-1:pay:1/1"));
        assert_eq!(ids.1.as_deref(), Some("cmd-7/1"));
        assert_eq!(ids.2.as_deref(), Some("saga-1:pay:1/2"));
        assert_eq!(ids.3.as_deref(), Some("saga-1:pay:1"));
        assert_eq!(current_base(), None);
    }

    #[tokio::test]
    async fn the_same_work_run_twice_gets_the_same_ids() {
        let run = || derive_ids("k", async { (next_derived_id(), next_derived_id()) });
        assert_eq!(run().await, run().await);
    }
}
