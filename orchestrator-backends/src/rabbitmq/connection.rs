//! Connections that come back after the broker went away, and publishing with confirms.
//!
//! A [`Connector`] owns at most one AMQP connection and replaces it, with exponential
//! backoff, when it dropped. A [`Publisher`] keeps one confirm-mode channel on a connector
//! and publishes batches of messages, pipelined, returning only once the broker confirmed
//! every one of them; when the connection drops mid-batch it reconnects and publishes the
//! unconfirmed rest again (at-least-once), within a bounded time.

use orchestrator_core::redact::redact_url;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use orchestrator_core::{Error, Result};
use tokio::sync::Mutex;
use tokio::time::{Instant, sleep, timeout_at};

/// The backend name in errors.
pub(crate) const BACKEND: &str = "rabbitmq";

/// A failure described by this backend (the source of an [`Error::Backend`]).
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

/// An [`Error::Backend`] of this backend with our own message.
pub(crate) fn failure(temporary: bool, message: impl Into<String>) -> Error {
    Error::backend(BACKEND, temporary, Failure(message.into()))
}

/// Wraps a lapin error, deciding whether a retry can help: lost connections, closed channels
/// and a broker shutting down are temporary; refused access, missing or mismatching
/// queues and exchanges are not.
pub(crate) fn from_lapin(error: lapin::Error) -> Error {
    let temporary = match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::ChannelsLimitReached
        | ErrorKind::MissingHeartbeatError => true,
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => !matches!(
                soft,
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
                    | AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::CONTENTTOOLARGE
            ),
            AMQPErrorKind::Hard(hard) => matches!(
                hard,
                AMQPHardError::CONNECTIONFORCED
                    | AMQPHardError::RESOURCEERROR
                    | AMQPHardError::INTERNALERROR
                    | AMQPHardError::CHANNELERROR
            ),
        },
        _ => false,
    };
    Error::backend(BACKEND, temporary, error)
}

/// Whether a lapin error says the queue or exchange does not exist.
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// An AMQP short string (exchange, queue, routing key, header name: at most 255 bytes).
pub(crate) fn short(what: &str, value: &str) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|_| {
        Error::invalid(
            what,
            format!(
                "`{value}` is {} bytes long; AMQP allows at most 255",
                value.len()
            ),
        )
    })
}

/// How long closing a channel or connection may wait for the broker's answer: a broker
/// that went away never answers, and lapin does not always notice at once.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long acknowledging a message may wait: an ack on a connection that just died may
/// never be answered.
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes `channel` (which returns its unacknowledged messages to their queues), waiting
/// for the broker at most [`CLOSE_TIMEOUT`].
pub(crate) async fn close_channel(channel: &Channel, reason: &str) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await;
    }
}

/// Exponential backoff between reconnection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    /// The delay after `failures` failed attempts in a row (1 for the first failure).
    pub(crate) fn delay(&self, failures: u32) -> Duration {
        let factor = 2_u32.saturating_pow(failures.saturating_sub(1).min(16));
        self.min.saturating_mul(factor).min(self.max).max(self.min)
    }
}

