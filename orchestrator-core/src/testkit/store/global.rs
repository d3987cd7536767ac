//! Cases: the global order, `read_all` filters and paging, atomic batches.

use chrono::{TimeZone, Utc};

use crate::envelope::EventEnvelope;
use crate::store::{EventFilter, EventStore, ReadAll};

use tokio::task::JoinSet;

use super::support::*;

/// Global positions strictly increase across streams in append order, and `read_all` returns
/// the events in that order, filtered or not.
pub async fn global_positions_increase_across_streams<S: EventStore>(store: &S) {
    let names = Names::new();
    let ty = names.event_type("e");
    let mut appended = Vec::new();
    let mut last = head(store).await;
    for n in 0..12 {
        let stream = names.stream(&format!("s{}", n % 3));
        let batch = if n == 7 {
            vec![event(&ty, n), event(&ty, n), event(&ty, n)]
        } else {
            vec![event(&ty, n)]
        };
        appended.extend(batch.iter().map(|e| e.id().clone()));
        let result = append(store, &stream, Any, batch).await;
        assert!(
            result.first_position > last,
            "append #{n} starts at {} although the previous one ended at {last}",
            result.first_position
        );
        last = result.last_position;
    }
    let ours = read_all(store, ReadAll::from(0, NO_LIMIT).filter(names.all_ours())).await;
    let got: Vec<_> = ours.iter().map(|e| e.id().clone()).collect();
    assert_eq!(
        got, appended,
        "read_all must return the events in append order"
    );
    assert_eq!(
        global(&ours[ours.len() - 1]),
        last,
        "position of the last event"
    );
    let unfiltered = read_all(store, ReadAll::from(global(&ours[0]), NO_LIMIT)).await;
    assert_same_events(
        &unfiltered,
        &ours,
        "unfiltered read_all from the first position",
    );
}

/// `read_all` from a position is inclusive; paging with a limit (each page starting after the
/// last position read) returns every event once, without gap or duplicate; positions 0 and 1
/// both read from the start; reading past the head or with limit 0 returns nothing.
pub async fn read_all_pages_without_gap_or_duplicate<S: EventStore>(store: &S) {
    let names = Names::new();
    let ty = names.event_type("e");
    for n in 0..25 {
        let stream = names.stream(if n % 2 == 0 { "even" } else { "odd" });
        let batch = if n % 6 == 0 {
            vec![event(&ty, n), event(&ty, n)]
        } else {
            vec![event(&ty, n)]
        };
        append(store, &stream, Any, batch).await;
    }
    let ours = read_all(store, ReadAll::from(1, NO_LIMIT).filter(names.all_ours())).await;
    assert_eq!(ours.len(), 30, "events appended by the case");
    let from_zero = read_all(store, ReadAll::from(0, NO_LIMIT).filter(names.all_ours())).await;
    assert_same_events(&from_zero, &ours, "read_all from position 0 vs 1");

    let start = global(&ours[0]);
    for limit in [1, 7, 30, 31] {
        let mut paged: Vec<EventEnvelope> = Vec::new();
        let mut from = start;
        loop {
            let page = read_all(store, ReadAll::from(from, limit)).await;
            let remaining = ours.len() - paged.len();
            assert_eq!(
                page.len(),
                remaining.min(limit),
                "page from {from} with limit {limit}: {remaining} events remain"
            );
            let Some(last) = page.last() else { break };
            from = global(last) + 1;
            paged.extend(page);
        }
        assert_same_events(&paged, &ours, &format!("read_all paged by {limit}"));
    }

    let fifth = &ours[4];
    let one = read_all(store, ReadAll::from(global(fifth), 1)).await;
    assert_same_events(
        &one,
        std::slice::from_ref(fifth),
        "read_all from an event's position",
    );
    let none = read_all(store, ReadAll::from(global(fifth), 0)).await;
    assert!(
        none.is_empty(),
        "read_all with limit 0 returned {} events",
        none.len()
    );
    let past = read_all(store, ReadAll::from(head(store).await + 1, 10)).await;
    assert!(
        past.is_empty(),
        "read_all past the head returned {} events",
        past.len()
    );
}

