//! Cases: idempotent appends (the `idempotent_append` capability).

use crate::envelope::EventEnvelope;
use crate::error::{Error, Result};
use crate::store::{AppendResult, EventStore, ExpectedVersion, ReadAll};

use super::support::*;

/// Skips the case (returning true) when the store does not claim idempotent appends.
fn skipped<S: EventStore>(case: &str, store: &S) -> bool {
    if store.capabilities().idempotent_append {
        return false;
    }
    skip(case, store, "no `idempotent_append`");
    true
}

/// What the store holds, to compare before and after an append that must write nothing.
struct Snapshot {
    head: u64,
    version: Option<u64>,
    stream: Vec<EventEnvelope>,
    ours: Vec<EventEnvelope>,
}

impl Snapshot {
    async fn take<S: EventStore>(store: &S, names: &Names, stream: &str) -> Self {
        Self {
            head: head(store).await,
            version: stream_version(store, stream).await,
            stream: read_back(store, stream).await,
            ours: read_all(store, ReadAll::from(0, NO_LIMIT).filter(names.all_ours())).await,
        }
    }

    /// Checks that the store still holds exactly what it held.
    async fn assert_unchanged<S: EventStore>(
        &self,
        store: &S,
        names: &Names,
        stream: &str,
        what: &str,
    ) {
        let now = Self::take(store, names, stream).await;
        assert_eq!(now.head, self.head, "{what}: head_position changed");
        assert_eq!(
            now.version, self.version,
            "{what}: the version of `{stream}` changed"
        );
        assert_same_events(&now.stream, &self.stream, &format!("{what}: `{stream}`"));
        assert_same_events(&now.ours, &self.ours, &format!("{what}: read_all"));
    }
}

/// Appends `events` again and checks that the store answers with `original` and writes
/// nothing.
async fn assert_retry<S: EventStore>(
    store: &S,
    names: &Names,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<EventEnvelope>,
    original: AppendResult,
    what: &str,
) {
    let before = Snapshot::take(store, names, stream).await;
    let count = events.len();
    let retried = store
        .append(stream, expected, events)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{what}: the retry of {count} event(s) expecting {expected} failed with `{e}`; \
                 it must return the original result {original:?}"
            )
        });
    assert_eq!(
        retried, original,
        "{what}: a retry must return the original append's result"
    );
    before
        .assert_unchanged(store, names, stream, &format!("{what}: after the retry"))
        .await;
}

/// Checks that an append failed with [`Error::DuplicateEvent`] naming `stream`, the id and
/// its stored version.
fn assert_duplicate(
    result: Result<AppendResult>,
    stream: &str,
    event: &EventEnvelope,
    version: u64,
    what: &str,
) {
    match result {
        Err(Error::DuplicateEvent {
            stream: s,
            event_id,
            version: v,
        }) => assert_eq!(
            (s.as_str(), &event_id, v),
            (stream, event.id(), version),
            "{what}: Error::DuplicateEvent {{ stream, event_id, version }} is wrong"
        ),
        Ok(result) => {
            panic!("{what} succeeded ({result:?}); it must fail with Error::DuplicateEvent")
        }
        Err(other) => panic!("{what} failed with `{other}`; expected Error::DuplicateEvent"),
    }
}

/// Appending the same single event, and the same three events, again returns the original
/// [`AppendResult`] and writes nothing: `read_stream`, `read_all` and `head_position` are
/// unchanged, and the stream goes on from where the originals left it.
pub async fn retried_append_returns_the_original<S: EventStore>(store: &S) {
    if skipped("retried_append_returns_the_original", store) {
        return;
    }
    let names = Names::new();
    let ty = names.event_type("e");
    let (single, batch) = (names.stream("single"), names.stream("batch"));

    let one = vec![event(&ty, 1)];
    let original = append(store, &single, Any, one.clone()).await;
    assert_retry(
        store,
        &names,
        &single,
        Any,
        one.clone(),
        original,
        "single event",
    )
    .await;
    assert_retry(
        store,
        &names,
        &single,
        Any,
        one,
        original,
        "single event, sent a third time",
    )
    .await;

    let three: Vec<_> = (1..=3).map(|n| event(&ty, n)).collect();
    let original = append(store, &batch, Any, three.clone()).await;
    assert_retry(store, &names, &batch, Any, three, original, "3-event batch").await;

    let next = append(store, &batch, Any, vec![event(&ty, 4)]).await;
    assert_eq!(
        next.next_expected_version, 4,
        "an append after a retry continues the stream: {next:?}"
    );
    assert!(
        next.first_position > original.last_position,
        "an append after a retry: {next:?} after {original:?}"
    );
}

