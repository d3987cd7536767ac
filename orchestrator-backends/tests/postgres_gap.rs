//! The gap test of issue 21: 16 concurrent writers, about 10% of their transactions rolled
//! back, and subscribers following the global order must see every committed event exactly
//! once, in order, with nothing of the rolled-back ones.
//!
//! Rolled-back transactions are of two kinds, half each: raw tokio-postgres transactions
//! that take the append lock and insert rows exactly as an append does (so they hold
//! positions) and then roll back after a pause; and appends that fail on an
//! expected-version conflict after taking the lock. `ORCHESTRATOR_PG_GAP_EVENTS` sets how
//! many events are committed (default 20,000; issue 21 asks for 100,000).
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use orchestrator_backends::postgres::PostgresEventStore;
use orchestrator_core::{Error, EventEnvelope, EventFilter, EventId, EventStore, ExpectedVersion};
use postgres_support::{Cleanup, config, random_schema, raw, reachable};

const WRITERS: usize = 16;

/// The append lock's first key, as the module docs give it (`'ORCA'`).
const APPEND_LOCK_CLASS: i32 = 0x4f52_4341;

fn target() -> usize {
    std::env::var("ORCHESTRATOR_PG_GAP_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

/// A small deterministic generator per writer (xorshift), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Default)]
struct Tally {
    committed: Vec<(u64, EventId)>,
    rolled_back_raw: usize,
    conflicts: usize,
    appends: usize,
}

/// A subscriber from the start that collects `target` events and then checks that nothing
/// more arrives (no duplicate, nothing rolled back).
async fn follow(
    store: PostgresEventStore,
    target: usize,
) -> tokio::task::JoinHandle<Vec<(u64, EventId)>> {
    let mut subscription = store.subscribe(0, EventFilter::all()).await.unwrap();
    tokio::spawn(async move {
        let mut seen: Vec<(u64, EventId)> = Vec::with_capacity(target);
        while seen.len() < target {
            let event = tokio::time::timeout(Duration::from_secs(30), subscription.next())
                .await
                .unwrap_or_else(|_| panic!("the subscription stalled after {} events", seen.len()))
                .expect("the subscription ended")
                .expect("the subscription failed");
            seen.push((event.global_position().unwrap(), event.id().clone()));
        }
        let extra = tokio::time::timeout(Duration::from_millis(700), subscription.next()).await;
        assert!(
            extra.is_err(),
            "an event after the last committed one: {extra:?}"
        );
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_every_committed_event_once_in_order_despite_rollbacks() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let store = PostgresEventStore::connect(config(&url, &schema).with_pool_size(WRITERS))
        .await
        .unwrap();
    let target = target();
    let started = Instant::now();

    // One subscriber from the start, live all along; a second joins half-way, catching up
    // while the writers go on.
    let first = follow(store.clone(), target).await;

    // Events reserved by the writers (each reservation is then committed).
    let committed = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, committed, url, schema) = (
            store.clone(),
            committed.clone(),
            url.clone(),
            schema.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1).wrapping_mul(0x2545_f491));
            let mut raw = raw(&url).await;
            let mut tally = Tally::default();
            let mut versions: HashMap<String, u64> = HashMap::new();
            loop {
                let left = target.saturating_sub(committed.load(Ordering::SeqCst));
                if left == 0 {
                    return tally;
                }
                let stream = format!("gap-w{w}-s{}", rng.below(4));
                let version = versions.get(&stream).copied().unwrap_or(0);
                match rng.below(20) {
                    0 => {
                        // Holds positions under the append lock, then rolls back.
                        let tx = raw.transaction().await.unwrap();
                        tx.execute(
                            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                            &[&APPEND_LOCK_CLASS, &schema],
                        )
                        .await
                        .unwrap();
                        let rows = 1 + rng.below(3) as i64;
                        tx.execute(
                            &format!(
                                "INSERT INTO \"{schema}\".events (position, stream_id, \
                                 stream_version, event_id, event_type, event_time, event) \
                                 SELECT h.head + g, 'gap-rolled-back', g, \
                                        gen_random_uuid()::text, 'gap.rolled_back', now(), \
                                        '{{\"specversion\":\"1.0\"}}'::json \
                                 FROM (SELECT coalesce(max(position), 0) AS head \
                                       FROM \"{schema}\".events) h, \
                                      generate_series(1, $1::bigint) g"
                            ),
                            &[&rows],
                        )
                        .await
                        .unwrap();
                        tokio::time::sleep(Duration::from_micros(200 + rng.below(1500))).await;
                        tx.rollback().await.unwrap();
                        tally.rolled_back_raw += 1;
                    }
                    1 => {
                        // Takes the lock, finds the wrong version, writes nothing.
                        let event = EventEnvelope::new("gap.conflict", &w).unwrap();
                        match store
                            .append(&stream, ExpectedVersion::Exact(version + 7), vec![event])
                            .await
                        {
                            Err(Error::WrongExpectedVersion { actual, .. }) => {
                                assert_eq!(actual, (version > 0).then_some(version));
                            }
                            other => panic!("expected a conflict, got {other:?}"),
                        }
                        tally.conflicts += 1;
                    }
                    _ => {
                        // Reserves its events first, so that exactly `target` are written.
                        let want = 1 + rng.below(4) as usize;
                        let Ok(before) =
                            committed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                                (c < target).then(|| c + want.min(target - c))
                            })
                        else {
                            return tally;
                        };
                        let n = want.min(target - before);
                        let events: Vec<_> = (0..n)
                            .map(|i| EventEnvelope::new("gap.added", &(w, i)).unwrap())
                            .collect();
                        let ids: Vec<_> = events.iter().map(|e| e.id().clone()).collect();
                        let result = store
                            .append(&stream, ExpectedVersion::Exact(version), events)
                            .await
                            .unwrap();
                        versions.insert(stream, result.next_expected_version);
                        assert_eq!(result.last_position - result.first_position + 1, n as u64);
                        for (position, id) in (result.first_position..).zip(ids) {
                            tally.committed.push((position, id));
                        }
                        tally.appends += 1;
                    }
                }
            }
        }));
        if w == WRITERS / 2 {
            // Let the first half get going before the rest start.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The second subscriber, from the start, once about half the events are in.
    while committed.load(Ordering::SeqCst) < target / 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = follow(store.clone(), target).await;

    let mut expected: Vec<(u64, EventId)> = Vec::with_capacity(target);
    let (mut raw_rollbacks, mut conflicts, mut appends) = (0, 0, 0);
    for writer in writers {
        let tally = writer.await.unwrap();
        expected.extend(tally.committed);
        raw_rollbacks += tally.rolled_back_raw;
        conflicts += tally.conflicts;
        appends += tally.appends;
    }
    expected.sort_by_key(|(position, _)| *position);
    let written = started.elapsed();
    assert_eq!(expected.len(), target, "committed events");
    let head = store.head_position().await.unwrap();
    assert_eq!(
        head,
        expected.len() as u64,
        "positions have gaps or extra rows"
    );
    assert_eq!(
        expected.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        (1..=head).collect::<Vec<_>>(),
        "the committed positions are not 1..=head"
    );

    let transactions = raw_rollbacks + conflicts + appends;
    let rolled_back = raw_rollbacks + conflicts;
    eprintln!(
        "gap test: {} events committed by {appends} appends in {written:?}; {rolled_back} of \
         {transactions} transactions rolled back ({raw_rollbacks} raw after inserting, \
         {conflicts} on a version conflict)",
        expected.len()
    );
    assert!(
        rolled_back * 100 >= transactions * 5,
        "too few rollbacks to mean anything: {rolled_back} of {transactions}"
    );

    for (name, subscriber) in [("first", first), ("second", second)] {
        let seen = subscriber.await.unwrap();
        assert_eq!(
            seen.len(),
            target,
            "{name} subscriber: {} events",
            seen.len()
        );
        for (i, ((position, id), (want_position, want_id))) in
            seen.iter().zip(&expected).enumerate()
        {
            assert_eq!(
                (position, id),
                (want_position, want_id),
                "{name} subscriber: event #{i} differs from the committed order"
            );
        }
    }
    eprintln!(
        "gap test: both subscribers done after {:?}",
        started.elapsed()
    );
}