/// `read_all` filtered by one event type, by several, and by an unknown one.
pub async fn read_all_filters_by_event_type<S: EventStore>(store: &S) {
    let names = Names::new();
    let types = [
        names.event_type("a"),
        names.event_type("b"),
        names.event_type("c"),
    ];
    let mut appended = Vec::new();
    for n in 0..12 {
        let e = event(&types[n % 3], n);
        appended.push(e.clone());
        let stream = names.stream(if n < 6 { "x" } else { "y" });
        append(store, &stream, Any, vec![e]).await;
    }
    let expect = |wanted: &[&String]| -> Vec<EventEnvelope> {
        let wanted: Vec<_> = wanted.iter().map(|t| t.as_str()).collect();
        appended
            .iter()
            .filter(|e| wanted.contains(&e.event_type()))
            .cloned()
            .collect()
    };
    let only_a = read_all(
        store,
        ReadAll::from(0, NO_LIMIT).filter(EventFilter::all().event_type(&types[0])),
    )
    .await;
    assert_same_ids(&only_a, &expect(&[&types[0]]), "filter by one type");
    let a_and_c = EventFilter::all()
        .event_type(&types[0])
        .event_type(&types[2]);
    let a_and_c = read_all(store, ReadAll::from(0, NO_LIMIT).filter(a_and_c)).await;
    assert_same_ids(
        &a_and_c,
        &expect(&[&types[0], &types[2]]),
        "filter by two types",
    );
    let unknown = EventFilter::all().event_type(names.event_type("unknown"));
    let unknown = read_all(store, ReadAll::from(0, NO_LIMIT).filter(unknown)).await;
    assert!(
        unknown.is_empty(),
        "filter by a type never written: {unknown:?}"
    );
}

/// `read_all` filtered by event time: `from_time` inclusive, `to_time` exclusive, alone and
/// together; events are appended out of time order, so the filter must look at their time.
pub async fn read_all_filters_by_time_range<S: EventStore>(store: &S) {
    let names = Names::new();
    let ty = names.event_type("timed");
    let base = Utc.with_ymd_and_hms(2031, 1, 1, 0, 0, 0).unwrap();
    let at = |minutes: i64| base + chrono::Duration::minutes(minutes);
    let offsets = [5, 0, 3, 1, 4, 2];
    let mut appended = Vec::new();
    for (n, minutes) in offsets.iter().enumerate() {
        let e = event(&ty, n).with_time(at(*minutes));
        appended.push(e.clone());
        append(store, &names.stream("s"), Any, vec![e]).await;
    }
    for (from, to, expected_offsets) in [
        (Some(1), Some(4), vec![3, 1, 2]),
        (Some(4), None, vec![5, 4]),
        (None, Some(1), vec![0]),
        (Some(3), Some(3), vec![]),
        (Some(0), Some(6), vec![5, 0, 3, 1, 4, 2]),
    ] {
        let mut filter = names.all_ours();
        if let Some(m) = from {
            filter = filter.from_time(at(m));
        }
        if let Some(m) = to {
            filter = filter.to_time(at(m));
        }
        let got = read_all(store, ReadAll::from(0, NO_LIMIT).filter(filter)).await;
        let expected: Vec<_> = expected_offsets
            .iter()
            .map(|m| appended[offsets.iter().position(|o| o == m).unwrap()].clone())
            .collect();
        assert_same_ids(
            &got,
            &expected,
            &format!("time filter from {from:?} to {to:?} minutes"),
        );
    }
}

