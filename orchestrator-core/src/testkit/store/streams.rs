//! Cases: appending, reading streams, expected versions, concurrent appenders.

use std::collections::BTreeMap;

use crate::envelope::{EventEnvelope, StoredPosition};
use crate::error::Error;
use crate::store::{EventFilter, EventStore, ReadAll};

use tokio::task::JoinSet;

use super::support::*;

/// Appended events come back exactly as written (id, type, schema version, source, time,
/// subject, data schema, correlation and causation ids, trace context, headers, content type,
/// payload bytes — JSON, binary and empty), with the store's stream id (overriding one set by
/// the caller), stream versions 1..n and strictly increasing global positions that match the
/// [`AppendResult`](crate::AppendResult); a second append continues the stream.
pub async fn append_and_read_round_trip<S: EventStore>(store: &S) {
    let names = Names::new();
    let stream = names.stream("order-1");
    let originals = vec![
        rich_event(&names),
        EventEnvelope::from_bytes(
            names.event_type("blob.stored"),
            "application/octet-stream",
            vec![0_u8, 255, 7, 1, 128],
        )
        .unwrap()
        .with_position(
            "elsewhere",
            StoredPosition {
                stream_version: 99,
                global_position: 999,
            },
        ),
        EventEnvelope::from_bytes(names.event_type("ping"), "application/octet-stream", vec![])
            .unwrap(),
    ];
    let head_before = head(store).await;
    let written = append(store, &stream, Any, originals.clone()).await;
    assert_eq!(
        written.next_expected_version, 3,
        "a 3-event append to a new stream must report version 3: {written:?}"
    );
    assert!(
        written.first_position > head_before && written.last_position >= written.first_position + 2,
        "positions of a 3-event append on a store at head {head_before}: {written:?}"
    );
    assert_eq!(
        head(store).await,
        written.last_position,
        "head_position after the append"
    );

    let stored = read_back(store, &stream).await;
    assert_eq!(
        stored.len(),
        3,
        "the stream must hold the 3 appended events"
    );
    for (i, (actual, original)) in stored.iter().zip(&originals).enumerate() {
        assert_stored(actual, original, &stream, i as u64 + 1, "round trip");
    }
    assert_eq!(
        global(&stored[0]),
        written.first_position,
        "first event's position"
    );
    assert_eq!(
        global(&stored[2]),
        written.last_position,
        "last event's position"
    );

    let via_all = read_all(
        store,
        ReadAll::from(written.first_position, 10).filter(names.all_ours()),
    )
    .await;
    assert_same_events(&via_all, &stored, "read_all of the appended events");

    let more = append(
        store,
        &stream,
        Any,
        vec![event(&names.event_type("more"), 4)],
    )
    .await;
    assert_eq!(more.next_expected_version, 4, "second append: {more:?}");
    assert!(
        more.first_position > written.last_position,
        "second append: {more:?}"
    );
    let stored = read_back(store, &stream).await;
    assert_eq!(stored.len(), 4, "the stream after a second append");
    assert_eq!(
        stored[3].stream_version(),
        Some(4),
        "version of the 4th event"
    );
    assert_eq!(
        global(&stored[3]),
        more.last_position,
        "position of the 4th event"
    );
}

