//! Cases: subscriptions.

use std::sync::Arc;

use tokio::sync::Barrier;

use crate::store::{EventFilter, EventStore, ReadAll};

use tokio::task::JoinSet;

use super::support::*;

/// A subscription from a position first delivers the stored events from there, then live
/// ones as they are appended, exactly as `read_all` returns them.
pub async fn subscribe_catches_up_then_goes_live<S: EventStore>(store: &S) {
    let names = Names::new();
    let ty = names.event_type("e");
    let stream = names.stream("s");
    let first = append(store, &stream, Any, (0..5).map(|n| event(&ty, n)).collect()).await;
    let stored = read_all(
        store,
        ReadAll::from(first.first_position, NO_LIMIT).filter(names.all_ours()),
    )
    .await;

    let mut from_start = subscribe(store, first.first_position, names.all_ours()).await;
    let mut from_middle = subscribe(store, global(&stored[3]), names.all_ours()).await;
    let caught_up = receive(&mut from_start, 5, "catch-up from the first event").await;
    assert_same_events(&caught_up, &stored, "catch-up from the first event");
    let caught_up = receive(&mut from_middle, 2, "catch-up from the 4th event").await;
    assert_same_events(&caught_up, &stored[3..], "catch-up from the 4th event");
    assert_quiet(&mut from_start, "after catching up").await;

    let live = append(store, &stream, Any, vec![event(&ty, 5), event(&ty, 6)]).await;
    append(store, &names.stream("other"), Any, vec![event(&ty, 7)]).await;
    let live_events = read_all(
        store,
        ReadAll::from(live.first_position, NO_LIMIT).filter(names.all_ours()),
    )
    .await;
    assert_eq!(live_events.len(), 3, "live events appended");
    let got = receive(&mut from_start, 3, "live events").await;
    assert_same_events(&got, &live_events, "live events");
    let got = receive(&mut from_middle, 3, "live events (second subscriber)").await;
    assert_same_events(&got, &live_events, "live events (second subscriber)");
    assert_quiet(&mut from_start, "after the live events").await;
    assert_quiet(
        &mut from_middle,
        "after the live events (second subscriber)",
    )
    .await;
}

/// While four tasks keep appending (single events and batches), a subscription started in
/// the middle of it, from a position before all of them, delivers every event exactly once,
/// in strictly increasing position order, with no gap or duplicate at the hand-over from
/// catch-up to live: the same events as `read_all` afterwards.
pub async fn subscribe_races_concurrent_appends<S: EventStore + Clone>(store: &S) {
    const WRITERS: usize = 4;
    const BEFORE: usize = 10;
    const AFTER: usize = 40;
    let batch_len = |n: usize| if n % 5 == 4 { 2 } else { 1 };
    let names = Names::new();
    let ty = names.event_type("e");
    let pre = append(
        store,
        &names.stream("pre"),
        Any,
        (0..10).map(|n| event(&ty, n)).collect(),
    )
    .await;
    let barrier = Arc::new(Barrier::new(WRITERS + 1));
    let mut tasks = JoinSet::new();
    for writer in 0..WRITERS {
        let (store, barrier, ty) = (store.clone(), barrier.clone(), ty.clone());
        let stream = names.stream(&format!("w{writer}"));
        tasks.spawn(async move {
            for n in 0..BEFORE + AFTER {
                if n == BEFORE {
                    barrier.wait().await;
                }
                let batch = (0..batch_len(n)).map(|_| event(&ty, n)).collect();
                append(&store, &stream, Any, batch).await;
                tokio::task::yield_now().await;
            }
        });
    }

    // Subscribe while the writers are appending, so the catch-up races the appends.
    barrier.wait().await;
    let mut sub = subscribe(store, pre.first_position, names.all_ours()).await;
    let total = 10 + WRITERS * (0..BEFORE + AFTER).map(batch_len).sum::<usize>();
    let received = receive(&mut sub, total, "events appended during the subscription").await;
    join_all(tasks).await;
    let expected = read_all(
        store,
        ReadAll::from(pre.first_position, NO_LIMIT).filter(names.all_ours()),
    )
    .await;
    assert_same_events(
        &received,
        &expected,
        "subscription during concurrent appends vs read_all",
    );
    assert_quiet(&mut sub, "after every appended event").await;
}