/// `read_all` filtered by stream id prefix: a prefix shared by several streams, a whole
/// stream id (which is also a prefix of longer ids), and a prefix matching nothing.
pub async fn read_all_filters_by_stream_prefix<S: EventStore>(store: &S) {
    let names = Names::new();
    let ty = names.event_type("e");
    let streams = ["cart", "cart-1", "order-1", "cart-2", "cart-1", "order-1"];
    let mut appended = Vec::new();
    for (n, s) in streams.iter().enumerate() {
        let e = event(&ty, n);
        appended.push((*s, e.clone()));
        append(store, &names.stream(s), Any, vec![e]).await;
    }
    for (prefix, expected_streams) in [
        ("cart-", &["cart-1", "cart-2"][..]),
        ("cart", &["cart", "cart-1", "cart-2"][..]),
        ("order-1", &["order-1"][..]),
        ("nothing", &[][..]),
    ] {
        let filter = EventFilter::all().stream_prefix(names.stream(prefix));
        let got = read_all(store, ReadAll::from(0, NO_LIMIT).filter(filter)).await;
        let expected: Vec<_> = appended
            .iter()
            .filter(|(s, _)| expected_streams.contains(s))
            .map(|(_, e)| e.clone())
            .collect();
        assert_same_ids(&got, &expected, &format!("stream prefix `{prefix}`"));
    }
}

/// Filters combine with `from_position` and `limit`: the read starts at the position
/// (inclusive), returns only matching events, and the limit counts the events returned, so
/// paging a filtered read returns every match once.
pub async fn read_all_filter_with_position_and_limit<S: EventStore>(store: &S) {
    let names = Names::new();
    let (a, b) = (names.event_type("a"), names.event_type("b"));
    let base = Utc.with_ymd_and_hms(2032, 2, 2, 0, 0, 0).unwrap();
    let at = |seconds: i64| base + chrono::Duration::seconds(seconds);
    for n in 0..20 {
        let e = event(if n % 2 == 0 { &a } else { &b }, n).with_time(at(n as i64));
        append(store, &names.stream("s"), Any, vec![e]).await;
    }
    let all = read_all(store, ReadAll::from(0, NO_LIMIT).filter(names.all_ours())).await;
    assert_eq!(all.len(), 20, "events appended by the case");
    let only_a = names.all_ours().event_type(&a);

    let from_b = read_all(
        store,
        ReadAll::from(global(&all[5]), 3).filter(only_a.clone()),
    )
    .await;
    assert_same_events(
        &from_b,
        &[all[6].clone(), all[8].clone(), all[10].clone()],
        "type `a` from the 6th event, limit 3",
    );
    let from_a = read_all(
        store,
        ReadAll::from(global(&all[6]), 3).filter(only_a.clone()),
    )
    .await;
    assert_same_events(
        &from_a,
        &[all[6].clone(), all[8].clone(), all[10].clone()],
        "type `a` from the 7th event, limit 3",
    );

    let combined = only_a.clone().from_time(at(4)).to_time(at(15));
    let got = read_all(store, ReadAll::from(global(&all[7]), 2).filter(combined)).await;
    assert_same_events(
        &got,
        &[all[8].clone(), all[10].clone()],
        "type, time, position and limit combined",
    );

    let mut paged = Vec::new();
    let mut from = 0;
    for page_number in 0.. {
        assert!(page_number < 10, "paging type `a` by 3 does not end");
        let page = read_all(store, ReadAll::from(from, 3).filter(only_a.clone())).await;
        let remaining = 10 - paged.len();
        assert_eq!(
            page.len(),
            remaining.min(3),
            "filtered page from {from}: {remaining} matches remain"
        );
        let Some(last) = page.last() else { break };
        from = global(last) + 1;
        paged.extend(page);
    }
    let expected: Vec<_> = all.iter().step_by(2).cloned().collect();
    assert_same_events(&paged, &expected, "type `a` paged by 3");
}

// ---------------------------------------------------------------------------------------------
// Cases: atomic batches
// ---------------------------------------------------------------------------------------------

