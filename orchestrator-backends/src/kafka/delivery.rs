//! What the application holds: the subscription's delivery stream, and how each delivery is
//! settled (ack, nack into the retry topic, dead letter, or back to the retry topic when it
//! is dropped unsettled).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::transport::{Acknowledge, DeliveryInfo};
use orchestrator_core::{DeadLetter, Delivery, DeliveryStream, EventEnvelope, Result};
use tokio::sync::mpsc;

use super::consumer::{Pending, Subscription, persist};
use super::offsets::Slot;
use super::wire::RetryInfo;

/// The deliveries of one subscription.
pub(crate) struct KafkaDeliveryStream {
    rx: mpsc::Receiver<Pending>,
    sub: Arc<Subscription>,
}

impl KafkaDeliveryStream {
    pub(crate) fn new(rx: mpsc::Receiver<Pending>, sub: Arc<Subscription>) -> Self {
        Self { rx, sub }
    }
}

#[async_trait]
impl DeliveryStream for KafkaDeliveryStream {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        loop {
            let Some(p) = self.rx.recv().await else {
                return Ok(None);
            };
            // A message of a partition lost in a rebalance since it was read: its new owner
            // reads it again from the committed offset.
            if !self.sub.still_current(&p.slot, p.seen) {
                continue;
            }
            let info = DeliveryInfo {
                topic: Some(Arc::clone(&p.topic)),
                group: self.sub.group.as_str().into(),
                attempt: p.attempt,
                first_attempt_at: p.first_attempt_at,
                last_error: p.last_error,
            };
            let acker = KafkaAcker {
                sub: Arc::clone(&self.sub),
                slot: p.slot,
                event: p.event.clone(),
                topic: p.topic,
                attempt: p.attempt,
                first_attempt_at: p.first_attempt_at,
                settled: false,
                retry: None,
            };
            return Ok(Some(Delivery::new(p.event, info, Box::new(acker))));
        }
    }
}

/// Settles one delivery.
struct KafkaAcker {
    sub: Arc<Subscription>,
    slot: Slot,
    event: EventEnvelope,
    topic: Arc<str>,
    attempt: u32,
    first_attempt_at: DateTime<Utc>,
    settled: bool,
    /// The delay and reason of a nack that failed, for the retry from `Drop`.
    retry: Option<(Duration, String)>,
}

impl KafkaAcker {
    fn retry_info(&self, delay: Duration, reason: String) -> RetryInfo {
        let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        RetryInfo {
            topic: self.topic.to_string(),
            attempt: self.attempt.saturating_add(1),
            first_attempt_at: Some(self.first_attempt_at),
            last_error: Some(reason),
            due_at_ms: Utc::now().timestamp_millis().saturating_add(delay),
            group: Some(self.sub.group.clone()),
        }
    }

    fn settle(&mut self) {
        self.settled = true;
        self.sub.settle(&self.slot);
    }
}

#[async_trait]
impl Acknowledge for KafkaAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settle();
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration, reason: String) -> Result<()> {
        if !self.sub.is_current(&self.slot) {
            // The partition moved on: the message comes back from the committed offset.
            self.settled = true;
            return Ok(());
        }
        let info = self.retry_info(delay, reason.clone());
        let sub = Arc::clone(&self.sub);
        match sub
            .transport
            .send_retry(&sub.retry_topic, &self.event, &info)
            .await
        {
            Ok(()) => {
                self.settle();
                Ok(())
            }
            Err(error) => {
                // `Drop` keeps trying, so the message is not stuck.
                self.retry = Some((delay, reason));
                Err(error)
            }
        }
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<()> {
        use orchestrator_core::DeadLetterQueue as _;
        let reason = letter.reason.clone();
        match self.sub.transport.dlq.push(letter).await {
            Ok(()) => {
                self.settle();
                Ok(())
            }
            Err(error) => {
                self.retry = Some((Duration::ZERO, reason));
                Err(error)
            }
        }
    }
}

impl Drop for KafkaAcker {
    /// An unsettled delivery goes to its group's retry topic, due at once (or after the
    /// delay of a nack that failed), so it comes back.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to send from: the message stays unsettled and comes back from the
            // committed offset after the next rebalance or restart.
            return;
        };
        let (delay, reason) = self.retry.take().unwrap_or_else(|| {
            (
                Duration::ZERO,
                "the delivery was dropped without being settled".to_owned(),
            )
        });
        let info = self.retry_info(delay, reason);
        let (sub, slot, event) = (Arc::clone(&self.sub), self.slot.clone(), self.event.clone());
        runtime.spawn(async move {
            persist(&sub, &slot, || {
                let (sub, event, info) = (Arc::clone(&sub), event.clone(), info.clone());
                async move {
                    sub.transport
                        .send_retry(&sub.retry_topic, &event, &info)
                        .await
                }
            })
            .await;
        });
    }
}
