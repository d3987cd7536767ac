//! A broker restart in the middle of a publish/consume run: every event published must be
//! delivered, and every extra delivery must be accounted for.
//!
//! The run is the same on every backend ([`drive`]): publishers send `events` events
//! (`{"seq": n}`), half of them one at a time and half in batches, publishing again what
//! failed; one consumer acks everything and records each delivery's attempt number. When
//! 30% are published, the backend's restart runs. What counts as an accounted-for
//! duplicate depends on the backend, so the checks live with each backend.
#![cfg_attr(
    not(any(feature = "redis", feature = "rabbitmq", feature = "kafka")),
    allow(dead_code, unused_imports)
)]

#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
#[cfg(feature = "redis")]
mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};

use crate::{Failure, Res};

/// Runs the restart scenario on `backend`.
#[cfg_attr(
    not(any(feature = "redis", feature = "rabbitmq", feature = "kafka")),
    allow(unused_variables)
)]
pub(crate) async fn run(backend: &str, events: usize) -> Result<(), Failure> {
    match backend {
        #[cfg(feature = "redis")]
        "redis" => redis::run(events).await,
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => rabbitmq::run(events).await,
        #[cfg(feature = "kafka")]
        "kafka" => kafka::run(events).await,
        #[cfg(not(feature = "redis"))]
        "redis" => Err(crate::not_built("redis")),
        #[cfg(not(feature = "rabbitmq"))]
        "rabbitmq" => Err(crate::not_built("rabbitmq")),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(crate::not_built("kafka")),
        other => Err(Failure::Failed(
            format!("unknown backend `{other}` (redis, rabbitmq, kafka)").into(),
        )),
    }
}

/// How a run is shaped.
pub(crate) struct Plan {
    /// Events to publish.
    pub(crate) events: usize,
    /// Publisher tasks; even ones publish one event at a time, odd ones in batches.
    pub(crate) publishers: usize,
    /// Events per batch of the batch publishers.
    pub(crate) batch: usize,
    /// The consumer's prefetch.
    pub(crate) prefetch: usize,
    /// How long the whole run may take.
    pub(crate) deadline: Duration,
}

/// What a run saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Each event's delivery attempts, by sequence number.
    pub(crate) seen: HashMap<u64, Vec<u32>>,
    /// Deliveries in all.
    pub(crate) deliveries: usize,
    /// Acks that failed (the broker was away): the broker delivers those again.
    pub(crate) ack_errors: usize,
    /// Errors the subscription returned (and recovered from).
    pub(crate) stream_errors: usize,
    /// Publishes that failed and were sent again.
    pub(crate) publish_errors: usize,
    /// Events in those publishes: the most that can have landed twice.
    pub(crate) republished: usize,
    /// Events published when the restart began.
    pub(crate) published_at_restart: usize,
    /// How long the broker was away.
    pub(crate) downtime: Duration,
    /// Events whose publish call overlapped the outage (began before the broker was back
    /// and returned after it went away): the only ones a publisher may have sent twice.
    pub(crate) in_flight_at_outage: std::collections::HashSet<u64>,
    /// Wall time of the run.
    pub(crate) took: Duration,
}

impl Tally {
    /// Sequence numbers published but never delivered.
    pub(crate) fn lost(&self, events: usize) -> Vec<u64> {
        (0..events as u64)
            .filter(|s| !self.seen.contains_key(s))
            .collect()
    }

    /// Deliveries beyond the first of each event.
    pub(crate) fn duplicates(&self) -> usize {
        self.deliveries - self.seen.len()
    }

    /// Deliveries the transport marked as redeliveries (attempt > 1).
    pub(crate) fn flagged(&self) -> usize {
        self.seen.values().flatten().filter(|&&a| a > 1).count()
    }

