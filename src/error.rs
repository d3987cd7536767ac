//! The facade's error type: the errors of the crates it wires, with the ones a facade user
//! meets most often (an unknown command or query, an undefined saga, a backend that is not
//! compiled in) lifted to variants of their own.

use orchestrator_cqrs::HandlerKind;

/// `Result` with the facade's [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong through the [`EventOrchestrator`](crate::EventOrchestrator)
/// facade.
///
/// The variants that name what to fix come first; the rest wrap the error of the crate that
/// failed, so nothing is lost: match on [`Error::Core`] for bus, transport and store
/// failures, [`Error::Saga`] for saga definitions and runs, [`Error::Cqrs`] for command and
/// query failures. [`Error::is_temporary`] says whether retrying can help.
///
/// ```
/// use orchestrator::prelude::*;
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let orchestrator = EventOrchestrator::new();
/// let error = orchestrator.send_command("delete_user", json!({})).await.unwrap_err();
/// assert!(matches!(error, Error::UnknownCommand { ref name } if name == "delete_user"));
/// assert!(matches!(
///     orchestrator.start_saga("order_processing", json!({})).await,
///     Err(Error::UndefinedSaga { .. })
/// ));
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No command handler is registered under this name.
    #[error(
        "unknown command `{name}`: no handler is registered for it; register one with `register_command_handler` first"
    )]
    UnknownCommand {
        /// The command name asked for.
        name: String,
    },

    /// No query handler is registered under this name.
    #[error(
        "unknown query `{name}`: no handler is registered for it; register one with `register_query_handler` first"
    )]
    UnknownQuery {
        /// The query name asked for.
        name: String,
    },

    /// Starting a saga that was never defined.
    #[error("saga `{saga}` is not defined; define it with `define_saga` before starting it")]
    UndefinedSaga {
        /// The saga name asked for.
        saga: String,
    },

    /// A backend URL names a backend this build does not carry.
    #[error(
        "`{scheme}://` needs the `{feature}` feature of orchestrator: enable it in Cargo.toml \
         (orchestrator = {{ features = [\"{feature}\"] }}) or, for the CLI, build it with \
         `--features cli,{feature}`"
    )]
    FeatureDisabled {
        /// The URL scheme (`redis`, `amqp`, `kafka`, …).
        scheme: String,
        /// The cargo feature that brings it.
        feature: &'static str,
    },

    /// The bus, a transport, a store or the codec failed, or an argument was invalid.
    #[error(transparent)]
    Core(#[from] orchestrator_core::Error),

    /// Defining, starting or running a saga failed (a step failing is not an error: it is
    /// part of the saga's outcome).
    #[error(transparent)]
    Saga(orchestrator_saga::Error),

    /// A command or query failed: validation, its handler, a conflict, ….
    #[error(transparent)]
    Cqrs(orchestrator_cqrs::Error),
}

impl Error {
    /// Whether retrying the same operation may succeed (a broker that is restarting, a
    /// handler that failed with a retryable error).
    pub fn is_temporary(&self) -> bool {
        match self {
            Self::Core(e) => e.is_temporary(),
            Self::Saga(e) => e.is_temporary(),
            Self::Cqrs(e) => e.is_temporary(),
            _ => false,
        }
    }
}

impl From<orchestrator_saga::Error> for Error {
    fn from(error: orchestrator_saga::Error) -> Self {
        match error {
            orchestrator_saga::Error::UndefinedSaga { saga } => Self::UndefinedSaga { saga },
            orchestrator_saga::Error::Core(e) => Self::Core(e),
            other => Self::Saga(other),
        }
    }
}

impl From<orchestrator_cqrs::Error> for Error {
    fn from(error: orchestrator_cqrs::Error) -> Self {
        match error {
            orchestrator_cqrs::Error::NoHandler {
                kind: HandlerKind::Command,
                name,
            } => Self::UnknownCommand { name },
            orchestrator_cqrs::Error::NoHandler {
                kind: HandlerKind::Query,
                name,
            } => Self::UnknownQuery { name },
            orchestrator_cqrs::Error::Core(e) => Self::Core(e),
            other => Self::Cqrs(other),
        }
    }
}

impl From<orchestrator_store::Error> for Error {
    fn from(error: orchestrator_store::Error) -> Self {
        Self::Core(error.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifted_variants_keep_their_names() {
        let e: Error = orchestrator_cqrs::Error::NoHandler {
            kind: HandlerKind::Query,
            name: "get_user".into(),
        }
        .into();
        assert!(matches!(e, Error::UnknownQuery { ref name } if name == "get_user"));
        assert!(e.to_string().contains("register_query_handler"));
        let e: Error = orchestrator_saga::Error::UndefinedSaga { saga: "s".into() }.into();
        assert!(matches!(e, Error::UndefinedSaga { .. }));
        let e: Error = orchestrator_saga::Error::Core(orchestrator_core::Error::Timeout {
            operation: "append".into(),
            after: std::time::Duration::from_secs(1),
        })
        .into();
        assert!(matches!(e, Error::Core(_)) && e.is_temporary());
        let e = Error::FeatureDisabled {
            scheme: "kafka".into(),
            feature: "kafka",
        };
        assert!(e.to_string().contains("features = [\"kafka\"]"));
    }
}
