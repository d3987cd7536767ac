//! `PostgresTransport` against the live PostgreSQL: the transport conformance suite, the
//! event-size cases, and what only a database can get wrong — rows written by hand that hold
//! no valid event, and rows of a consumer that went away without settling.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orchestrator_backends::postgres::PostgresTransport;
use orchestrator_core::testkit::transport::{
    oversize_events_are_refused, received_oversize_events_are_dead_lettered, run_all,
};
use orchestrator_core::{
    DeadLetterQuery, Delivery, DeliveryStream, EventEnvelope, MaxEventSize, SubscribeOptions,
    Transport,
};
use postgres_support::{Cleanup, config, random_schema, raw, reachable};

const WAIT: Duration = Duration::from_secs(20);

async fn recv(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

fn suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_transport_conforms() {
    let Some(url) = reachable().await else { return };
    let prefix = random_schema();
    let _cleanup = Cleanup::new(&url, &prefix);
    let case = AtomicUsize::new(0);
    run_all(|| {
        // A schema per case: the dead-letter cases count letters.
        let config = config(
            &url,
            &format!("{prefix}_{}", case.fetch_add(1, Ordering::Relaxed)),
        );
        async move { PostgresTransport::connect(config).await.unwrap() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_transport_enforces_the_event_size() {
    let Some(url) = reachable().await else { return };
    let prefix = random_schema();
    let _cleanup = Cleanup::new(&url, &prefix);
    let limit = MaxEventSize::new(4096).unwrap();
    let small = PostgresTransport::connect(config(&url, &prefix).with_max_event_size(limit))
        .await
        .unwrap();
    oversize_events_are_refused(&small, limit).await;
    let schema = format!("{prefix}_b");
    let large = PostgresTransport::connect(config(&url, &schema))
        .await
        .unwrap();
    let small = PostgresTransport::connect(config(&url, &schema).with_max_event_size(limit))
        .await
        .unwrap();
    received_oversize_events_are_dead_lettered(&large, &small, limit).await;
}

/// Rows written by another client that hold no valid event are dead-lettered with the
/// reason; the consumer goes on to the valid event after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_dead_lettered_and_the_consumer_goes_on() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let transport = PostgresTransport::connect(config(&url, &schema))
        .await
        .unwrap();
    let topic = format!("t{}.order.placed", suffix());
    let group = format!("g{}", suffix());
    let mut sub = transport
        .subscribe(SubscribeOptions::new(&group, &topic).unwrap())
        .await
        .unwrap();
    let client = raw(&url).await;
    let bad_rows = [
        // Not JSON at all.
        "not json",
        // JSON, not a CloudEvent: the required attributes are missing.
        r#"{"specversion":"1.0"}"#,
        // A CloudEvent whose binary data is not base64.
        r#"{"specversion":"1.0","id":"e-1","source":"/by-hand","type":"order.placed","data_base64":"%%%"}"#,
        // A CloudEvent of a version this library does not speak.
        r#"{"specversion":"0.1","id":"e-2","source":"/by-hand","type":"order.placed","data":{}}"#,
    ];
    for bad in bad_rows {
        client
            .execute(
                &format!(
                    "INSERT INTO \"{schema}\".transport_queue (group_name, topic, event) \
                     VALUES ($1, $2, $3)"
                ),
                &[&group, &topic, &bad],
            )
            .await
            .unwrap();
    }
    let good = EventEnvelope::new(&topic, &serde_json::json!({"ok": true})).unwrap();
    transport.publish(&topic, good.clone()).await.unwrap();
    let delivery = recv(&mut sub, "the valid event").await;
    assert_eq!(delivery.event().id(), good.id());
    delivery.ack().await.unwrap();
    let letters = transport
        .dead_letter_queue()
        .list(&DeadLetterQuery::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), bad_rows.len(), "{letters:?}");
    for letter in &letters {
        eprintln!("dead letter: {}", letter.reason);
    }
    assert!(
        letters
            .iter()
            .all(|l| l.subscription == group && !l.reason.is_empty())
    );
    // Each letter keeps the row's bytes and says what was wrong with them.
    for (letter, (bad, cause)) in
        letters.iter().zip(
            bad_rows
                .iter()
                .zip(["JSON", "missing", "base64", "specversion"]),
        )
    {
        assert_eq!(letter.event.data_bytes().as_ref(), bad.as_bytes());
        assert!(
            letter.reason.contains(cause),
            "the reason for {bad:?} does not say {cause:?}: {}",
            letter.reason
        );
    }
}

/// A consumer that claims a row and dies (its process, not its `Drop`) holds it only until
/// the visibility timeout: then another consumer of the group gets it, as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_consumers_rows_come_back_after_the_visibility_timeout() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let transport = PostgresTransport::connect(config(&url, &schema))
        .await
        .unwrap()
        .with_visibility_timeout(Duration::from_millis(500));
    let topic = format!("t{}.order.placed", suffix());
    let group = format!("g{}", suffix());
    // A crashed consumer: the row claimed by hand, as a consumer's claim would, and never
    // settled.
    let options = SubscribeOptions::new(&group, &topic).unwrap();
    let mut sub = transport.subscribe(options).await.unwrap();
    let event = EventEnvelope::new(&topic, &serde_json::json!({"n": 1})).unwrap();
    let client = raw(&url).await;
    client
        .batch_execute(&format!(
            "CREATE FUNCTION \"{schema}\".crash() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN NEW.locked_until := now() + interval '1 second'; RETURN NEW; END $$;
             CREATE TRIGGER crash BEFORE INSERT ON \"{schema}\".transport_queue
               FOR EACH ROW EXECUTE FUNCTION \"{schema}\".crash();"
        ))
        .await
        .unwrap();
    let published = std::time::Instant::now();
    transport.publish(&topic, event.clone()).await.unwrap();
    let delivery = recv(&mut sub, "the row after its lock ran out").await;
    assert!(published.elapsed() >= Duration::from_millis(900));
    assert_eq!(delivery.event().id(), event.id());
    assert_eq!(delivery.attempt(), 2);
    delivery.ack().await.unwrap();
}

/// Acks given together (their deletes batched) are each answered only once their rows are
/// gone, and a nack among them still brings its event back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acks_delete_every_row_and_nacks_among_them_come_back() {
    let Some(url) = reachable().await else { return };
    let schema = random_schema();
    let _cleanup = Cleanup::new(&url, &schema);
    let transport = PostgresTransport::connect(config(&url, &schema))
        .await
        .unwrap();
    let topic = format!("t{}.order.placed", suffix());
    let group = format!("g{}", suffix());
    let options = SubscribeOptions::new(&group, &topic).unwrap().prefetch(100);
    let mut sub = transport.subscribe(options).await.unwrap();
    let events: Vec<EventEnvelope> = (0..300)
        .map(|n| EventEnvelope::new(&topic, &serde_json::json!({ "n": n })).unwrap())
        .collect();
    transport
        .publish_batch(&topic, events.clone())
        .await
        .unwrap();
    let nacked = events[7].id().clone();
    let mut settles = tokio::task::JoinSet::new();
    let mut redelivered = None;
    // The 300 events and the nacked one once more, in whatever order they come.
    for _ in 0..=events.len() {
        let delivery = recv(&mut sub, "a published event").await;
        if *delivery.event().id() == nacked && delivery.attempt() == 1 {
            settles.spawn(delivery.nack(Duration::ZERO, "once more"));
            continue;
        }
        if *delivery.event().id() == nacked {
            redelivered = Some(delivery.attempt());
        }
        settles.spawn(delivery.ack());
    }
    while let Some(settled) = settles.join_next().await {
        settled.unwrap().unwrap();
    }
    assert_eq!(
        redelivered,
        Some(2),
        "the nacked event came back as attempt 2"
    );
    // Every acked row is gone by the time its ack returned.
    let left: i64 = raw(&url)
        .await
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".transport_queue WHERE group_name = $1"),
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err(),
        "nothing comes again"
    );
}
