//! The one error type of the core, and the error handlers return.

use std::time::Duration;

use crate::envelope::EventId;
use crate::store::ExpectedVersion;

/// A boxed error from a library below us (a broker client, the file system, …).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the core [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in orchestrator's core operations.
///
/// Each variant says what to fix; [`Error::is_temporary`] says whether retrying the same
/// operation can help (a broker that is restarting) or not (a malformed event).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument the caller passed is not acceptable (an empty event type, a bad pattern, …).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was invalid, in the user's words ("event type", "topic pattern", …).
        what: String,
        /// Why, and what to do instead.
        reason: String,
    },

    /// Bytes could not be decoded into an event; `field` names the offending field.
    #[error("cannot decode event: field `{field}`: {reason}")]
    Decode {
        /// The field (CloudEvents attribute, record part) at fault; `"$"` for the whole input.
        field: String,
        /// What was wrong with it.
        reason: String,
    },

    /// An event could not be encoded (for example its payload is not valid JSON while its
    /// content type says JSON).
    #[error("cannot encode event: {reason}")]
    Encode {
        /// What was wrong.
        reason: String,
    },

    /// An event is larger than the [maximum event size](crate::MaxEventSize) of the store or
    /// transport it was given to; nothing was written.
    #[error(
        "event is {size} bytes once encoded, over the maximum event size of {limit} bytes; make \
         the payload smaller, or keep large data outside the event and put a reference to it in \
         the event, or raise the limit (`max_event_size`) within what your broker accepts"
    )]
    TooLarge {
        /// The event's size in bytes, encoded as the store or transport writes it.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// An append's expected version did not match the stream; nothing was written.
    #[error(
        "wrong expected version on stream `{stream}`: expected {expected}, but the stream {}",
        describe_actual(*actual)
    )]
    WrongExpectedVersion {
        /// The stream appended to.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version at the time of the append (`None`: the stream does not exist).
        actual: Option<u64>,
    },

    /// An append carried an event whose id the stream already holds, and the append is not a
    /// retry of the one that stored it (same ids, same order, same place: see
    /// [idempotent appends](crate::store#idempotent-appends)); nothing was written.
    #[error(
        "event {event_id} is already stored in stream `{stream}` at version {version}, and this \
         append is not a retry of the append that stored it (a retry sends the same events in \
         the same order, with an expectation the stream met before them); give new events \
         new ids"
    )]
    DuplicateEvent {
        /// The stream appended to.
        stream: String,
        /// The first id of the batch that the stream already holds.
        event_id: EventId,
        /// The version at which the stream holds it.
        version: u64,
    },

    /// Something the caller referred to does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for ("saga `order`", "dead letter 0191…").
        what: String,
    },

    /// The implementation cannot do this; see its capabilities.
    #[error("`{operation}` is not supported by {backend}: {hint}")]
    Unsupported {
        /// The backend or implementation ("redis", "in-memory", …).
        backend: &'static str,
        /// The operation or capability asked for.
        operation: &'static str,
        /// What to do instead.
        hint: &'static str,
    },

    /// A broker, file or other backend failed.
    #[error("{backend} failed: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// Whether retrying the operation can help.
        temporary: bool,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },

    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        operation: String,
        /// How long it was given.
        after: Duration,
    },

    /// The component was closed or shut down.
    #[error("{what} is closed")]
    Closed {
        /// What is closed ("transport", "subscription", …).
        what: String,
    },

    /// A handler returned an error.
    #[error("handler failed: {0}")]
    Handler(HandlerError),

    /// A bounded store holds as much as it may: the append was refused, nothing was written.
    #[error("{store} is full ({limit}): {hint}")]
    StoreFull {
        /// The store.
        store: &'static str,
        /// The limit reached, with its value ("1000000 events").
        limit: String,
        /// Why nothing could make room, and what to do.
        hint: String,
        /// Whether room can appear by itself (events waiting to be released for eviction).
        temporary: bool,
    },

    /// Events asked for are no longer kept: a bounded store evicted them to make room.
    #[error("{what} was evicted; the oldest kept is {first_kept}: {hint}")]
    Evicted {
        /// What was asked for ("stream `order-1` from version 1").
        what: String,
        /// The oldest version (of a stream) or position (of the log) still kept.
        first_kept: u64,
        /// What to do instead.
        hint: String,
    },
}

