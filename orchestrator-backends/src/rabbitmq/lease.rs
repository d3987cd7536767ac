//! [`RabbitMqLease`]: a lease held as an exclusive queue, for the processes that share a
//! RabbitMQ store.

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, ErrorKind};
use orchestrator_core::{Lease, Result};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::connection::{Backoff, Connector, from_lapin, short};

/// A [`Lease`] held by declaring an exclusive queue (`<stream>.lease.<name>`) on a connection
/// of its own. RabbitMQ lets one connection at a time declare an exclusive queue and deletes
/// it when that connection closes, so the broker itself elects the holder: another
/// candidate's declaration is refused (`RESOURCE_LOCKED`) while the holder's connection
/// lives. When the holder dies, its TCP connection closes and the queue goes at once; when
/// it hangs or is cut off, the broker drops it after the missed heartbeats (60 s by default).
///
/// From [`RabbitMqEventStore::lease`](orchestrator_core::EventStore::lease).
pub struct RabbitMqLease {
    connector: Connector,
    queue: String,
    /// The channel that declared the queue, while this candidate holds the lease.
    held: Mutex<Option<Channel>>,
}

impl std::fmt::Debug for RabbitMqLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqLease")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl RabbitMqLease {
    pub(crate) fn new(url: &str, connection_name: &str, queue: String, backoff: Backoff) -> Self {
        Self {
            connector: Connector::new(url, format!("{connection_name}-lease"), backoff),
            queue,
            held: Mutex::new(None),
        }
    }
}

/// Whether a lapin error says another connection holds the exclusive queue.
fn is_locked(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)))
}

#[async_trait]
impl Lease for RabbitMqLease {
    fn describe(&self) -> String {
        format!("RabbitMQ exclusive queue `{}`", self.queue)
    }

    /// How often to look: holding costs nothing (the connection holds the queue), so this
    /// only bounds how soon a standby notices that the holder's connection closed.
    fn ttl(&self) -> Duration {
        Duration::from_secs(3)
    }

    async fn try_acquire(&self) -> Result<bool> {
        let mut held = self.held.lock().await;
        if held.as_ref().is_some_and(|c| c.status().connected()) {
            return Ok(true);
        }
        // Lost with its connection, if we had it: the broker deleted the queue.
        *held = None;
        let channel = self
            .connector
            .channel(Instant::now() + Duration::from_secs(5))
            .await?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = short("lease queue", &self.queue)?;
        match channel
            .queue_declare(queue, options, FieldTable::default())
            .await
        {
            Ok(_) => {
                *held = Some(channel);
                Ok(true)
            }
            // The broker closed that channel; the connection stays for the next try.
            Err(e) if is_locked(&e) => Ok(false),
            Err(e) => Err(from_lapin(e)),
        }
    }

    async fn release(&self) -> Result<()> {
        if let Some(channel) = self.held.lock().await.take()
            && channel.status().connected()
        {
            // Deleted before this returns (the broker answers `delete-ok`), so a standby's
            // next try takes the lease; closing the connection would delete it too, but
            // later, whenever the broker gets to it.
            let queue = short("lease queue", &self.queue)?;
            if let Err(e) = channel
                .queue_delete(queue, lapin::options::QueueDeleteOptions::default())
                .await
            {
                tracing::debug!(error = %e, queue = %self.queue, "deleting the lease queue failed; closing its connection deletes it");
            }
        }
        self.connector.close().await;
        Ok(())
    }
}
