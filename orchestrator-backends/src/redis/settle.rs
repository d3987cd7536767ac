//! How a delivery is settled with Redis: acks in batches, nacks to the retry stream or the
//! delayed set, dead letters, and what happens to a delivery dropped unsettled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::{Acknowledge, DeadLetter, Result};
use tokio::sync::mpsc;

use super::conn::with_retry;
use super::consumer::InFlight;
use super::scripts;
use super::transport::{Shared, lock};

/// Moves the group's delayed messages that are due into its retry stream; returns how long
/// until the next one is due.
pub(super) async fn move_due(shared: &Shared, group: &str) -> Result<Option<Duration>> {
    let (delayed, retry) = (shared.keys.delayed(group), shared.keys.retry(group));
    let (_moved, wait): (i64, i64) = with_retry(&shared.config, "move due", |_| {
        let mut manager = shared.manager.clone();
        let mut invocation = scripts::MOVE_DUE.prepare_invoke();
        invocation.key(&delayed).key(&retry).arg(1000);
        async move { invocation.invoke_async(&mut manager).await }
    })
    .await?;
    Ok(u64::try_from(wait).ok().map(Duration::from_millis))
}

/// An ack waiting to be sent.
pub(super) struct AckItem {
    pub(super) key: Arc<str>,
    pub(super) id: String,
    pub(super) delete: bool,
}

/// Sends acks in batches: whatever accumulated while the previous batch was in flight goes in
/// one pipeline.
pub(super) async fn ack_loop(
    shared: Arc<Shared>,
    group: Arc<str>,
    mut rx: mpsc::UnboundedReceiver<AckItem>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1000).await > 0 {
        let mut by_key: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
        for item in &batch {
            let (ack, del) = by_key.entry(&item.key).or_default();
            ack.push(&item.id);
            if item.delete {
                del.push(&item.id);
            }
        }
        let mut pipe = redis::pipe();
        for (key, (ack, del)) in &by_key {
            pipe.cmd("XACK").arg(*key).arg(&*group).arg(ack).ignore();
            if !del.is_empty() {
                pipe.cmd("XDEL").arg(*key).arg(del).ignore();
            }
        }
        let sent = with_retry(&shared.config, "XACK", |_| {
            let mut manager = shared.manager.clone();
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut manager).await }
        })
        .await;
        if let Err(error) = sent {
            // The entries stay pending and are reclaimed after the min-idle time.
            tracing::error!(%error, acks = batch.len(), "acks failed; the events will be redelivered");
        }
        batch.clear();
    }
}

/// Settles one delivery with Redis.
pub(super) struct Acker {
    pub(super) shared: Arc<Shared>,
    pub(super) acks: mpsc::UnboundedSender<AckItem>,
    pub(super) in_flight: InFlight,
    pub(super) group: Arc<str>,
    pub(super) stream_key: Arc<str>,
    pub(super) entry_id: String,
    pub(super) is_retry: bool,
    pub(super) topic: String,
    pub(super) event_type: String,
    pub(super) event_json: Vec<u8>,
    pub(super) attempt: u32,
    pub(super) first_attempt_at: DateTime<Utc>,
    pub(super) last_error: Option<String>,
    /// Whether the application got it (a delivery never handed out goes back without
    /// counting an attempt).
    pub(super) handed_out: bool,
    pub(super) settled: bool,
}

impl Acker {
    /// No longer held by this consumer: from now on the entry may be reclaimed if it stays
    /// pending (say the settling command fails).
    fn release(&self) {
        lock(&self.in_flight).remove(&(self.stream_key.clone(), self.entry_id.clone()));
    }