/// `read_stream` reads from a version (inclusive) and at most `limit` events; versions
/// before 1 read from the start, versions past the end read nothing, limit 0 reads nothing.
pub async fn read_stream_from_version_with_limit<S: EventStore>(store: &S) {
    if !store.capabilities().read_stream {
        return skip(
            "read_stream_from_version_with_limit",
            store,
            "no `read_stream`",
        );
    }
    let names = Names::new();
    let stream = names.stream("s");
    let ty = names.event_type("counted");
    let originals: Vec<_> = (1..=10).map(|n| event(&ty, n)).collect();
    append(store, &stream, Any, originals[..4].to_vec()).await;
    append(store, &stream, Any, originals[4..].to_vec()).await;

    for (from, limit, versions) in [
        (4, 3, vec![4, 5, 6]),
        (9, 10, vec![9, 10]),
        (10, 1, vec![10]),
        (11, 5, vec![]),
        (0, 2, vec![1, 2]),
        (1, 0, vec![]),
        (1, NO_LIMIT, (1..=10).collect()),
    ] {
        let events = read_stream(store, &stream, from, limit).await;
        let got: Vec<_> = events.iter().map(|e| e.stream_version()).collect();
        let want: Vec<_> = versions.iter().map(|&v| Some(v)).collect();
        assert_eq!(
            got, want,
            "read_stream(from {from}, limit {limit}): versions"
        );
        for e in &events {
            let v = e.stream_version().unwrap_or_default();
            assert_eq!(
                e.id(),
                originals[v as usize - 1].id(),
                "read_stream(from {from}, limit {limit}): event at version {v}"
            );
        }
    }
}

/// A stream that was never written reads as empty and has no version — also when its id is
/// a prefix of a stream that exists.
pub async fn missing_stream_reads_empty<S: EventStore>(store: &S) {
    let names = Names::new();
    append(
        store,
        &names.stream("cart-1"),
        Any,
        vec![event(&names.event_type("x"), 1)],
    )
    .await;
    for missing in [names.stream("cart"), names.stream("never-written")] {
        assert_eq!(
            stream_version(store, &missing).await,
            None,
            "stream_version of the missing stream `{missing}`"
        );
        if store.capabilities().read_stream {
            let events = read_stream(store, &missing, 1, 10).await;
            assert!(
                events.is_empty(),
                "read_stream of missing `{missing}`: {events:?}"
            );
        }
    }
    let events = read_all(
        store,
        ReadAll::from(0, 10).filter(EventFilter::all().stream_prefix(names.stream("never"))),
    )
    .await;
    assert!(
        events.is_empty(),
        "read_all of a missing stream prefix: {events:?}"
    );
}

/// `stream_version` follows each stream's appends; `head_position` is the position of the
/// last event written, whichever the stream.
pub async fn stream_version_and_head_position<S: EventStore>(store: &S) {
    let names = Names::new();
    let (a, b) = (names.stream("a"), names.stream("b"));
    let ty = names.event_type("e");
    let before = head(store).await;
    let first = append(store, &a, Any, vec![event(&ty, 1), event(&ty, 2)]).await;
    assert!(
        first.first_position > before,
        "{first:?} on a store at head {before}"
    );
    assert_eq!(
        head(store).await,
        first.last_position,
        "head after appending to `a`"
    );
    assert_eq!(stream_version(store, &a).await, Some(2), "version of `a`");
    let second = append(store, &b, Any, (3..=5).map(|n| event(&ty, n)).collect()).await;
    assert!(
        second.first_position > first.last_position,
        "{second:?} after {first:?}"
    );
    assert_eq!(
        head(store).await,
        second.last_position,
        "head after appending to `b`"
    );
    assert_eq!(stream_version(store, &b).await, Some(3), "version of `b`");
    assert_eq!(
        stream_version(store, &a).await,
        Some(2),
        "`a` after appending to `b`"
    );
    let third = append(store, &a, Any, vec![event(&ty, 6)]).await;
    assert_eq!(third.next_expected_version, 3, "{third:?}");
    assert_eq!(
        stream_version(store, &a).await,
        Some(3),
        "version of `a` at the end"
    );
    assert_eq!(head(store).await, third.last_position, "head at the end");
}