/// A retry after other appends to the same stream (expecting `Any`) still returns the
/// original result and writes nothing.
pub async fn retry_after_other_appends_returns_the_original<S: EventStore>(store: &S) {
    if skipped("retry_after_other_appends_returns_the_original", store) {
        return;
    }
    let names = Names::new();
    let ty = names.event_type("e");
    let stream = names.stream("s");
    append(store, &stream, Any, vec![event(&ty, 0)]).await;
    let batch: Vec<_> = (1..=3).map(|n| event(&ty, n)).collect();
    let original = append(store, &stream, Any, batch.clone()).await;
    append(store, &stream, Any, vec![event(&ty, 4), event(&ty, 5)]).await;
    append(store, &names.stream("other"), Any, vec![event(&ty, 6)]).await;

    assert_retry(
        store,
        &names,
        &stream,
        Any,
        batch.clone(),
        original,
        "retry after other appends",
    )
    .await;
    // The stream: the opening event, the batch at versions 2..=4, then two more.
    let single = batch[1..2].to_vec();
    let position = global(&read_back(store, &stream).await[2]);
    let middle = AppendResult {
        next_expected_version: 3,
        first_position: position,
        last_position: position,
    };
    assert_retry(
        store,
        &names,
        &stream,
        Any,
        single,
        middle,
        "the middle event of an earlier batch, at its place",
    )
    .await;
}

/// A retry with the original's `Exact(k)` — k the stream's version before the original,
/// the stream having moved on since — returns the original result; so does one with the
/// original's `NoStream`.
pub async fn retry_with_the_original_expectation_returns_the_original<S: EventStore>(store: &S) {
    if skipped(
        "retry_with_the_original_expectation_returns_the_original",
        store,
    ) {
        return;
    }
    if !store.capabilities().expected_version {
        return skip(
            "retry_with_the_original_expectation_returns_the_original",
            store,
            "no `expected_version`",
        );
    }
    let names = Names::new();
    let ty = names.event_type("e");
    let stream = names.stream("s");
    let opening = vec![event(&ty, 1)];
    let opened = append(store, &stream, NoStream, opening.clone()).await;
    let batch = vec![event(&ty, 2), event(&ty, 3)];
    let original = append(store, &stream, Exact(1), batch.clone()).await;
    append(store, &stream, Exact(3), vec![event(&ty, 4)]).await;

    assert_retry(
        store,
        &names,
        &stream,
        Exact(1),
        batch,
        original,
        "retry expecting the version before the original",
    )
    .await;
    assert_retry(
        store,
        &names,
        &stream,
        NoStream,
        opening.clone(),
        opened,
        "retry of the stream's first append expecting no stream",
    )
    .await;
    assert_retry(
        store,
        &names,
        &stream,
        Exact(0),
        opening,
        opened,
        "retry of the stream's first append expecting version 0",
    )
    .await;
}

/// The same ids in another order, or expecting a version the stream did not have before
/// them, fail with [`Error::DuplicateEvent`] naming the first id of the batch found, and
/// write nothing.
pub async fn reordered_ids_are_duplicates<S: EventStore>(store: &S) {
    if skipped("reordered_ids_are_duplicates", store) {
        return;
    }
    let names = Names::new();
    let ty = names.event_type("e");
    let stream = names.stream("s");
    let batch: Vec<_> = (1..=3).map(|n| event(&ty, n)).collect();
    append(store, &stream, Any, batch.clone()).await;
    let before = Snapshot::take(store, &names, &stream).await;

    let reordered = vec![batch[1].clone(), batch[0].clone(), batch[2].clone()];
    assert_duplicate(
        store.append(&stream, Any, reordered).await,
        &stream,
        &batch[1],
        2,
        "the same ids in another order",
    );
    let reversed: Vec<_> = batch.iter().rev().cloned().collect();
    assert_duplicate(
        store.append(&stream, Any, reversed).await,
        &stream,
        &batch[2],
        3,
        "the same ids reversed",
    );
    if store.capabilities().expected_version {
        assert_duplicate(
            store.append(&stream, Exact(0), batch[1..].to_vec()).await,
            &stream,
            &batch[1],
            2,
            "stored ids expecting a version the stream did not have before them",
        );
        assert_duplicate(
            store.append(&stream, Exact(3), batch.clone()).await,
            &stream,
            &batch[0],
            1,
            "the same ids expecting the stream's version after them",
        );
    }
    before
        .assert_unchanged(store, &names, &stream, "after rejected appends")
        .await;
}

