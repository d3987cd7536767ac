//! The [`Inbox`] conformance suite: what every inbox must do, checked the same way in
//! memory, in files and in Redis.
//!
//! ```
//! use std::sync::Arc;
//! use orchestrator_core::inbox::InMemoryInbox;
//! use orchestrator_core::testkit::inbox;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! inbox::run_all(|retention, clock| async move {
//!     InMemoryInbox::new(retention).with_clock(clock)
//! })
//! .await;
//! # }
//! ```
//!
//! [`run_all`] asks the factory for an inbox with the retention and clock each case needs
//! (a [`ManualClock`] that only the case moves), runs every case and panics with one line
//! per failed case. Every case uses groups with a fresh random name, so the factory may hand
//! out views of one shared backend. Surviving a restart is not checked here: each durable
//! inbox tests that itself, since only it knows how to restart.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;

use crate::clock::{Clock, ManualClock};
use crate::envelope::EventId;
use crate::error::Error;
use crate::inbox::{Inbox, InboxRetention};

/// A group name no other case or run uses.
fn group(tag: &str) -> String {
    format!("conformance-{tag}-{}", uuid::Uuid::now_v7().simple())
}

/// A recorded id is seen by its group, an id not recorded is not.
pub async fn record_then_seen(inbox: &dyn Inbox) {
    let group = group("seen");
    let (handled, other) = (EventId::new(), EventId::new());
    assert!(
        !inbox.seen(&group, &handled).await.unwrap(),
        "seen before any record"
    );
    inbox.record(&group, &handled).await.unwrap();
    assert!(
        inbox.seen(&group, &handled).await.unwrap(),
        "recorded id not seen"
    );
    assert!(
        !inbox.seen(&group, &other).await.unwrap(),
        "an id never recorded is seen"
    );
}

/// Each group has its own ids.
pub async fn groups_are_separate(inbox: &dyn Inbox) {
    let (billing, shipping) = (group("billing"), group("shipping"));
    let id = EventId::new();
    inbox.record(&billing, &id).await.unwrap();
    assert!(inbox.seen(&billing, &id).await.unwrap());
    assert!(
        !inbox.seen(&shipping, &id).await.unwrap(),
        "one group's record is seen by another"
    );
}

/// With a count bound of 3, recording 5 ids forgets the oldest 2; recording an id again
/// does not count twice.
pub async fn count_retention_keeps_the_newest(inbox: &dyn Inbox) {
    assert_eq!(
        inbox.retention().max_ids(),
        Some(3),
        "the factory's retention"
    );
    let group = group("count");
    let ids: Vec<EventId> = (0..5).map(|_| EventId::new()).collect();
    for id in &ids {
        inbox.record(&group, id).await.unwrap();
        // Recorded again at once: no second entry.
        inbox.record(&group, id).await.unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            inbox.seen(&group, id).await.unwrap(),
            i >= 2,
            "id {i} of 5 with a window of the last 3"
        );
    }
}

/// With an age bound of 60 s, an id recorded 61 s ago is forgotten and one recorded 31 s
/// ago is not; a forgotten id can be recorded anew.
pub async fn age_retention_forgets_old_ids(inbox: &dyn Inbox, clock: &ManualClock) {
    assert_eq!(
        inbox.retention().max_age(),
        Some(Duration::from_secs(60)),
        "the factory's retention"
    );
    let group = group("age");
    let (old, young) = (EventId::new(), EventId::new());
    inbox.record(&group, &old).await.unwrap();
    clock.advance(Duration::from_secs(30));
    inbox.record(&group, &young).await.unwrap();
    clock.advance(Duration::from_secs(31));
    assert!(
        !inbox.seen(&group, &old).await.unwrap(),
        "kept past its age"
    );
    assert!(
        inbox.seen(&group, &young).await.unwrap(),
        "forgotten too early"
    );
    inbox.record(&group, &old).await.unwrap();
    assert!(inbox.seen(&group, &old).await.unwrap(), "not recorded anew");
}

/// Empty group names and names with control characters are refused as invalid input.
pub async fn invalid_group_is_rejected(inbox: &dyn Inbox) {
    let id = EventId::new();
    for bad in ["", "a\nb"] {
        assert!(
            matches!(inbox.seen(bad, &id).await, Err(Error::InvalidInput { .. })),
            "seen({bad:?}) accepted"
        );
        assert!(
            matches!(
                inbox.record(bad, &id).await,
                Err(Error::InvalidInput { .. })
            ),
            "record({bad:?}) accepted"
        );
    }
}

/// Concurrent records of many ids in one group all land.
pub async fn concurrent_records_all_land(inbox: &dyn Inbox) {
    let group = group("concurrent");
    let ids: Vec<EventId> = (0..64).map(|_| EventId::new()).collect();
    futures::future::join_all(ids.iter().map(|id| inbox.record(&group, id)))
        .await
        .into_iter()
        .collect::<crate::Result<Vec<()>>>()
        .unwrap();
    for id in &ids {
        assert!(
            inbox.seen(&group, id).await.unwrap(),
            "a concurrent record was lost"
        );
    }
}

/// Runs every case against an inbox from `make(retention, clock)` and panics listing the
/// failed ones. `clock` is a [`ManualClock`] the case moves; the inbox must take its record
/// times from it.
pub async fn run_all<I, F, Fut>(make: F)
where
    F: Fn(InboxRetention, Arc<dyn Clock>) -> Fut,
    Fut: Future<Output = I>,
    I: Inbox,
{
    let mut failures = Vec::new();
    let mut cases = 0;
    macro_rules! case {
        ($name:ident, $retention:expr, |$inbox:ident, $clock:ident| $run:expr) => {{
            let $clock = ManualClock::new(Utc::now());
            let $inbox = make($retention, Arc::new($clock.clone())).await;
            cases += 1;
            let name = stringify!($name);
            let what = $inbox.describe();
            eprintln!("inbox conformance: `{what}` / `{name}`");
            if let Err(why) = AssertUnwindSafe($run).catch_unwind().await {
                let why = why
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| why.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".to_owned());
                failures.push(format!("- `{name}` on {what}: {why}"));
            }
        }};
    }
    let default = InboxRetention::default();
    case!(record_then_seen, default, |inbox, _clock| record_then_seen(
        &inbox
    ));
    case!(groups_are_separate, default, |inbox, _clock| {
        groups_are_separate(&inbox)
    });
    case!(
        count_retention_keeps_the_newest,
        InboxRetention::last(3),
        |inbox, _clock| count_retention_keeps_the_newest(&inbox)
    );
    case!(
        age_retention_forgets_old_ids,
        InboxRetention::within(Duration::from_secs(60)),
        |inbox, clock| age_retention_forgets_old_ids(&inbox, &clock)
    );
    case!(invalid_group_is_rejected, default, |inbox, _clock| {
        invalid_group_is_rejected(&inbox)
    });
    case!(concurrent_records_all_land, default, |inbox, _clock| {
        concurrent_records_all_land(&inbox)
    });
    assert!(
        failures.is_empty(),
        "{} of {cases} inbox conformance cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