/// An append of no events writes nothing, reports the stream's current version, and still
/// checks the expected version.
pub async fn empty_append_writes_nothing<S: EventStore>(store: &S) {
    let names = Names::new();
    let (missing, stream) = (names.stream("missing"), names.stream("s"));
    let before = head(store).await;
    let result = append(store, &missing, Any, vec![]).await;
    assert_eq!(
        result.next_expected_version, 0,
        "empty append to a missing stream"
    );
    assert_eq!(
        stream_version(store, &missing).await,
        None,
        "an empty append creates no stream"
    );
    assert_eq!(head(store).await, before, "head after an empty append");

    let ty = names.event_type("e");
    let written = append(store, &stream, Any, vec![event(&ty, 1), event(&ty, 2)]).await;
    let result = append(store, &stream, Any, vec![]).await;
    assert_eq!(
        result.next_expected_version, 2,
        "empty append to a stream at version 2"
    );
    assert_eq!(
        head(store).await,
        written.last_position,
        "head after an empty append"
    );
    assert_eq!(
        read_back(store, &stream).await.len(),
        2,
        "the stream after an empty append"
    );

    if store.capabilities().expected_version {
        let result = append(store, &stream, Exact(2), vec![]).await;
        assert_eq!(
            result.next_expected_version, 2,
            "empty append expecting version 2"
        );
        let result = append(store, &missing, NoStream, vec![]).await;
        assert_eq!(
            result.next_expected_version, 0,
            "empty append expecting no stream"
        );
        let result = store.append(&stream, Exact(5), vec![]).await;
        assert_wrong_version(result, &stream, Exact(5), Some(2));
        let result = store.append(&missing, StreamExists, vec![]).await;
        assert_wrong_version(result, &missing, StreamExists, None);
        assert_eq!(
            head(store).await,
            written.last_position,
            "head after empty appends"
        );
    }
}

/// An empty stream id, or one with control characters, is an [`Error::InvalidInput`] for
/// appends and reads alike, and writes nothing.
pub async fn invalid_stream_id_is_rejected<S: EventStore>(store: &S) {
    let names = Names::new();
    let before = head(store).await;
    for bad in ["", "line\nbreak"] {
        let events = vec![event(&names.event_type("e"), 1)];
        assert_invalid(
            store.append(bad, Any, events).await,
            &format!("append to {bad:?}"),
        );
        assert_invalid(
            store.append(bad, Any, vec![]).await,
            &format!("empty append to {bad:?}"),
        );
    }
    assert_invalid(store.stream_version("").await, "stream_version(\"\")");
    if store.capabilities().read_stream {
        assert_invalid(store.read_stream("", 1, 10).await, "read_stream(\"\")");
    }
    assert_eq!(head(store).await, before, "head after rejected appends");
}

// ---------------------------------------------------------------------------------------------
// Cases: expected versions
// ---------------------------------------------------------------------------------------------

/// `NoStream` on an existing stream, `Exact` of a wrong version (`0` included) and
/// `StreamExists` / `Exact(n)` on a missing stream fail with
/// [`Error::WrongExpectedVersion`] carrying the stream, the expectation and the actual
/// version, and write nothing.
pub async fn expected_version_conflicts_write_nothing<S: EventStore>(store: &S) {
    if !store.capabilities().expected_version {
        return skip(
            "expected_version_conflicts_write_nothing",
            store,
            "no `expected_version`",
        );
    }
    let names = Names::new();
    let (stream, missing) = (names.stream("s"), names.stream("missing"));
    let ty = names.event_type("e");
    let rejected_ty = names.event_type("rejected");
    let originals = vec![event(&ty, 1), event(&ty, 2)];
    append(store, &stream, NoStream, originals.clone()).await;
    let before = head(store).await;

    for (target, expected, actual) in [
        (&stream, NoStream, Some(2)),
        (&stream, Exact(1), Some(2)),
        (&stream, Exact(3), Some(2)),
        (&stream, Exact(0), Some(2)),
        (&missing, StreamExists, None),
        (&missing, Exact(1), None),
    ] {
        let batch = vec![event(&rejected_ty, 1), event(&rejected_ty, 2)];
        assert_wrong_version(
            store.append(target, expected, batch).await,
            target,
            expected,
            actual,
        );
    }

    assert_eq!(head(store).await, before, "head after rejected appends");
    assert_eq!(
        stream_version(store, &stream).await,
        Some(2),
        "version after rejected appends"
    );
    assert_eq!(
        stream_version(store, &missing).await,
        None,
        "rejected appends create no stream"
    );
    assert_same_ids(
        &read_back(store, &stream).await,
        &originals,
        "the stream after rejected appends",
    );
    let rejected = read_all(
        store,
        ReadAll::from(0, 10).filter(EventFilter::all().event_type(&rejected_ty)),
    )
    .await;
    assert!(
        rejected.is_empty(),
        "rejected events were written: {rejected:?}"
    );
}

