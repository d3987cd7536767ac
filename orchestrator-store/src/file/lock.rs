//! The directory lock: one writer per store directory, across processes.
//!
//! A writer holds an exclusive operating-system lock (`flock` on Unix, `LockFileEx` on
//! Windows, through [`File::try_lock`]) on `DIR/LOCK` for as long as the store is open, and
//! writes its process id into the file so that a refused opener can say who holds it. The
//! lock belongs to the open file, not to the file's existence: it goes when the holder closes
//! the file or dies (even by `SIGKILL`), so a lock file left behind by a crashed process,
//! with a dead pid in it, blocks nobody. The file is never removed (removing it would race
//! with an opener that has just opened it).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// The lock file's name inside the store directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// An exclusive lock on a store directory, released when dropped.
#[derive(Debug)]
pub(crate) struct DirLock {
    /// Held open: closing it releases the lock.
    _file: File,
}

/// Takes the exclusive lock on `dir` (which must exist), or says who holds it.
pub(crate) fn acquire(dir: &Path) -> Result<DirLock> {
    let path = dir.join(LOCK_FILE);
    // Not truncated on open: until the lock is ours, the pid in it is the holder's.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("open lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(Error::Locked {
                dir: dir.to_owned(),
                pid: holder_pid(&path),
            });
        }
        Err(TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
    }
    let record = format!(
        "{}\nthe process above holds this embedded store open for writing since {}\n",
        std::process::id(),
        chrono::Utc::now().to_rfc3339()
    );
    // Only informational (the lock is what excludes), so it is not synced.
    file.set_len(0)
        .and_then(|()| file.write_all(record.as_bytes()))
        .map_err(|e| Error::io("write lock file", &path, e))?;
    Ok(DirLock { _file: file })
}

/// The pid recorded in a lock file: its first line. `None` if it cannot be read, or is
/// empty because the holder has locked it but not yet written its pid.
fn holder_pid(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().next()?.trim().parse().ok()
}