/// A batch that only partly repeats stored ids — stored then new, new then stored, or with
/// a stored id missing in between — fails with [`Error::DuplicateEvent`] and writes nothing,
/// not even its new events.
pub async fn partial_overlap_is_a_duplicate<S: EventStore>(store: &S) {
    if skipped("partial_overlap_is_a_duplicate", store) {
        return;
    }
    let names = Names::new();
    let ty = names.event_type("e");
    let rejected_ty = names.event_type("rejected");
    let stream = names.stream("s");
    let batch: Vec<_> = (1..=3).map(|n| event(&ty, n)).collect();
    append(store, &stream, Any, batch.clone()).await;
    let before = Snapshot::take(store, &names, &stream).await;

    let fresh = || event(&rejected_ty, 0);
    for (attempt, (events, clash, version)) in [
        (vec![batch[2].clone(), fresh()], &batch[2], 3),
        (vec![fresh(), batch[0].clone()], &batch[0], 1),
        (vec![batch[0].clone(), batch[2].clone()], &batch[0], 1),
        (
            vec![
                batch[0].clone(),
                batch[1].clone(),
                batch[2].clone(),
                fresh(),
            ],
            &batch[0],
            1,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        assert_duplicate(
            store.append(&stream, Any, events).await,
            &stream,
            clash,
            version,
            &format!("partly overlapping batch #{attempt}"),
        );
    }
    before
        .assert_unchanged(store, &names, &stream, "after rejected appends")
        .await;
    let rejected = read_all(
        store,
        ReadAll::from(0, 10).filter(crate::store::EventFilter::all().event_type(&rejected_ty)),
    )
    .await;
    assert!(
        rejected.is_empty(),
        "new events of rejected batches were written: {rejected:?}"
    );
}

/// Ids are unique per stream: events whose ids another stream holds are written to this one
/// as new events.
pub async fn same_id_in_another_stream_is_written<S: EventStore>(store: &S) {
    if skipped("same_id_in_another_stream_is_written", store) {
        return;
    }
    let names = Names::new();
    let ty = names.event_type("e");
    let (first, second) = (names.stream("first"), names.stream("second"));
    let batch = vec![event(&ty, 1), event(&ty, 2)];
    let original = append(store, &first, Any, batch.clone()).await;
    let copy = append(store, &second, Any, batch.clone()).await;
    assert_eq!(
        copy.next_expected_version, 2,
        "the same ids in another stream: {copy:?}"
    );
    assert!(
        copy.first_position > original.last_position,
        "the same ids in another stream must be written anew: {copy:?} after {original:?}"
    );
    assert_eq!(head(store).await, copy.last_position, "head_position");
    let stored = read_back(store, &second).await;
    assert_same_ids(&stored, &batch, "the second stream");
    for (i, (actual, original)) in stored.iter().zip(&batch).enumerate() {
        assert_stored(actual, original, &second, i as u64 + 1, "the second stream");
    }
    assert_same_ids(&read_back(store, &first).await, &batch, "the first stream");
}

/// A batch that carries one id twice is an [`Error::InvalidInput`] and writes nothing, on a
/// new stream and on one that exists.
pub async fn repeated_id_in_a_batch_is_invalid<S: EventStore>(store: &S) {
    if skipped("repeated_id_in_a_batch_is_invalid", store) {
        return;
    }
    let names = Names::new();
    let ty = names.event_type("e");
    let (stream, missing) = (names.stream("s"), names.stream("missing"));
    append(store, &stream, Any, vec![event(&ty, 1)]).await;
    let before = Snapshot::take(store, &names, &stream).await;
    let twice = event(&ty, 2);
    for target in [&stream, &missing] {
        assert_invalid(
            store
                .append(
                    target,
                    Any,
                    vec![twice.clone(), event(&ty, 3), twice.clone()],
                )
                .await,
            &format!("a batch with one id twice, to `{target}`"),
        );
    }
    before
        .assert_unchanged(store, &names, &stream, "after rejected batches")
        .await;
    assert_eq!(
        stream_version(store, &missing).await,
        None,
        "a rejected batch creates no stream"
    );
}