/// `Exact(0)` and `NoStream` on a new stream, `Exact(current)`, `StreamExists` on an existing
/// stream and `Any` succeed, and each [`AppendResult`](crate::AppendResult) is right.
pub async fn expected_version_matches_succeed<S: EventStore>(store: &S) {
    if !store.capabilities().expected_version {
        return skip(
            "expected_version_matches_succeed",
            store,
            "no `expected_version`",
        );
    }
    let names = Names::new();
    let (stream, other) = (names.stream("s"), names.stream("other"));
    let ty = names.event_type("e");
    let mut last = head(store).await;
    let mut n = 0;
    for (target, expected, count, version) in [
        (&stream, Exact(0), 1, 1),
        (&stream, Exact(1), 2, 3),
        (&stream, StreamExists, 1, 4),
        (&stream, Any, 1, 5),
        (&stream, Exact(5), 3, 8),
        (&other, NoStream, 2, 2),
    ] {
        let batch = (n..n + count).map(|i| event(&ty, i)).collect();
        n += count;
        let result = append(store, target, expected, batch).await;
        let what = format!("append of {count} to `{target}` expecting {expected}: {result:?}");
        assert_eq!(
            result.next_expected_version, version,
            "{what}: next_expected_version"
        );
        assert!(
            result.first_position > last,
            "{what}: positions must grow past {last}"
        );
        assert!(
            result.last_position >= result.first_position + (count - 1),
            "{what}"
        );
        assert_eq!(
            head(store).await,
            result.last_position,
            "{what}: head_position"
        );
        last = result.last_position;
    }
    let events = read_back(store, &stream).await;
    let versions: Vec<_> = events.iter().map(|e| e.stream_version()).collect();
    assert_eq!(
        versions,
        (1..=8).map(Some).collect::<Vec<_>>(),
        "versions of `{stream}`"
    );
}

/// A store without the `expected_version` capability answers `Exact`, `NoStream` and
/// `StreamExists` with [`Error::Unsupported`] and writes nothing; `Any` works.
pub async fn expected_version_unsupported_is_reported<S: EventStore>(store: &S) {
    if store.capabilities().expected_version {
        return skip(
            "expected_version_unsupported_is_reported",
            store,
            "the store supports `expected_version`",
        );
    }
    let names = Names::new();
    let stream = names.stream("s");
    let ty = names.event_type("e");
    append(store, &stream, Any, vec![event(&ty, 1)]).await;
    let before = head(store).await;
    for expected in [Exact(1), Exact(0), NoStream, StreamExists] {
        let result = store.append(&stream, expected, vec![event(&ty, 2)]).await;
        assert_unsupported(result, &format!("append expecting {expected}"));
    }
    assert_eq!(head(store).await, before, "head after unsupported appends");
    assert_eq!(
        read_back(store, &stream).await.len(),
        1,
        "the stream after unsupported appends"
    );
}

/// A store without the `read_stream` capability answers `read_stream` with
/// [`Error::Unsupported`].
pub async fn read_stream_unsupported_is_reported<S: EventStore>(store: &S) {
    if store.capabilities().read_stream {
        return skip(
            "read_stream_unsupported_is_reported",
            store,
            "the store supports `read_stream`",
        );
    }
    let names = Names::new();
    let stream = names.stream("s");
    append(store, &stream, Any, vec![event(&names.event_type("e"), 1)]).await;
    assert_unsupported(store.read_stream(&stream, 1, 10).await, "read_stream");
}

