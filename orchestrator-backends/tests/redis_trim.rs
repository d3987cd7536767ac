//! Trimming `RedisTransport`'s topic streams against the live Redis: what every group has
//! acknowledged goes, what any group still needs stays, and a stream whose consumers keep up
//! stays small.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod redis_support;

use std::time::{Duration, Instant};

use orchestrator_backends::redis::{RedisConfig, RedisTransport};
use orchestrator_core::{Delivery, DeliveryStream, EventEnvelope, SubscribeOptions, Transport};
use redis::aio::MultiplexedConnection;
use redis_support::{Cleanup, RawEntries, config, random_prefix, raw, reachable};

const WAIT: Duration = Duration::from_secs(20);

/// A live Redis, a key prefix of the test's own (deleted at the end) and a raw connection.
struct Fixture {
    url: String,
    prefix: String,
    conn: MultiplexedConnection,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn new() -> Option<Self> {
        let url = reachable().await?;
        let prefix = random_prefix();
        Some(Self {
            conn: raw(&url).await,
            _cleanup: Cleanup::new(&url, &prefix),
            url,
            prefix,
        })
    }

    fn key(&self, topic: &str) -> String {
        format!("{}topic:{topic}", self.prefix)
    }
}

fn event(topic: &str, seq: usize) -> EventEnvelope {
    EventEnvelope::new(topic, &serde_json::json!({ "seq": seq })).unwrap()
}

/// A transport that trims only when asked (the interval is never reached) and keeps no
/// acknowledged entry for its age.
fn trim_on_request(url: &str, prefix: &str) -> RedisConfig {
    config(url, prefix)
        .with_topic_trim_interval(Duration::from_secs(3600))
        .with_topic_retention(Duration::ZERO)
}

/// A transport that trims on every publish and keeps no acknowledged entry for its age.
fn trim_always(url: &str, prefix: &str) -> RedisConfig {
    config(url, prefix)
        .with_topic_trim_interval(Duration::ZERO)
        .with_topic_retention(Duration::ZERO)
}

async fn ids(conn: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    let entries: RawEntries = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    entries.into_iter().map(|(id, _)| id).collect()
}

async fn create_group(conn: &mut MultiplexedConnection, key: &str, group: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .query_async(conn)
        .await
        .unwrap();
}

/// `XREADGROUP` of the next `count` entries for `group`: they are pending until acked.
async fn read(conn: &mut MultiplexedConnection, key: &str, group: &str, count: usize) {
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("consumer")
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(key)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
}

async fn ack(conn: &mut MultiplexedConnection, key: &str, group: &str, ids: &[&String]) {
    let _: i64 = redis::cmd("XACK")
        .arg(key)
        .arg(group)
        .arg(ids)
        .query_async(conn)
        .await
        .unwrap();
}

async fn recv(stream: &mut Box<dyn DeliveryStream>) -> Delivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a delivery in time")
        .unwrap()
        .unwrap()
}