    /// Events delivered more than once as a first attempt: copies of the event, not
    /// redeliveries of one message.
    #[cfg(any(feature = "redis", feature = "rabbitmq"))]
    pub(crate) fn unflagged_twins(&self) -> Vec<u64> {
        self.seen
            .iter()
            .filter(|(_, attempts)| attempts.iter().filter(|&&a| a == 1).count() > 1)
            .map(|(&seq, _)| seq)
            .collect()
    }

    /// Copies of events whose publish was not in flight during the outage: duplicates
    /// nothing explains.
    #[cfg(feature = "rabbitmq")]
    pub(crate) fn unexplained_copies(&self) -> Vec<u64> {
        self.unflagged_twins()
            .into_iter()
            .filter(|seq| !self.in_flight_at_outage.contains(seq))
            .collect()
    }

    /// Extra first deliveries of events (copies, each counted once per extra copy).
    pub(crate) fn copies(&self) -> usize {
        self.seen
            .values()
            .map(|attempts| {
                attempts
                    .iter()
                    .filter(|&&a| a == 1)
                    .count()
                    .saturating_sub(1)
            })
            .sum()
    }
}

/// The sequence number an event of this scenario carries.
fn seq_of(event: &EventEnvelope) -> Option<u64> {
    event.data::<serde_json::Value>().ok()?["seq"].as_u64()
}

/// One event of the run.
fn event(topic: &str, seq: usize) -> Res<EventEnvelope> {
    Ok(EventEnvelope::new(
        topic,
        &serde_json::json!({ "seq": seq }),
    )?)
}

/// What one publisher did.
struct Published {
    /// Failed publishes, sent again.
    errors: usize,
    /// Events in them.
    republished: usize,
    /// Each publish call: its first and last sequence number, when it began and returned.
    calls: Vec<(usize, usize, Instant, Instant)>,
}