/// Eight tasks append 25 events each to one stream at once. With `expected_version`, each
/// append expects the version it just read and retries on a conflict: every append lands
/// exactly once, at the version it expected plus one (no lost update), versions 1..=200
/// without gap. Without it, `Any` appends must all land with versions 1..=200.
pub async fn concurrent_appenders_land_exactly_once<S: EventStore + Clone>(store: &S) {
    const WRITERS: u64 = 8;
    const APPENDS: u64 = 25;
    const MAX_CONFLICTS: u64 = 10_000;
    let names = Names::new();
    let stream = names.stream("contended");
    let ty = names.event_type("e");
    let exact = store.capabilities().expected_version;

    let mut tasks = JoinSet::new();
    for writer in 0..WRITERS {
        let (store, stream, ty) = (store.clone(), stream.clone(), ty.clone());
        tasks.spawn(async move {
            let mut landed = Vec::new();
            let mut conflicts = 0;
            for seq in 0..APPENDS {
                loop {
                    let expected = if exact {
                        Exact(stream_version(&store, &stream).await.unwrap_or(0))
                    } else {
                        Any
                    };
                    // Let the other writers read the same version before this one writes.
                    tokio::task::yield_now().await;
                    let e = tag(tag(event(&ty, 0), "writer", writer), "seq", seq);
                    match store.append(&stream, expected, vec![e]).await {
                        Ok(result) => {
                            if let Exact(v) = expected {
                                assert_eq!(
                                    result.next_expected_version,
                                    v + 1,
                                    "writer {writer}: an append expecting {expected} landed at \
                                     another version: the store ignored the expected version \
                                     (a lost update)"
                                );
                            }
                            landed.push((result.next_expected_version, seq));
                            break;
                        }
                        Err(Error::WrongExpectedVersion {
                            stream: s,
                            expected: e,
                            actual,
                        }) if exact => {
                            let Exact(v) = expected else { unreachable!() };
                            assert!(
                                s == stream && e == expected && actual.unwrap_or(0) > v,
                                "conflict reported as stream `{s}`, expected {e}, actual \
                                 {actual:?} for an append to `{stream}` expecting {expected}"
                            );
                            conflicts += 1;
                            assert!(conflicts < MAX_CONFLICTS, "writer {writer} livelocked");
                        }
                        Err(e) => panic!("writer {writer}: append expecting {expected}: {e}"),
                    }
                }
            }
            (writer, landed)
        });
    }

    let mut by_version = BTreeMap::new();
    for (writer, landed) in join_all(tasks).await {
        for (version, seq) in landed {
            let previous = by_version.insert(version, (writer, seq));
            assert!(previous.is_none(), "two appends report version {version}");
        }
    }
    let total = WRITERS * APPENDS;
    assert_eq!(
        by_version.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "versions reported by the appends"
    );
    let events = read_back(store, &stream).await;
    assert_eq!(events.len() as u64, total, "events in the contended stream");
    let mut next_seq = vec![0; WRITERS as usize];
    for (i, e) in events.iter().enumerate() {
        let version = i as u64 + 1;
        assert_eq!(
            e.stream_version(),
            Some(version),
            "versions must be gapless"
        );
        let (writer, seq) = (header_u64(e, "writer"), header_u64(e, "seq"));
        assert_eq!(
            by_version.get(&version),
            Some(&(writer, seq)),
            "the event at version {version} is not the one whose append reported it"
        );
        assert_eq!(
            seq, next_seq[writer as usize],
            "writer {writer}'s events out of order"
        );
        next_seq[writer as usize] += 1;
    }
    assert_eq!(
        stream_version(store, &stream).await,
        Some(total),
        "final stream version"
    );
}