    /// Sends the message back for attempt `attempt` after `delay`.
    async fn requeue(&self, delay: Duration, attempt: u32, error: &str) -> Result<()> {
        let shared = &self.shared;
        let keys = &shared.keys;
        let (retry, delayed) = (keys.retry(&self.group), keys.delayed(&self.group));
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let first = self.first_attempt_at.timestamp_millis().to_string();
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        let done: i64 = with_retry(&shared.config, "nack", |_| {
            let mut manager = shared.manager.clone();
            let mut invocation = scripts::NACK.prepare_invoke();
            invocation
                .key(&*self.stream_key)
                .key(&retry)
                .key(&delayed)
                .arg(&*self.group)
                .arg(&self.entry_id)
                .arg(if self.is_retry { "1" } else { "0" })
                .arg(delay_ms)
                .arg(&self.topic)
                .arg(&self.event_type)
                .arg(self.event_json.as_slice())
                .arg(attempt)
                .arg(&first)
                .arg(error)
                .arg(&nonce);
            async move { invocation.invoke_async(&mut manager).await }
        })
        .await?;
        if done == 0 {
            tracing::debug!(entry = %self.entry_id, "nack of a delivery that was settled already");
        } else if !delay.is_zero() {
            // Move it back on time from here; the consumers' polling covers a process that
            // stops before then.
            let shared = shared.clone();
            let group = self.group.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Err(error) = move_due(&shared, &group).await {
                    tracing::debug!(%error, "moving a delayed message failed; polling will");
                }
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Acknowledge for Acker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        self.release();
        self.acks
            .send(AckItem {
                key: self.stream_key.clone(),
                id: std::mem::take(&mut self.entry_id),
                delete: self.is_retry,
            })
            .map_err(|_| orchestrator_core::Error::Closed {
                what: "redis consumer".into(),
            })
    }

    async fn nack(mut self: Box<Self>, delay: Duration, reason: String) -> Result<()> {
        self.settled = true;
        self.release();
        self.requeue(delay, self.attempt.saturating_add(1), &reason)
            .await
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        self.settled = true;
        self.release();
        let shared = &self.shared;
        let mut invocation = scripts::DEAD_LETTER.prepare_invoke();
        shared.dlq.park_invocation(&mut invocation, &letter)?;
        invocation
            .key(&*self.stream_key)
            .arg(&*self.group)
            .arg(&self.entry_id)
            .arg(if self.is_retry { "1" } else { "0" });
        let invocation = &invocation;
        let done: i64 = with_retry(&shared.config, "dead letter", |_| {
            let mut manager = shared.manager.clone();
            async move { invocation.invoke_async(&mut manager).await }
        })
        .await?;
        if done == 0 {
            tracing::debug!(entry = %self.entry_id, "dead-lettering a delivery that was settled already");
        } else {
            tracing::debug!(letter = %letter.id, event = %letter.event.id(), group = %self.group, "dead-lettered");
        }
        Ok(())
    }
}

impl Drop for Acker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.release();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to send it back from: it stays pending and is reclaimed later.
            return;
        };
        let acker = Acker {
            shared: self.shared.clone(),
            acks: self.acks.clone(),
            in_flight: self.in_flight.clone(),
            group: self.group.clone(),
            stream_key: self.stream_key.clone(),
            entry_id: std::mem::take(&mut self.entry_id),
            is_retry: self.is_retry,
            topic: std::mem::take(&mut self.topic),
            event_type: std::mem::take(&mut self.event_type),
            event_json: std::mem::take(&mut self.event_json),
            attempt: self.attempt,
            first_attempt_at: self.first_attempt_at,
            last_error: self.last_error.take(),
            handed_out: self.handed_out,
            settled: true,
        };
        runtime.spawn(async move {
            let (attempt, error) = if acker.handed_out {
                (
                    acker.attempt.saturating_add(1),
                    "the delivery was dropped without being settled".to_owned(),
                )
            } else {
                (acker.attempt, acker.last_error.clone().unwrap_or_default())
            };
            if let Err(error) = acker.requeue(Duration::ZERO, attempt, &error).await {
                tracing::warn!(%error, entry = %acker.entry_id, "returning a dropped delivery failed; it will be reclaimed");
            }
        });
    }
}