async fn xlen(conn: &mut MultiplexedConnection, key: &str) -> usize {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

/// Waits until `group` has nothing pending on `key` (acks are sent in the background).
async fn settled(conn: &mut MultiplexedConnection, key: &str, group: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let summary: (i64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
            .arg(key)
            .arg(group)
            .query_async(conn)
            .await
            .unwrap();
        if summary.0 == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "acks did not reach Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn publish(transport: &RedisTransport, topic: &str, n: usize) {
    transport
        .publish_batch(topic, (0..n).map(|i| event(topic, i)).collect())
        .await
        .unwrap();
}

/// A fast group acked everything; a slow group read six entries, acked three of them (1, 2
/// and 4) and has not read the last four. Trimming removes only entries 1 and 2: the slow
/// group's oldest unacknowledged entry (3) and everything after it stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_every_entry_a_slow_group_has_not_acknowledged() {
    let Some(mut fx) = Fixture::new().await else {
        return;
    };
    let transport = RedisTransport::connect(trim_on_request(&fx.url, &fx.prefix))
        .await
        .unwrap();
    let (topic, key) = ("stock.moved", fx.key("stock.moved"));
    publish(&transport, topic, 10).await;
    let all = ids(&mut fx.conn, &key).await;
    assert_eq!(all.len(), 10, "not trimmed on publish");
    create_group(&mut fx.conn, &key, "fast").await;
    create_group(&mut fx.conn, &key, "slow").await;
    read(&mut fx.conn, &key, "fast", 10).await;
    ack(&mut fx.conn, &key, "fast", &all.iter().collect::<Vec<_>>()).await;
    read(&mut fx.conn, &key, "slow", 6).await;
    ack(&mut fx.conn, &key, "slow", &[&all[0], &all[1], &all[3]]).await;

    let trim = transport.trim_topic(topic).await.unwrap();
    assert_eq!(trim.removed, 2, "{trim:?}");
    assert_eq!(trim.remaining, 8);
    assert_eq!(trim.cut, all[2]);
    assert_eq!(ids(&mut fx.conn, &key).await, all[2..].to_vec());

    // Once the slow group has caught up, only the newest entry (read by all) is left.
    ack(&mut fx.conn, &key, "slow", &[&all[2], &all[4], &all[5]]).await;
    assert_eq!(transport.trim_topic(topic).await.unwrap().removed, 3);
    assert_eq!(ids(&mut fx.conn, &key).await, all[5..].to_vec(), "4 unread");
    read(&mut fx.conn, &key, "slow", 10).await;
    ack(
        &mut fx.conn,
        &key,
        "slow",
        &all[6..].iter().collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(transport.trim_topic(topic).await.unwrap().removed, 4);
    assert_eq!(ids(&mut fx.conn, &key).await, all[9..].to_vec());
    transport.close().await;
}

/// A group that has not read anything yet keeps the whole stream, however far the others got;
/// a stream with no group keeps what is younger than the retention age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_has_not_read_keeps_its_entries() {
    let Some(mut fx) = Fixture::new().await else {
        return;
    };
    let transport = RedisTransport::connect(trim_on_request(&fx.url, &fx.prefix))
        .await
        .unwrap();
    let (topic, key) = ("stock.counted", fx.key("stock.counted"));
    publish(&transport, topic, 5).await;
    let all = ids(&mut fx.conn, &key).await;
    create_group(&mut fx.conn, &key, "fast").await;
    create_group(&mut fx.conn, &key, "late").await;
    read(&mut fx.conn, &key, "fast", 5).await;
    ack(&mut fx.conn, &key, "fast", &all.iter().collect::<Vec<_>>()).await;

    let trim = transport.trim_topic(topic).await.unwrap();
    assert_eq!((trim.removed, trim.remaining), (0, 5), "{trim:?}");
    assert_eq!(ids(&mut fx.conn, &key).await, all);

    // Without groups, only the retention age keeps entries.
    let lonely = "stock.audited";
    publish(&transport, lonely, 3).await;
    let keeper = RedisTransport::connect(
        trim_on_request(&fx.url, &fx.prefix).with_topic_retention(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    assert_eq!(keeper.trim_topic(lonely).await.unwrap().removed, 0);
    // The entries' ids are milliseconds: let the clock pass the last one.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let trim = transport.trim_topic(lonely).await.unwrap();
    assert_eq!((trim.removed, trim.remaining), (3, 0), "{trim:?}");
    assert_eq!(
        transport
            .trim_topic("never.published")
            .await
            .unwrap()
            .removed,
        0
    );
    keeper.close().await;
    transport.close().await;
}

/// Acknowledged entries younger than the retention age stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_age_keeps_young_acknowledged_entries() {
    let Some(mut fx) = Fixture::new().await else {
        return;
    };
    let transport = RedisTransport::connect(
        trim_on_request(&fx.url, &fx.prefix).with_topic_retention(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let (topic, key) = ("stock.held", fx.key("stock.held"));
    publish(&transport, topic, 4).await;
    let all = ids(&mut fx.conn, &key).await;
    create_group(&mut fx.conn, &key, "fast").await;
    read(&mut fx.conn, &key, "fast", 4).await;
    ack(&mut fx.conn, &key, "fast", &all.iter().collect::<Vec<_>>()).await;
    assert_eq!(transport.trim_topic(topic).await.unwrap().removed, 0);
    assert_eq!(ids(&mut fx.conn, &key).await.len(), 4);
    transport.close().await;
}

/// With trimming on (every publish here), a topic whose consumer acks everything stays at
/// about one batch, however much is published: without trimming it would hold all 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_keeps_a_stream_bounded_while_consumers_keep_up() {
    let Some(mut fx) = Fixture::new().await else {
        return;
    };
    let transport = RedisTransport::connect(trim_always(&fx.url, &fx.prefix))
        .await
        .unwrap();
    let (topic, key) = ("stock.flowed", fx.key("stock.flowed"));
    let mut sub = transport
        .subscribe(SubscribeOptions::new("keeper", topic).unwrap())
        .await
        .unwrap();
    const BATCH: usize = 50;
    let mut longest = 0;
    for round in 0..20 {
        publish(&transport, topic, BATCH).await;
        let len = xlen(&mut fx.conn, &key).await;
        longest = longest.max(len);
        assert!(
            len <= BATCH + 1,
            "round {round}: {len} entries, more than one batch and the last entry read"
        );
        for _ in 0..BATCH {
            recv(&mut sub).await.ack().await.unwrap();
        }
        settled(&mut fx.conn, &key, "keeper").await;
    }
    eprintln!("1,000 events published in batches of {BATCH}: the stream held at most {longest}");
    drop(sub);
    transport.close().await;
}

/// Through real subscriptions, with a trim on every publish: a slow group holding deliveries
/// unacknowledged keeps every entry from its oldest held one on, while a fast group acks
/// everything; once the slow group catches up it has received every event, and the stream
/// shrinks to the newest entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscription_loses_nothing_to_trimming() {
    let Some(mut fx) = Fixture::new().await else {
        return;
    };
    let transport = RedisTransport::connect(trim_always(&fx.url, &fx.prefix))
        .await
        .unwrap();
    let (topic, key) = ("stock.shipped", fx.key("stock.shipped"));
    let mut fast = transport
        .subscribe(SubscribeOptions::new("fast", topic).unwrap())
        .await
        .unwrap();
    let mut slow = transport
        .subscribe(SubscribeOptions::new("slow", topic).unwrap().prefetch(4))
        .await
        .unwrap();
    let mut published = Vec::new();
    let mut held = Vec::new();
    for round in 0..4 {
        let batch: Vec<EventEnvelope> = (0..10).map(|i| event(topic, round * 10 + i)).collect();
        published.extend(batch.iter().map(|e| e.id().clone()));
        transport.publish_batch(topic, batch).await.unwrap();
        for _ in 0..10 {
            recv(&mut fast).await.ack().await.unwrap();
        }
        if round == 0 {
            for _ in 0..3 {
                held.push(recv(&mut slow).await);
            }
        }
        settled(&mut fx.conn, &key, "fast").await;
        assert_eq!(
            xlen(&mut fx.conn, &key).await,
            published.len(),
            "round {round}: the slow group still holds the first events"
        );
    }
    let mut received: Vec<_> = held.iter().map(|d| d.event().id().clone()).collect();
    for delivery in held {
        delivery.ack().await.unwrap();
    }
    while received.len() < published.len() {
        let delivery = recv(&mut slow).await;
        received.push(delivery.event().id().clone());
        delivery.ack().await.unwrap();
    }
    assert_eq!(received, published, "every event, in order, none twice");
    settled(&mut fx.conn, &key, "slow").await;
    publish(&transport, topic, 1).await;
    let len = xlen(&mut fx.conn, &key).await;
    assert!(len <= 2, "{len} entries left once both groups caught up");
    drop((fast, slow));
    transport.close().await;
}