/// A subscription with a filter (by type, by stream prefix) delivers only matching events,
/// stored and live.
pub async fn subscribe_with_filter<S: EventStore>(store: &S) {
    let names = Names::new();
    let (a, b) = (names.event_type("a"), names.event_type("b"));
    let (x, y) = (names.stream("x"), names.stream("y"));
    let first = append(
        store,
        &x,
        Any,
        vec![event(&a, 0), event(&b, 1), event(&a, 2)],
    )
    .await;
    append(
        store,
        &y,
        Any,
        vec![event(&b, 3), event(&a, 4), event(&b, 5)],
    )
    .await;
    let by_type = names.all_ours().event_type(&a);
    let by_stream = EventFilter::all().stream_prefix(&x);
    let mut sub_type = subscribe(store, first.first_position, by_type.clone()).await;
    let mut sub_stream = subscribe(store, first.first_position, by_stream.clone()).await;

    for (sub, filter, count, what) in [
        (&mut sub_type, &by_type, 3, "stored events of type `a`"),
        (
            &mut sub_stream,
            &by_stream,
            3,
            "stored events of stream `x`",
        ),
    ] {
        let expected = read_all(
            store,
            ReadAll::from(first.first_position, NO_LIMIT).filter(filter.clone()),
        )
        .await;
        assert_eq!(expected.len(), count, "{what}: read_all");
        let got = receive(sub, count, what).await;
        assert_same_events(&got, &expected, what);
    }

    let live = append(store, &x, Any, vec![event(&b, 6), event(&a, 7)]).await;
    append(store, &y, Any, vec![event(&a, 8), event(&b, 9)]).await;
    for (sub, filter, what) in [
        (&mut sub_type, &by_type, "live events of type `a`"),
        (&mut sub_stream, &by_stream, "live events of stream `x`"),
    ] {
        let expected = read_all(
            store,
            ReadAll::from(live.first_position, NO_LIMIT).filter(filter.clone()),
        )
        .await;
        assert_eq!(expected.len(), 2, "{what}: read_all");
        let got = receive(sub, 2, what).await;
        assert_same_events(&got, &expected, what);
        assert_quiet(sub, what).await;
    }
}

/// A subscription from `head_position + 1` delivers only events appended after it started.
pub async fn subscribe_from_head_sees_only_new_events<S: EventStore>(store: &S) {
    let names = Names::new();
    let ty = names.event_type("e");
    append(
        store,
        &names.stream("s"),
        Any,
        (0..3).map(|n| event(&ty, n)).collect(),
    )
    .await;
    let from = head(store).await + 1;
    let mut ours = subscribe(store, from, names.all_ours()).await;
    let mut everything = subscribe(store, from, EventFilter::all()).await;
    assert_quiet(&mut ours, "subscribed at the head").await;
    assert_quiet(&mut everything, "subscribed at the head, unfiltered").await;

    let new = append(
        store,
        &names.stream("s"),
        Any,
        vec![event(&ty, 3), event(&ty, 4)],
    )
    .await;
    let expected = read_all(store, ReadAll::from(new.first_position, NO_LIMIT)).await;
    assert_eq!(expected.len(), 2, "events appended after subscribing");
    let got = receive(&mut ours, 2, "new events").await;
    assert_same_events(&got, &expected, "new events");
    let got = receive(&mut everything, 2, "new events, unfiltered").await;
    assert_same_events(&got, &expected, "new events, unfiltered");
    assert_quiet(&mut ours, "after the new events").await;
    assert_quiet(&mut everything, "after the new events, unfiltered").await;
}