/// Publishes `seqs`, one at a time or in batches, sending again whatever fails.
async fn publish(
    transport: Arc<dyn Transport>,
    topic: String,
    seqs: Vec<usize>,
    batch: Option<usize>,
    published: Arc<AtomicUsize>,
) -> Res<Published> {
    let (mut errors, mut republished) = (0, 0);
    let mut calls = Vec::new();
    for chunk in seqs.chunks(batch.unwrap_or(1)) {
        let began = Instant::now();
        let events = chunk
            .iter()
            .map(|&seq| event(&topic, seq))
            .collect::<Res<Vec<_>>>()?;
        loop {
            let sent = if batch.is_some() {
                transport.publish_batch(&topic, events.clone()).await
            } else {
                transport.publish(&topic, events[0].clone()).await
            };
            match sent {
                Ok(()) => break,
                // The broker is away: send the same events again, a bounded number of times.
                Err(error) if errors < 1_000 => {
                    if errors % 50 == 0 {
                        eprintln!("  publish failed ({error}); sending it again");
                    }
                    errors += 1;
                    republished += events.len();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
        published.fetch_add(chunk.len(), Ordering::SeqCst);
        if let (Some(&first), Some(&last)) = (chunk.first(), chunk.last()) {
            calls.push((first, last, began, Instant::now()));
        }
    }
    Ok(Published {
        errors,
        republished,
        calls,
    })
}

/// Drives one run on `transport`: publishers, a consumer, and `restart` once 30% of the
/// events are published.
pub(crate) async fn drive<F, Fut>(
    transport: Arc<dyn Transport>,
    topic: &str,
    group: &str,
    plan: &Plan,
    restart: F,
) -> Res<Tally>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Res<Duration>>,
{
    let started = Instant::now();
    let options = SubscribeOptions::new(group, topic)?.prefetch(plan.prefetch);
    let mut subscription = transport.subscribe(options).await?;
    let events = plan.events;
    let deadline = started + plan.deadline;
    let received = Arc::new(AtomicUsize::new(0));
    let consumer = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut tally = Tally::default();
            while tally.seen.len() < events && Instant::now() < deadline {
                let next = tokio::time::timeout(Duration::from_secs(2), subscription.next());
                let delivery = match next.await {
                    Err(_) => continue,
                    Ok(Ok(Some(delivery))) => delivery,
                    Ok(Ok(None)) => return Err::<Tally, String>("the subscription ended".into()),
                    Ok(Err(error)) => {
                        tally.stream_errors += 1;
                        if tally.stream_errors % 20 == 1 {
                            eprintln!("  subscription error ({error}); going on");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let seq = seq_of(delivery.event())
                    .ok_or_else(|| format!("an event without `seq`: {:?}", delivery.event()))?;
                tally.deliveries += 1;
                tally.seen.entry(seq).or_default().push(delivery.attempt());
                received.store(tally.seen.len(), Ordering::Relaxed);
                if delivery.ack().await.is_err() {
                    tally.ack_errors += 1;
                }
            }
            Ok(tally)
        })
    };

    let published = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..plan.publishers)
        .map(|p| {
            let seqs: Vec<usize> = (p..events).step_by(plan.publishers).collect();
            let batch = (p % 2 == 1).then_some(plan.batch);
            tokio::spawn(publish(
                transport.clone(),
                topic.to_owned(),
                seqs,
                batch,
                published.clone(),
            ))
        })
        .collect();

    while published.load(Ordering::SeqCst) < events * 3 / 10 {
        if Instant::now() > deadline {
            return Err("publishing did not get going".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let published_at_restart = published.load(Ordering::SeqCst);
    eprintln!(
        "  restarting the broker: {published_at_restart} published, {} received",
        received.load(Ordering::Relaxed)
    );
    let outage_began = Instant::now();
    let downtime = restart().await?;
    let outage_ended = Instant::now();
    eprintln!(
        "  broker back after {downtime:.1?}: {} published, {} received",
        published.load(Ordering::SeqCst),
        received.load(Ordering::Relaxed)
    );
    let (mut publish_errors, mut republished) = (0, 0);
    let mut in_flight_at_outage = std::collections::HashSet::new();
    for publisher in publishers {
        let done = publisher.await??;
        publish_errors += done.errors;
        republished += done.republished;
        for (first, last, began, returned) in done.calls {
            if began < outage_ended && returned > outage_began {
                // The publisher's own sequence numbers step by `publishers`.
                in_flight_at_outage
                    .extend((first..=last).step_by(plan.publishers).map(|s| s as u64));
            }
        }
    }
    let mut tally = consumer.await??;
    tally.in_flight_at_outage = in_flight_at_outage;
    tally.publish_errors = publish_errors;
    tally.republished = republished;
    tally.published_at_restart = published_at_restart;
    tally.downtime = downtime;
    tally.took = started.elapsed();
    eprintln!(
        "  {} of {events} events received in {} deliveries, in {:.1?}",
        tally.seen.len(),
        tally.deliveries,
        tally.took
    );
    Ok(tally)
}

/// The figures every backend reports.
pub(crate) fn report(backend: &str, events: usize, tally: &Tally) -> crate::Report {
    let mut report = crate::Report::new("restart", backend);
    report
        .add("events", events)
        .add("lost", tally.lost(events).len())
        .add("deliveries", tally.deliveries)
        .add("duplicates", tally.duplicates())
        .add("flagged_redeliveries", tally.flagged())
        .add("copies", tally.copies())
        .add("in_flight_at_outage", tally.in_flight_at_outage.len())
        .add("ack_errors", tally.ack_errors)
        .add("publish_retries", tally.publish_errors)
        .add("published_at_restart", tally.published_at_restart)
        .add("downtime_ms", tally.downtime.as_millis())
        .add("seconds", format!("{:.1}", tally.took.as_secs_f64()));
    report
}

/// Fails unless every event arrived.
pub(crate) fn check_nothing_lost(events: usize, tally: &Tally) -> Res {
    let lost = tally.lost(events);
    crate::ensure(lost.is_empty(), || {
        format!(
            "{} of {events} events lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        )
    })
}