fn describe_actual(actual: Option<u64>) -> String {
    match actual {
        None => "does not exist".to_owned(),
        Some(v) => format!("is at version {v}"),
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Decode`].
    pub fn decode(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Decode {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Encode`].
    pub fn encode(reason: impl Into<String>) -> Self {
        Self::Encode {
            reason: reason.into(),
        }
    }

    /// Wraps a backend failure, recording whether a retry can help.
    pub fn backend(backend: &'static str, temporary: bool, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            backend,
            temporary,
            source: source.into(),
        }
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_temporary(&self) -> bool {
        match self {
            Self::Backend { temporary, .. } => *temporary,
            Self::Timeout { .. } => true,
            Self::Handler(e) => e.is_retryable(),
            Self::StoreFull { temporary, .. } => *temporary,
            _ => false,
        }
    }

    /// The decode error's field, if this is a decode error.
    pub fn decode_field(&self) -> Option<&str> {
        match self {
            Self::Decode { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The error an event, command or saga-step handler returns.
///
/// It carries whether a retry can help: [`HandlerError::retryable`] for passing trouble
/// (a timeout calling another service), [`HandlerError::permanent`] for failures a retry
/// cannot fix (malformed data); permanent failures go to the dead-letter queue at once.
/// Any `std::error::Error` converts into a retryable `HandlerError` with `?`.
#[derive(Debug)]
pub struct HandlerError {
    message: String,
    retryable: bool,
    source: Option<BoxError>,
}

impl HandlerError {
    /// A failure that a retry may fix.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            source: None,
        }
    }

    /// A failure that no retry can fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

    /// Wraps an error, keeping it as the source.
    pub fn from_error(error: impl Into<BoxError>, retryable: bool) -> Self {
        let source = error.into();
        Self {
            message: source.to_string(),
            retryable,
            source: Some(source),
        }
    }

    /// Whether a retry may help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The failure's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The wrapped error, if any.
    pub fn source_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

// `HandlerError` deliberately does not implement `std::error::Error`, so that every error type
// converts into it with `?` (the same trick as `anyhow::Error`).
/// Any error converts with `?` as a retryable failure, except this crate's own
/// [`Error::Decode`] (a payload that does not decode, as `event.data()?` reports it: no
/// retry makes it decode, so it is dead-lettered at once with the decode error, as a typed
/// subscription does) and [`Error::Handler`] (which keeps its own classification).
impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        let source: BoxError = Box::new(error);
        let retryable = match source.downcast_ref::<Error>() {
            Some(Error::Decode { .. }) => false,
            Some(Error::Handler(inner)) => inner.is_retryable(),
            _ => true,
        };
        Self::from_error(source, retryable)
    }
}

impl From<HandlerError> for Error {
    fn from(error: HandlerError) -> Self {
        Self::Handler(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler_error(result: Result<()>) -> HandlerError {
        let failed = || -> std::result::Result<(), HandlerError> {
            result?;
            Ok(())
        };
        failed().unwrap_err()
    }

    #[test]
    fn a_payload_that_does_not_decode_is_a_permanent_failure() {
        let error = handler_error(Err(Error::decode("data", "expected u64, found a string")));
        assert!(!error.is_retryable());
        assert!(
            error.message().contains("expected u64"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn other_errors_are_retryable_and_handler_errors_keep_their_kind() {
        let timeout = handler_error(Err(Error::backend("redis", true, "connection reset")));
        assert!(timeout.is_retryable());
        let io = || -> std::result::Result<(), HandlerError> {
            Err(std::io::Error::other("disk"))?;
            Ok(())
        };
        assert!(io().unwrap_err().is_retryable());
        let permanent = handler_error(Err(Error::Handler(HandlerError::permanent("bad order"))));
        assert!(!permanent.is_retryable());
    }
}