/// Owns one AMQP connection and replaces it when it dropped.
pub(crate) struct Connector {
    url: String,
    name: String,
    backoff: Backoff,
    current: Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("url", &redact_url(&self.url))
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub(crate) fn new(url: &str, name: String, backoff: Backoff) -> Self {
        Self {
            url: url.to_owned(),
            name,
            backoff,
            current: Mutex::new(None),
        }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The open connection, reconnecting with backoff until `deadline` if it dropped.
    /// Fails with a temporary [`Error::Backend`] when the broker stays unreachable.
    pub(crate) async fn connection(&self, deadline: Instant) -> Result<Arc<Connection>> {
        let mut current = timeout_at(deadline, self.current.lock())
            .await
            .map_err(|_| self.unreachable("another task is still reconnecting"))?;
        if let Some(connection) = current.as_ref()
            && connection.status().connected()
        {
            return Ok(connection.clone());
        }
        *current = None;
        let mut failures = 0;
        loop {
            let properties =
                ConnectionProperties::default().with_connection_name(self.name.clone().into());
            let error = match timeout_at(deadline, Connection::connect(&self.url, properties)).await
            {
                Ok(Ok(connection)) => {
                    if failures > 0 {
                        tracing::info!(connection = %self.name, "reconnected to RabbitMQ");
                    }
                    let connection = Arc::new(connection);
                    *current = Some(connection.clone());
                    return Ok(connection);
                }
                Ok(Err(e)) => from_lapin(e),
                Err(_) => return Err(self.unreachable("connecting timed out")),
            };
            if !error.is_temporary() {
                return Err(error);
            }
            failures += 1;
            let delay = self.backoff.delay(failures);
            if Instant::now() + delay >= deadline {
                return Err(self.unreachable(&error.to_string()));
            }
            tracing::debug!(connection = %self.name, %error, ?delay, "RabbitMQ unreachable; retrying");
            sleep(delay).await;
        }
    }

    /// A new channel on the open connection (reconnecting until `deadline` if needed).
    pub(crate) async fn channel(&self, deadline: Instant) -> Result<Channel> {
        let mut failures = 0;
        loop {
            let connection = self.connection(deadline).await?;
            match connection.create_channel().await {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    let error = from_lapin(e);
                    failures += 1;
                    let delay = self.backoff.delay(failures);
                    if !error.is_temporary() || Instant::now() + delay >= deadline {
                        return Err(error);
                    }
                    sleep(delay).await;
                }
            }
        }
    }

    /// Closes the connection, if open; a later call reconnects.
    pub(crate) async fn close(&self) {
        let connection = self.current.lock().await.take();
        if let Some(connection) = connection
            && connection.status().connected()
        {
            let closing = connection.close(200, "closed by orchestrator".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
        }
    }

    fn unreachable(&self, why: &str) -> Error {
        failure(
            true,
            format!(
                "RabbitMQ at {} is unreachable ({why}); the operation was not carried out, \
                 retry it later",
                redact_url(&self.url)
            ),
        )
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    /// Return the message as an error when no queue takes it.
    pub(crate) mandatory: bool,
}

/// What a publisher declares on each new channel (exchanges and queues it publishes to).
pub(crate) type Setup =
    Box<dyn Fn(Channel) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

/// Publishes with publisher confirms on one confirm-mode channel, reconnecting as needed.
pub(crate) struct Publisher {
    connector: Connector,
    channel: Mutex<Option<Channel>>,
    timeout: Duration,
    setup: Setup,
    /// Messages published again after their confirms were lost (see [`Publisher::publish`]).
    republished: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("connector", &self.connector)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub(crate) fn new(connector: Connector, timeout: Duration, setup: Setup) -> Self {
        Self {
            connector,
            channel: Mutex::new(None),
            timeout,
            setup,
            republished: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many messages were published again after their confirms were lost: each may
    /// be a copy of one the broker had taken.
    pub(crate) fn republished(&self) -> u64 {
        self.republished.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The confirm-mode channel, opened (and set up) anew if it closed.
    pub(crate) async fn channel(&self, deadline: Instant) -> Result<Channel> {
        let mut slot = timeout_at(deadline, self.channel.lock())
            .await
            .map_err(|_| failure(true, "timed out waiting for the publishing channel"))?;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *slot = None;
        let channel = self.connector.channel(deadline).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(from_lapin)?;
        (self.setup)(channel.clone()).await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Opens the channel now, so that a broker that is not there shows at once.
    pub(crate) async fn ready(&self, within: Duration) -> Result<()> {
        self.channel(Instant::now() + within).await.map(drop)
    }

    /// Runs `declare` on the publishing channel (queue and binding declarations).
    pub(crate) async fn declare<F, Fut>(&self, declare: F) -> Result<()>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = lapin::Result<()>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut failures = 0;
        loop {
            let channel = self.channel(deadline).await?;
            match declare(channel).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let error = from_lapin(e);
                    failures += 1;
                    let delay = self.connector.backoff().delay(failures);
                    if !error.is_temporary() || Instant::now() + delay >= deadline {
                        return Err(error);
                    }
                    sleep(delay).await;
                }
            }
        }
    }

    /// Publishes `messages` in order, pipelined, and returns once the broker confirmed all.
    ///
    /// When the connection drops, the unconfirmed rest is published again on a new one
    /// (so a message may arrive twice, never zero times) until the publish timeout; then the
    /// error is a temporary [`Error::Backend`]. A broker nack or a returned mandatory message
    /// is an error at once.
    pub(crate) async fn publish(&self, messages: &[Outgoing]) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut done = 0;
        let mut failures = 0;
        while done < messages.len() {
            let channel = self.channel(deadline).await?;
            let attempt = timeout_at(deadline, publish_on(&channel, &messages[done..])).await;
            let (confirmed, error) = match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failed)) => failed,
                Err(_) => {
                    return Err(failure(
                        true,
                        format!(
                            "the broker did not confirm {} message(s) within {:?}; they may or \
                             may not have been published",
                            messages.len() - done,
                            self.timeout
                        ),
                    ));
                }
            };
            done += confirmed;
            if !error.is_temporary() {
                return Err(error);
            }
            failures += 1;
            let delay = self.connector.backoff().delay(failures);
            if Instant::now() + delay >= deadline {
                return Err(error);
            }
            tracing::debug!(%error, unconfirmed = messages.len() - done, "publishing again after a failure");
            self.republished.fetch_add(
                (messages.len() - done) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.discard(&channel).await;
            sleep(delay).await;
        }
        Ok(())
    }

