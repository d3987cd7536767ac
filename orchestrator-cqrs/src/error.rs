//! The one error type of the CQRS crate.

use std::time::Duration;

use orchestrator_core::{BoxError, HandlerError};

use crate::validation::FieldError;

/// `Result` with the CQRS [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether a name belongs to a command or to a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandlerKind {
    /// A command (something that changes state).
    Command,
    /// A query (something that reads state).
    Query,
}

impl std::fmt::Display for HandlerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Command => "command",
            Self::Query => "query",
        })
    }
}

/// Everything that can go wrong sending a command or executing a query.
///
/// [`Error::is_temporary`] says whether sending the same command (or query) again may
/// succeed. Handlers may return these errors too (through [`HandlerError`], e.g. with `?`):
/// the buses recognise a [`Validation`](Error::Validation), [`Unauthorized`](Error::Unauthorized),
/// [`Conflict`](Error::Conflict), [`NotCaughtUp`](Error::NotCaughtUp) or
/// [`NoHandler`](Error::NoHandler) error inside a handler's failure and report it as itself
/// (a [`Rejected`](Error::Rejected) one stays a handler failure carrying its message, since
/// its source cannot be copied out).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No handler is registered under this name.
    #[error("no {kind} handler is registered for `{name}`; register one before sending it")]
    NoHandler {
        /// Command or query.
        kind: HandlerKind,
        /// The name asked for.
        name: String,
    },

    /// A handler is already registered under this name.
    #[error("a {kind} handler is already registered for `{name}`")]
    AlreadyRegistered {
        /// Command or query.
        kind: HandlerKind,
        /// The name registered twice.
        name: String,
    },

    /// An argument is not acceptable (an empty name, a JSON Schema that does not compile, …).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was invalid.
        what: String,
        /// Why, and what to do instead.
        reason: String,
    },

    /// The input failed validation; every field error is listed. The handler did not run.
    #[error("{kind} `{name}` failed validation: {}", describe_fields(errors))]
    Validation {
        /// Command or query.
        kind: HandlerKind,
        /// Its name.
        name: String,
        /// Every problem found, each with the JSON pointer of its field.
        errors: Vec<FieldError>,
    },

    /// The authorization hook refused the command. The handler did not run.
    #[error("command `{command}` is not authorized: {reason}")]
    Unauthorized {
        /// The command name.
        command: String,
        /// The hook's reason.
        reason: String,
    },

    /// A command id was used again with a different payload: an idempotency key names one
    /// command, so a different command needs a new id.
    #[error("command id `{id}` was already used for a different `{command}` payload")]
    IdempotencyKeyReused {
        /// The command name.
        command: String,
        /// The command id.
        id: String,
    },

    /// Other writers kept changing the aggregate's stream: every attempt to append met a newer
    /// version, and the retry policy ran out. Nothing of this command was written.
    #[error("stream `{stream}` kept changing under the command: gave up after {attempts} attempts")]
    Conflict {
        /// The aggregate's stream.
        stream: String,
        /// Attempts made.
        attempts: u32,
    },

    /// The aggregate refused the command (its `handle` returned an error). Nothing was written.
    #[error("{aggregate} refused the command: {source}")]
    Rejected {
        /// The aggregate type.
        aggregate: &'static str,
        /// The aggregate's own error (downcast it to the aggregate's error type).
        #[source]
        source: BoxError,
    },

    /// A read model did not reach the position a query asked to see in time.
    #[error(
        "read model `{read_model}` is at position {reached}, not yet at {wanted}, after {waited:?}{}",
        state.as_deref().map(|s| format!(" ({s})")).unwrap_or_default()
    )]
    NotCaughtUp {
        /// The read model waited for.
        read_model: String,
        /// The position it had reached.
        reached: u64,
        /// The position asked for.
        wanted: u64,
        /// How long the query waited.
        waited: Duration,
        /// Why it may be stuck (its projection parked or failed), if known.
        state: Option<String>,
    },

    /// A command or query handler failed.
    #[error("{kind} `{name}` failed: {error}")]
    Handler {
        /// Command or query.
        kind: HandlerKind,
        /// Its name.
        name: String,
        /// The handler's error, with whether a retry may help.
        error: HandlerError,
    },

    /// The event store, the snapshot store or the codec failed.
    #[error(transparent)]
    Core(#[from] orchestrator_core::Error),
}

