//! The crate's error type: what can go wrong opening the embedded store or configuring the
//! schema registry, beyond the core [`orchestrator_core::Error`].
//!
//! Every variant converts into the core error (`?` works in functions returning
//! `orchestrator_core::Result`): schema violations become [`CoreError::Decode`] naming the JSON
//! pointer of the offending value, file trouble (a corrupt record, an I/O failure, a store
//! directory locked by another writer) becomes [`CoreError::Backend`] with this error as its
//! source, so callers holding a core error can still
//! [`downcast`](std::error::Error::source) to the typed variant.

use std::path::{Path, PathBuf};

use orchestrator_core::Error as CoreError;

/// `Result` with this crate's [`Error`] as its default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate's own operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A record of the embedded store failed its checks somewhere a crash cannot have left
    /// it (not a torn tail): the store refuses to open past it.
    ///
    /// Restore the file from a backup, or, if losing everything from `offset` on is
    /// acceptable, truncate the file at `offset` (and remove later segments) yourself.
    #[error("corrupt record in {} at byte offset {offset}: {reason}", file.display())]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// The byte offset of the bad record (or header) within the file.
        offset: u64,
        /// What was wrong.
        reason: String,
    },

    /// A file in a [`FileDeadLetterQueue`](crate::FileDeadLetterQueue)'s directory is named
    /// like a letter (`*.json`) but is not one: its name is not `<seq>-<id>.json`, its
    /// content is not a dead letter's JSON, or the id inside is not the one in its name. A
    /// crash cannot leave such a file (letters are renamed into place whole), so it was put
    /// there or damaged from outside.
    ///
    /// Look at the file; move it out of the directory (or delete it) to go on.
    #[error(
        "dead letter file {} is unreadable: {reason}; move it out of the directory (or delete \
         it) to go on",
        file.display()
    )]
    CorruptDeadLetter {
        /// The file.
        file: PathBuf,
        /// What was wrong.
        reason: String,
    },

    /// A dead-letter queue opened with
    /// [`FileDeadLetterQueue::open_read_only`](crate::FileDeadLetterQueue::open_read_only)
    /// was asked to park or remove a letter.
    #[error(
        "the dead-letter queue in {} was opened read-only; open it with \
         FileDeadLetterQueue::open to park or remove letters",
        dir.display()
    )]
    ReadOnly {
        /// The queue's directory.
        dir: PathBuf,
    },

    /// Another open store holds the directory: a process (or another handle in this
    /// process) has it open for writing. Only one writer may have a store directory open at
    /// a time; the lock goes when that store is dropped or its process exits, however it
    /// exits.
    ///
    /// Stop that process (or drop that store), read with
    /// [`FileEventStore::open_read_only`](crate::file::FileEventStore::open_read_only), which
    /// needs no lock, or write through the running application.
    #[error("{}", locked_message(dir, *pid))]
    Locked {
        /// The store directory.
        dir: PathBuf,
        /// The holder's process id, as it wrote it into the directory's `LOCK` file (`None`
        /// if it could not be read).
        pid: Option<u32>,
    },

    /// The file system failed.
    #[error("{operation} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "write", "sync", …).
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// An event's schema version is not registered for its type.
    #[error(
        "unknown schema version {version} of event type `{event_type}`; registered: {registered}"
    )]
    UnknownSchemaVersion {
        /// The event type.
        event_type: String,
        /// The version the event claims.
        version: u32,
        /// The registered versions, e.g. `"1..=3"`.
        registered: String,
    },

    /// A payload violates its JSON Schema.
    #[error("event `{event_type}` v{version} violates its schema at `{pointer}`: {reason}")]
    SchemaViolation {
        /// The event type.
        event_type: String,
        /// The schema version checked against.
        version: u32,
        /// The JSON pointer (RFC 6901) of the first offending value; for a missing required
        /// property, the pointer the property would have.
        pointer: String,
        /// What is wrong there.
        reason: String,
    },

    /// A schema version was registered without an upcaster from the previous version.
    #[error(
        "version {version} of event type `{event_type}` needs an upcaster from version {previous}: \
         events stored as v{previous} could not be read as v{version}"
    )]
    MissingUpcaster {
        /// The event type.
        event_type: String,
        /// The version being registered.
        version: u32,
        /// The latest version registered before it.
        previous: u32,
    },

    /// Versions must be registered in order, each one more than the last.
    #[error(
        "cannot register version {version} of event type `{event_type}`: the next version is {expected}"
    )]
    VersionOutOfOrder {
        /// The event type.
        event_type: String,
        /// The version being registered.
        version: u32,
        /// The version that may be registered next.
        expected: u32,
    },

    /// A JSON Schema could not be compiled.
    #[error("invalid JSON Schema for `{event_type}` v{version}: {reason}")]
    InvalidSchema {
        /// The event type.
        event_type: String,
        /// The version.
        version: u32,
        /// The compiler's complaint.
        reason: String,
    },

    /// A core operation failed.
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl Error {
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            operation,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Self::Corrupt {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// The typed error behind a core error, if it came from this crate (see the module docs).
    pub fn from_core(error: &CoreError) -> Option<&Self> {
        match error {
            CoreError::Backend { source, .. } => source.downcast_ref::<Self>(),
            _ => None,
        }
    }
}

fn locked_message(dir: &Path, pid: Option<u32>) -> String {
    let dir = dir.display();
    match pid {
        Some(pid) if pid == std::process::id() => format!(
            "the embedded store in {dir} is already open in this process (pid {pid}): share \
             that FileEventStore (clones share one store) instead of opening the directory \
             again, or drop it first"
        ),
        _ => {
            let holder = pid.map_or_else(
                || "another process (its pid is not recorded in the LOCK file)".to_owned(),
                |pid| format!("process {pid}"),
            );
            format!(
                "the embedded store in {dir} is locked by {holder}, which has it open for \
                 writing, and only one process may write to it at a time: stop that process, \
                 write through it instead (publish through the running application), or open \
                 the store read-only (FileEventStore::open_read_only; the CLI's read commands \
                 do)"
            )
        }
    }
}

/// The backend name file errors carry inside the core error.
pub(crate) const FILE_BACKEND: &str = "file";

impl From<Error> for CoreError {
    fn from(error: Error) -> Self {
        match error {
            Error::Core(e) => e,
            Error::SchemaViolation {
                ref pointer,
                ref reason,
                ..
            } => CoreError::decode(pointer.clone(), reason.clone()),
            Error::UnknownSchemaVersion { .. } => {
                CoreError::decode("schemaversion", error.to_string())
            }
            Error::MissingUpcaster { .. }
            | Error::VersionOutOfOrder { .. }
            | Error::InvalidSchema { .. } => {
                CoreError::invalid("schema registration", error.to_string())
            }
            Error::Io { ref source, .. } => {
                let temporary = matches!(
                    source.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                );
                CoreError::backend(FILE_BACKEND, temporary, error)
            }
            // Not temporary: the holder may run for days; retrying in a loop does not help.
            Error::Corrupt { .. }
            | Error::CorruptDeadLetter { .. }
            | Error::ReadOnly { .. }
            | Error::Locked { .. } => CoreError::backend(FILE_BACKEND, false, error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_errors_survive_the_core_error() {
        let corrupt = Error::corrupt("/d/segment-1.log", 42, "bad checksum");
        let core: CoreError = corrupt.into();
        assert!(!core.is_temporary());
        match Error::from_core(&core) {
            Some(Error::Corrupt { offset, file, .. }) => {
                assert_eq!((*offset, file.to_str()), (42, Some("/d/segment-1.log")));
            }
            other => panic!("{other:?}"),
        }
        let violation = Error::SchemaViolation {
            event_type: "a.b".into(),
            version: 1,
            pointer: "/items/0".into(),
            reason: "bad".into(),
        };
        assert_eq!(CoreError::from(violation).decode_field(), Some("/items/0"));
    }

    #[test]
    fn a_locked_store_names_its_holder_and_what_to_do() {
        let locked = |pid| Error::Locked {
            dir: PathBuf::from("/var/lib/app"),
            pid,
        };
        let other = locked(Some(std::process::id().wrapping_add(1))).to_string();
        assert!(other.contains("/var/lib/app"), "{other}");
        assert!(
            other.contains(&format!("process {}", std::process::id().wrapping_add(1))),
            "{other}"
        );
        assert!(other.contains("stop that process"), "{other}");
        assert!(other.contains("open_read_only"), "{other}");
        let unknown = locked(None).to_string();
        assert!(unknown.contains("its pid is not recorded"), "{unknown}");
        let this = locked(Some(std::process::id())).to_string();
        assert!(this.contains("already open in this process"), "{this}");
        let core = CoreError::from(locked(None));
        assert!(!core.is_temporary());
        assert!(core.to_string().contains("/var/lib/app"));
        assert!(matches!(
            Error::from_core(&core),
            Some(Error::Locked { pid: None, .. })
        ));
    }
}