    async fn discard(&self, failed: &Channel) {
        let mut slot = self.channel.lock().await;
        if slot.as_ref().is_some_and(|c| c.id() == failed.id()) {
            *slot = None;
        }
    }

    /// Closes the connection.
    pub(crate) async fn close(&self) {
        *self.channel.lock().await = None;
        self.connector.close().await;
    }
}

/// Publishes on one channel; on failure returns how many leading messages were confirmed.
async fn publish_on(
    channel: &Channel,
    messages: &[Outgoing],
) -> std::result::Result<(), (usize, Error)> {
    let mut confirms = Vec::with_capacity(messages.len());
    let mut send_error = None;
    for m in messages {
        let options = BasicPublishOptions {
            mandatory: m.mandatory,
            immediate: false,
        };
        let published = channel
            .basic_publish(
                m.exchange.clone(),
                m.routing_key.clone(),
                options,
                &m.body,
                m.properties.clone(),
            )
            .await;
        match published {
            Ok(confirm) => confirms.push(confirm),
            Err(e) => {
                send_error = Some(from_lapin(e));
                break;
            }
        }
    }
    let sent = confirms.len();
    for (i, confirm) in confirms.into_iter().enumerate() {
        let error = match confirm.await {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => continue,
            Ok(Confirmation::Ack(Some(returned))) => failure(
                false,
                format!(
                    "the broker returned a message published to exchange `{}` with routing key \
                     `{}`: {} {} (no queue takes it)",
                    messages[i].exchange,
                    messages[i].routing_key,
                    returned.reply_code,
                    returned.reply_text
                ),
            ),
            Ok(Confirmation::Nack(_)) => failure(
                true,
                format!(
                    "the broker refused (nacked) a message published to exchange `{}` with \
                     routing key `{}`",
                    messages[i].exchange, messages[i].routing_key
                ),
            ),
            Err(e) => from_lapin(e),
        };
        return Err((i, error));
    }
    match send_error {
        // Every message sent before the failed send was confirmed above.
        Some(error) => Err((sent, error)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn long_names_are_invalid_input() {
        assert!(short("queue", "q").is_ok());
        let long = "x".repeat(256);
        assert!(matches!(
            short("queue", &long),
            Err(Error::InvalidInput { .. })
        ));
    }
}