fn describe_fields(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Whether sending the same command (or query) again may succeed.
    pub fn is_temporary(&self) -> bool {
        match self {
            Self::Conflict { .. } | Self::NotCaughtUp { .. } => true,
            Self::Handler { error, .. } => error.is_retryable(),
            Self::Core(e) => e.is_temporary(),
            _ => false,
        }
    }

    /// The field errors, if this is a validation failure.
    pub fn field_errors(&self) -> Option<&[FieldError]> {
        match self {
            Self::Validation { errors, .. } => Some(errors),
            _ => None,
        }
    }

    /// The aggregate's own error, if it refused the command with an error of type `E`.
    pub fn rejection<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Self::Rejected { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }

    /// A short name of the variant, used as the `outcome` label of metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::NoHandler { .. } => "no_handler",
            Self::AlreadyRegistered { .. } | Self::InvalidInput { .. } => "invalid_input",
            Self::Validation { .. } => "validation",
            Self::Unauthorized { .. } => "unauthorized",
            Self::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            Self::Conflict { .. } => "conflict",
            Self::Rejected { .. } => "rejected",
            Self::NotCaughtUp { .. } => "not_caught_up",
            Self::Handler { .. } => "handler_error",
            Self::Core(_) => "store_error",
        }
    }

    /// The error of a failed handler: one of ours travelling inside the [`HandlerError`] is
    /// rebuilt (they are plain data), anything else is a [`Error::Handler`].
    pub(crate) fn from_handler(kind: HandlerKind, name: &str, error: HandlerError) -> Self {
        if let Some(ours) = error
            .source_error()
            .and_then(|e| e.downcast_ref::<Self>())
            .and_then(Self::rebuild)
        {
            return ours;
        }
        Self::Handler {
            kind,
            name: name.to_owned(),
            error,
        }
    }

    /// A copy of the variants that carry only data; `None` for the others.
    fn rebuild(&self) -> Option<Self> {
        Some(match self {
            Self::Validation { kind, name, errors } => Self::Validation {
                kind: *kind,
                name: name.clone(),
                errors: errors.clone(),
            },
            Self::Unauthorized { command, reason } => Self::Unauthorized {
                command: command.clone(),
                reason: reason.clone(),
            },
            Self::IdempotencyKeyReused { command, id } => Self::IdempotencyKeyReused {
                command: command.clone(),
                id: id.clone(),
            },
            Self::Conflict { stream, attempts } => Self::Conflict {
                stream: stream.clone(),
                attempts: *attempts,
            },
            Self::NotCaughtUp {
                read_model,
                reached,
                wanted,
                waited,
                state,
            } => Self::NotCaughtUp {
                read_model: read_model.clone(),
                reached: *reached,
                wanted: *wanted,
                waited: *waited,
                state: state.clone(),
            },
            Self::NoHandler { kind, name } => Self::NoHandler {
                kind: *kind,
                name: name.clone(),
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_errors_survive_a_handler_error() {
        let conflict = Error::Conflict {
            stream: "account-1".into(),
            attempts: 3,
        };
        let wrapped = HandlerError::from(conflict);
        match Error::from_handler(HandlerKind::Command, "deposit", wrapped) {
            Error::Conflict { stream, attempts } => {
                assert_eq!((stream.as_str(), attempts), ("account-1", 3))
            }
            other => panic!("{other:?}"),
        }
        let other = HandlerError::permanent("boom");
        let err = Error::from_handler(HandlerKind::Query, "q", other);
        assert!(matches!(
            err,
            Error::Handler {
                kind: HandlerKind::Query,
                ..
            }
        ));
        assert!(!err.is_temporary());
        assert_eq!(err.label(), "handler_error");
    }

    #[test]
    fn validation_lists_every_field() {
        let err = Error::Validation {
            kind: HandlerKind::Command,
            name: "create_user".into(),
            errors: vec![
                FieldError::new("/name", "required"),
                FieldError::new("/age", "must be positive"),
            ],
        };
        assert_eq!(
            err.to_string(),
            "command `create_user` failed validation: /name: required; /age: must be positive"
        );
        assert_eq!(err.field_errors().map(<[_]>::len), Some(2));
    }
}