/// With `atomic_batch` (and `expected_version`), a multi-event append that conflicts writes
/// none of its events; the same batch with the right version writes all of them, at
/// consecutive versions.
pub async fn atomic_batch_conflict_writes_nothing<S: EventStore>(store: &S) {
    let caps = store.capabilities();
    if !caps.atomic_batch || !caps.expected_version {
        return skip(
            "atomic_batch_conflict_writes_nothing",
            store,
            "no `atomic_batch` or no `expected_version`",
        );
    }
    let names = Names::new();
    let stream = names.stream("s");
    let (ty, batch_ty) = (names.event_type("e"), names.event_type("batch"));
    append(store, &stream, Any, vec![event(&ty, 1), event(&ty, 2)]).await;
    let before = head(store).await;
    let batch: Vec<_> = (0..5).map(|n| event(&batch_ty, n)).collect();
    assert_wrong_version(
        store.append(&stream, Exact(1), batch.clone()).await,
        &stream,
        Exact(1),
        Some(2),
    );
    assert_eq!(head(store).await, before, "head after a rejected batch");
    let leaked = read_all(
        store,
        ReadAll::from(0, NO_LIMIT).filter(EventFilter::all().event_type(&batch_ty)),
    )
    .await;
    assert!(
        leaked.is_empty(),
        "{} events of a rejected batch were written",
        leaked.len()
    );

    let result = append(store, &stream, Exact(2), batch.clone()).await;
    assert_eq!(
        result.next_expected_version, 7,
        "the batch with the right version: {result:?}"
    );
    let events = read_back(store, &stream).await;
    assert_eq!(events.len(), 7, "the stream after the batch");
    for (i, (actual, original)) in events[2..].iter().zip(&batch).enumerate() {
        assert_stored(actual, original, &stream, i as u64 + 3, "batch");
    }
}

/// With `atomic_batch`, batches appended at once to one stream do not interleave: each
/// batch's events get consecutive versions, in order.
pub async fn concurrent_batches_do_not_interleave<S: EventStore + Clone>(store: &S) {
    if !store.capabilities().atomic_batch {
        return skip(
            "concurrent_batches_do_not_interleave",
            store,
            "no `atomic_batch`",
        );
    }
    const WRITERS: u64 = 4;
    const BATCHES: u64 = 5;
    const SIZE: u64 = 4;
    let names = Names::new();
    let stream = names.stream("s");
    let ty = names.event_type("e");
    let mut tasks = JoinSet::new();
    for writer in 0..WRITERS {
        let (store, stream, ty) = (store.clone(), stream.clone(), ty.clone());
        tasks.spawn(async move {
            for batch in 0..BATCHES {
                let events = (0..SIZE)
                    .map(|i| {
                        tag(
                            tag(tag(event(&ty, 0), "writer", writer), "batch", batch),
                            "item",
                            i,
                        )
                    })
                    .collect();
                append(&store, &stream, Any, events).await;
                tokio::task::yield_now().await;
            }
        });
    }
    join_all(tasks).await;
    let events = read_back(store, &stream).await;
    assert_eq!(
        events.len() as u64,
        WRITERS * BATCHES * SIZE,
        "events in the stream"
    );
    for (i, chunk) in events.chunks(SIZE as usize).enumerate() {
        let key = |e: &EventEnvelope| (header_u64(e, "writer"), header_u64(e, "batch"));
        let items: Vec<_> = chunk.iter().map(|e| header_u64(e, "item")).collect();
        assert!(
            chunk.iter().all(|e| key(e) == key(&chunk[0]))
                && items == (0..SIZE).collect::<Vec<_>>(),
            "versions {}..={}: batches interleaved: (writer, batch, item) = {:?}",
            i as u64 * SIZE + 1,
            (i as u64 + 1) * SIZE,
            chunk
                .iter()
                .map(|e| (key(e), header_u64(e, "item")))
                .collect::<Vec<_>>()
        );
    }
}
