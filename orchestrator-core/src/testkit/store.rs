//! The [`EventStore`] conformance suite: the behaviour every event store must show, checked
//! the same way for the in-memory store and for every backend.
//!
//! # Using it
//!
//! A store crate enables core's `testkit` feature in its dev-dependencies and runs the whole
//! suite from an integration test, on a multi-threaded runtime so that the concurrency cases
//! really run in parallel:
//!
//! ```
//! use orchestrator_core::{EventStore, testkit::store};
//!
//! // `tests/conformance.rs`, under `#[tokio::test(flavor = "multi_thread")]`:
//! async fn conformance<S: EventStore>(new_store: fn() -> S) {
//!     store::run_all(|| async move { new_store() }).await;
//! }
//! ```
//!
//! [`run_all`] asks the factory for a store before each case, runs every case (each within
//! [`CASE_TIMEOUT`]) and then panics with one line per failed case: its name, the store's
//! name and what went wrong. Each case is also public, to run (or debug) alone, e.g.
//! `store::append_and_read_round_trip(&my_store).await`. Cases that spawn tasks take a
//! `Clone` store: pass `&Arc::new(my_store)` (an `Arc` of a store is a store).
//!
//! # What the suite assumes
//!
//! - Every case names its streams (`conformance-<uuid>-…`) and event types
//!   (`conformance.t<uuid>.…`) with a fresh random tag, so the store may already hold events:
//!   the factory may hand out one shared store to every case, or a view of a shared server
//!   under a random key prefix.
//! - Nothing else writes to the store while a case runs: cases check
//!   [`EventStore::head_position`] and unfiltered [`EventStore::read_all`] results exactly.
//! - Global positions strictly increase but may have gaps; stream versions have none.
//! - `read_all` returns `min(limit, matching events)` events: the limit counts the events
//!   returned, not the events looked at.
//! - Capabilities are checked, not assumed: a store without
//!   [`expected_version`](crate::StoreCapabilities::expected_version) must answer
//!   `Exact`, `NoStream` and `StreamExists` with [`Error::Unsupported`](crate::Error::Unsupported), one without
//!   [`read_stream`](crate::StoreCapabilities::read_stream) must answer `read_stream` so, and
//!   the cases that need a missing capability are skipped with a printed reason.
//! - Every wait is bounded: a subscription that delivers nothing for [`RECEIVE_TIMEOUT`]
//!   fails the case, and checks that nothing more arrives listen for [`QUIET_PERIOD`].
//!   [`EventStream`](crate::EventStream)s are dropped mid-`next()` when a wait times out.
//!
//!
//! # Cases
//!
//! - Reading and writing: [`append_and_read_round_trip`],
//!   [`read_stream_from_version_with_limit`], [`missing_stream_reads_empty`],
//!   [`stream_version_and_head_position`], [`empty_append_writes_nothing`],
//!   [`invalid_stream_id_is_rejected`].
//! - Expected versions: [`expected_version_conflicts_write_nothing`],
//!   [`expected_version_matches_succeed`], [`expected_version_unsupported_is_reported`],
//!   [`read_stream_unsupported_is_reported`], [`concurrent_appenders_land_exactly_once`].
//! - The global order: [`global_positions_increase_across_streams`],
//!   [`read_all_pages_without_gap_or_duplicate`], [`read_all_filters_by_event_type`],
//!   [`read_all_filters_by_time_range`], [`read_all_filters_by_stream_prefix`],
//!   [`read_all_filter_with_position_and_limit`].
//! - Atomic batches: [`atomic_batch_conflict_writes_nothing`],
//!   [`concurrent_batches_do_not_interleave`].
//! - Subscriptions: [`subscribe_catches_up_then_goes_live`],
//!   [`subscribe_races_concurrent_appends`], [`subscribe_with_filter`],
//!   [`subscribe_from_head_sees_only_new_events`].
//! - Idempotent appends (skipped without
//!   [`idempotent_append`](crate::StoreCapabilities::idempotent_append)):
//!   [`retried_append_returns_the_original`],
//!   [`retry_after_other_appends_returns_the_original`],
//!   [`retry_with_the_original_expectation_returns_the_original`],
//!   [`reordered_ids_are_duplicates`], [`partial_overlap_is_a_duplicate`],
//!   [`same_id_in_another_stream_is_written`], [`repeated_id_in_a_batch_is_invalid`].
//!
//! Whether a store survives a restart (`durable`) is not checked here: that needs a way to
//! restart the store, which each durable store tests itself.

mod global;
mod idempotent;
mod limited;
mod size;
mod streams;
mod subscribe;
mod support;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::timeout;

use crate::store::EventStore;

pub use global::*;
pub use idempotent::*;
pub use limited::Limited;
pub use size::oversize_events_are_refused;
pub use streams::*;
pub use subscribe::*;

/// How long one case may run before [`run_all`] reports it as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a case waits for a subscription's next event.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a case listens to check that a subscription delivers nothing more.
pub const QUIET_PERIOD: Duration = Duration::from_millis(200);

/// Runs every case, each against a store from `make`, and panics listing the failed ones.
pub async fn run_all<S, F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
    S: EventStore,
{
    let mut failures = Vec::new();
    let mut cases = 0;
    macro_rules! cases {
        ($($case:ident),+ $(,)?) => {$(
            let store = Arc::new(make().await);
            cases += 1;
            if let Err(why) = run_case(stringify!($case), store.name(), $case(&store)).await {
                failures.push(format!("- `{}` on `{}`: {why}", stringify!($case), store.name()));
            }
            drop(store);
        )+};
    }
    cases!(
        append_and_read_round_trip,
        read_stream_from_version_with_limit,
        missing_stream_reads_empty,
        stream_version_and_head_position,
        empty_append_writes_nothing,
        invalid_stream_id_is_rejected,
        expected_version_conflicts_write_nothing,
        expected_version_matches_succeed,
        expected_version_unsupported_is_reported,
        read_stream_unsupported_is_reported,
        concurrent_appenders_land_exactly_once,
        global_positions_increase_across_streams,
        read_all_pages_without_gap_or_duplicate,
        read_all_filters_by_event_type,
        read_all_filters_by_time_range,
        read_all_filters_by_stream_prefix,
        read_all_filter_with_position_and_limit,
        atomic_batch_conflict_writes_nothing,
        concurrent_batches_do_not_interleave,
        subscribe_catches_up_then_goes_live,
        subscribe_races_concurrent_appends,
        subscribe_with_filter,
        subscribe_from_head_sees_only_new_events,
        retried_append_returns_the_original,
        retry_after_other_appends_returns_the_original,
        retry_with_the_original_expectation_returns_the_original,
        reordered_ids_are_duplicates,
        partial_overlap_is_a_duplicate,
        same_id_in_another_stream_is_written,
        repeated_id_in_a_batch_is_invalid,
    );
    assert!(
        failures.is_empty(),
        "{} of {cases} event store conformance cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

async fn run_case(name: &str, store: &str, case: impl Future<Output = ()>) -> Result<(), String> {
    eprintln!("event store conformance: `{store}` / `{name}`");
    match timeout(CASE_TIMEOUT, AssertUnwindSafe(case).catch_unwind()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(panic)) => Err(if let Some(s) = panic.downcast_ref::<String>() {
            s.clone()
        } else if let Some(s) = panic.downcast_ref::<&str>() {
            (*s).to_owned()
        } else {
            "panicked".to_owned()
        }),
        Err(_) => Err(format!(
            "did not finish within {CASE_TIMEOUT:?}: a store call or a subscription hangs"
        )),
    }
}
