//! The one error type of the saga crate.

use std::sync::Arc;

use crate::id::SagaId;

/// `Result` with the saga [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong defining, starting, running or recovering sagas.
///
/// A step that fails is *not* an error here: it is part of a saga's outcome (see
/// [`SagaOutcome::failure`](crate::SagaOutcome::failure)). These errors are about the
/// orchestration itself — bad definitions, bad input, the store failing, a second runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A saga definition without a single step.
    #[error("saga `{saga}` has no steps; give it at least one step")]
    EmptySaga {
        /// The saga's name.
        saga: String,
    },

    /// Two steps (or branches, or waits) of one saga share a name. Names identify steps in
    /// the saga log, so they must be unique within the saga, nested flows included.
    #[error(
        "saga `{saga}` has two steps named `{step}`; step, branch and wait names must be unique within a saga"
    )]
    DuplicateStep {
        /// The saga's name.
        saga: String,
        /// The name used twice.
        step: String,
    },

    /// Some other part of a definition is not acceptable (an empty name, an empty parallel
    /// group, a branch with no arm).
    #[error("invalid definition of saga `{saga}`: {reason}")]
    InvalidDefinition {
        /// The saga's name.
        saga: String,
        /// What is wrong and what to do instead.
        reason: String,
    },

    /// A saga of this name is already defined on this orchestrator.
    #[error("saga `{saga}` is already defined")]
    AlreadyDefined {
        /// The saga's name.
        saga: String,
    },

    /// Starting (or recovering) a saga that was never defined.
    #[error("saga `{saga}` is not defined; define it before starting or recovering it")]
    UndefinedSaga {
        /// The name asked for.
        saga: String,
    },

    /// The input given to a saga is not acceptable.
    #[error("invalid input for saga `{saga}`: {reason}")]
    InvalidInput {
        /// The saga's name.
        saga: String,
        /// What is wrong and what to do instead.
        reason: String,
    },

    /// No saga with this id, neither in memory nor in the store.
    #[error("saga {id} not found")]
    NotFound {
        /// The id asked for.
        id: SagaId,
    },

    /// Another runner appended to this saga's log first (two processes recovered the same
    /// saga, for example). This runner stopped; the other one owns the saga now.
    #[error("saga {id} was advanced by another runner; this one stopped")]
    Conflict {
        /// The saga's id.
        id: SagaId,
    },

    /// A saga's log does not describe a run of its definition (a record that cannot be
    /// decoded, a step the definition no longer has).
    #[error("the log of saga {id} cannot be resumed: {reason}")]
    CorruptLog {
        /// The saga's id.
        id: SagaId,
        /// What did not fit.
        reason: String,
    },

    /// The saga's runner stopped before the saga finished: the store failed, another runner
    /// took over, or the orchestrator was shut down. The saga's log holds every transition
    /// made so far, so [`recover`](crate::SagaOrchestrator::recover) can carry it on.
    #[error("saga {id} stopped before finishing: {source}")]
    Interrupted {
        /// The saga's id.
        id: SagaId,
        /// Why it stopped.
        #[source]
        source: Arc<Error>,
    },

    /// The runner of a saga panicked (a bug: step panics are caught and fail the step).
    #[error("the runner of saga {id} panicked")]
    RunnerPanicked {
        /// The saga's id.
        id: SagaId,
    },

    /// The orchestrator was shut down.
    #[error("the saga orchestrator is shut down")]
    Shutdown,

    /// Another live process runs this saga: it holds the saga's lease. A saga is run by the
    /// process holding its lease only; once that process dies (and the lease expires),
    /// [`recover`](crate::SagaOrchestrator::recover) anywhere takes it over. Also the end of
    /// a runner that lost its lease (it could not renew it in time): it stops where it stands,
    /// and whoever takes the lease over carries the saga on from its log.
    #[error("saga {id} is run by another process (it holds {lease})")]
    RunningElsewhere {
        /// The saga.
        id: crate::SagaId,
        /// Where its lease is kept.
        lease: String,
    },

    /// The event store, the transport or the codec failed.
    #[error(transparent)]
    Core(#[from] orchestrator_core::Error),
}

impl Error {
    /// Whether retrying the same operation may succeed (a store that is restarting).
    pub fn is_temporary(&self) -> bool {
        match self {
            Self::Core(e) => e.is_temporary(),
            Self::Interrupted { source, .. } => source.is_temporary(),
            _ => false,
        }
    }
}
