//! [`FileInbox`]: a durable [`Inbox`] in a directory — one append-only log of handled event
//! ids per consumer group, compacted to the retention window as it grows.
//!
//! # Files
//!
//! Group `g` is kept in `<dir>/<hex of g>.inbox` (names longer than 100 bytes are shortened
//! with a checksum and their length; the group name in the file's first line is checked on
//! load, so two groups never share a file unnoticed). The file is text:
//!
//! ```text
//! orchestrator-inbox 1 "billing"
//! 1767225600000 "0191c8a4-…" 5d41402a
//! ```
//!
//! a header naming the group, then one line per recorded id: the record time (ms since the
//! epoch), the id as a JSON string, and a CRC-32 (hex) of the two.
//!
//! # Crashes
//!
//! Each record is one `write` of a whole line. A crash mid-write (`kill -9`, a power loss)
//! can leave a torn last line: it has no newline, is ignored and cut off when the group is
//! next loaded. A line failing its checksum elsewhere (a disk that returned garbage) is
//! skipped with a warning: the inbox loses that id — one more handling if the event comes
//! again — rather than refuse to start. Compaction writes the ids still in the window to
//! `<file>.tmp`, syncs it and renames it over the log, so a crash leaves the old log or the
//! new one; a stale `.tmp` is removed on load.
//!
//! # Sync policy
//!
//! [`InboxSync::EveryRecord`] (the default) syncs each record (`fdatasync`) before
//! [`record`](Inbox::record) returns: a recorded id survives a power loss. Records of one
//! group are written one at a time, so each costs a sync. [`InboxSync::Never`] leaves them
//! in the operating system's cache: they survive a crash of the process, not of the machine
//! — after a power loss, events handled shortly before are handled once more.
//!
//! # Memory and sharing
//!
//! A group's ids within the window are indexed in memory once the group is first used;
//! `seen` reads only memory. One directory must be used by one [`FileInbox`] at a time (as
//! the file store's directory by one store): two would append to the same logs and not see
//! each other's records. [`FileEventStore::inbox`](orchestrator_core::EventStore::inbox)
//! hands out one inbox in `<store dir>/inbox` per store.
//!
//! ```
//! use orchestrator_core::{EventId, Inbox, InboxRetention};
//! use orchestrator_store::inbox::FileInbox;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let id = EventId::new();
//! let inbox = FileInbox::open(dir.path())?.with_retention(InboxRetention::last(10_000));
//! inbox.record("billing", &id).await?;
//! drop(inbox);
//!
//! let reopened = FileInbox::open(dir.path())?;
//! assert!(reopened.seen("billing", &id).await?, "survives a restart");
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::inbox::{RecentIds, validate_group};
use orchestrator_core::{
    Clock, Error as CoreError, EventId, Inbox, InboxRetention, Result, SystemClock,
};

use crate::error::Error;
use crate::file::sync_dir;

/// The first word of every inbox file, with the format version after it.
const HEADER: &str = "orchestrator-inbox 1 ";
/// Group names longer than this many bytes get a shortened file name.
const MAX_NAME_BYTES: usize = 100;
/// A log is compacted once it holds this many lines and twice as many as the window.
const MIN_COMPACT_LINES: usize = 1024;

/// When a [`FileInbox`] syncs its records to disk; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboxSync {
    /// Sync each record before [`record`](Inbox::record) returns: recorded ids survive a
    /// power loss.
    #[default]
    EveryRecord,
    /// Never sync records (compaction still syncs): recorded ids survive a crash of the
    /// process, not of the machine.
    Never,
}

/// A durable [`Inbox`] in a directory; see the [module docs](self).
pub struct FileInbox {
    dir: PathBuf,
    retention: InboxRetention,
    sync: InboxSync,
    clock: Arc<dyn Clock>,
    groups: Mutex<HashMap<String, Arc<Mutex<GroupLog>>>>,
    /// One group is loaded at a time, so that two first uses of a group do not both cut its
    /// torn tail or compact it.
    loading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for FileInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileInbox")
            .field("dir", &self.dir)
            .field("retention", &self.retention)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

impl FileInbox {
    /// Opens (creating if missing) the inbox directory `dir`, keeping ids to the default
    /// [`InboxRetention`] and syncing every record. Groups are loaded when first used.
    pub fn open(dir: impl AsRef<Path>) -> crate::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        Ok(Self::at(dir))
    }

    /// An inbox in `dir`, which is created when a group is first used.
    pub(crate) fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            retention: InboxRetention::default(),
            sync: InboxSync::default(),
            clock: Arc::new(SystemClock),
            groups: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// Keeps ids to `retention` (set it before the first use).
    pub fn with_retention(mut self, retention: InboxRetention) -> Self {
        self.retention = retention;
        self
    }

    /// Syncs records per `sync`.
    pub fn with_sync(mut self, sync: InboxSync) -> Self {
        self.sync = sync;
        self
    }

    /// Takes record times (and so ages) from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log file of `group`.
    pub fn path_of(&self, group: &str) -> PathBuf {
        let bytes = group.as_bytes();
        let mut name = String::with_capacity(bytes.len().min(MAX_NAME_BYTES) * 2 + 24);
        for b in bytes.iter().take(MAX_NAME_BYTES) {
            let _ = write!(name, "{b:02x}");
        }
        if bytes.len() > MAX_NAME_BYTES {
            let _ = write!(name, "-{:08x}-{}", crc32fast::hash(bytes), bytes.len());
        }
        self.dir.join(format!("{name}.inbox"))
    }

    fn groups(&self) -> MutexGuard<'_, HashMap<String, Arc<Mutex<GroupLog>>>> {
        // Only lookups and inserts of loaded groups; a poisoned lock guards a valid map.
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The loaded log of `group`, loading it on first use.
    async fn group(&self, group: &str) -> Result<Arc<Mutex<GroupLog>>> {
        validate_group(group)?;
        if let Some(log) = self.groups().get(group) {
            return Ok(Arc::clone(log));
        }
        let _loading = self.loading.lock().await;
        if let Some(log) = self.groups().get(group) {
            return Ok(Arc::clone(log));
        }
        let (dir, path, name) = (self.dir.clone(), self.path_of(group), group.to_owned());
        let (retention, sync, now) = (self.retention, self.sync, self.clock.now());
        let log = blocking(move || GroupLog::load(&dir, path, &name, retention, sync, now)).await?;
        let log = Arc::new(Mutex::new(log));
        self.groups().insert(group.to_owned(), Arc::clone(&log));
        Ok(log)
    }
}

/// Runs file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(CoreError::from),
        Err(error) => Err(CoreError::backend("file inbox", false, error)),
    }
}

fn lock(log: &Mutex<GroupLog>) -> MutexGuard<'_, GroupLog> {
    // A panic while writing leaves at worst a torn line on disk, which loading tolerates;
    // the index is only changed after a write succeeded.
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl Inbox for FileInbox {
    fn describe(&self) -> String {
        let sync = match self.sync {
            InboxSync::EveryRecord => "synced every record",
            InboxSync::Never => "not synced: survives a process crash, not a power loss",
        };
        format!("file inbox in `{}` ({sync})", self.dir.display())
    }

    fn durable(&self) -> bool {
        true
    }

    fn retention(&self) -> InboxRetention {
        self.retention
    }

    async fn seen(&self, group: &str, id: &EventId) -> Result<bool> {
        let log = self.group(group).await?;
        let now = self.clock.now();
        let seen = lock(&log).ids.contains(id, now);
        Ok(seen)
    }

    async fn record(&self, group: &str, id: &EventId) -> Result<()> {
        let log = self.group(group).await?;
        let now = self.clock.now();
        let id = id.clone();
        blocking(move || lock(&log).record(id, now)).await
    }
}

/// One group's log file and the index of its ids within the window.
struct GroupLog {
    group: String,
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// The file's length: a failed write is cut back to it.
    len: u64,
    /// Id lines in the file (kept or not).
    lines: usize,
    ids: RecentIds,
    sync: InboxSync,
}

impl GroupLog {
    fn load(
        dir: &Path,
        path: PathBuf,
        group: &str,
        retention: InboxRetention,
        sync: InboxSync,
        now: DateTime<Utc>,
    ) -> crate::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        let tmp = tmp_path(&path);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &tmp, e)),
        }
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        // Only whole lines count: what follows the last newline is a torn write.
        let whole = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let mut ids = RecentIds::new(retention);
        let mut lines = 0;
        let mut skipped = 0;
        let mut rest = &data[..whole];
        let has_header = !rest.is_empty();
        if has_header {
            let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let header = std::str::from_utf8(&rest[..end]).ok();
            let named = header
                .and_then(|h| h.strip_prefix(HEADER))
                .and_then(|name| serde_json::from_str::<String>(name).ok());
            match named {
                Some(name) if name == group => {}
                Some(name) => {
                    return Err(Error::corrupt(
                        &path,
                        0,
                        format!(
                            "the file belongs to the inbox group {name:?}, not {group:?} (their \
                             names shorten to the same file name: rename one of the groups)"
                        ),
                    ));
                }
                None => return Err(Error::corrupt(&path, 0, "not an inbox file")),
            }
            rest = &rest[(end + 1).min(rest.len())..];
        }
        for line in rest.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match parse_line(line) {
                Some((id, at)) => {
                    lines += 1;
                    ids.insert(id, at);
                }
                None => skipped += 1,
            }
        }
        ids.trim(now);
        if skipped > 0 {
            tracing::warn!(
                file = %path.display(), skipped,
                "inbox lines failed their checks and were skipped: those events, if delivered \
                 again, are handled again"
            );
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let mut len = whole as u64;
        if whole < data.len() {
            tracing::info!(file = %path.display(), bytes = data.len() - whole, "cut off a torn last line");
            file.set_len(len)
                .and_then(|()| file.sync_data())
                .map_err(|e| Error::io("truncate", &path, e))?;
        }
        if !has_header {
            let header = header_line(group);
            file.write_all(header.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("write", &path, e))?;
            sync_dir(dir)?;
            len = header.len() as u64;
        }
        let mut log = Self {
            group: group.to_owned(),
            dir: dir.to_owned(),
            path,
            file,
            len,
            lines,
            ids,
            sync,
        };
        if log.needs_compaction() {
            log.compact()?;
        }
        Ok(log)
    }

    fn record(&mut self, id: EventId, now: DateTime<Utc>) -> crate::Result<()> {
        self.ids.trim(now);
        if self.ids.contains(&id, now) {
            return Ok(());
        }
        let mut line = String::with_capacity(id.as_str().len() + 40);
        push_line(&mut line, &id, now);
        let written = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| match self.sync {
                InboxSync::EveryRecord => self.file.sync_data(),
                InboxSync::Never => Ok(()),
            });
        if let Err(error) = written {
            // Cut a partly written line off, so the next record starts a line of its own.
            let _ = self.file.set_len(self.len);
            return Err(Error::io("write", &self.path, error));
        }
        self.len += line.len() as u64;
        self.lines += 1;
        self.ids.insert(id, now);
        if self.needs_compaction() {
            self.compact()?;
        }
        Ok(())
    }

    fn needs_compaction(&self) -> bool {
        self.lines >= MIN_COMPACT_LINES && self.lines >= self.ids.len().saturating_mul(2)
    }

    /// Rewrites the log with only the ids in the window.
    fn compact(&mut self) -> crate::Result<()> {
        let mut text = header_line(&self.group);
        for (id, at) in self.ids.iter() {
            push_line(&mut text, id, at);
        }
        let tmp = tmp_path(&self.path);
        let mut file = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io("rename", &tmp, e))?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io("open", &self.path, e))?;
        self.len = text.len() as u64;
        self.lines = self.ids.len();
        Ok(())
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("inbox.tmp")
}

fn header_line(group: &str) -> String {
    // A `String` always serializes to JSON.
    let name = serde_json::to_string(group).unwrap_or_default();
    format!("{HEADER}{name}\n")
}

/// Appends `<ms> <id as JSON> <crc32 hex>\n`.
fn push_line(out: &mut String, id: &EventId, at: DateTime<Utc>) {
    let start = out.len();
    // A `str` always serializes to JSON.
    let id = serde_json::to_string(id.as_str()).unwrap_or_default();
    let _ = write!(out, "{} {id}", at.timestamp_millis());
    let crc = crc32fast::hash(&out.as_bytes()[start..]);
    let _ = writeln!(out, " {crc:08x}");
}

/// Parses an id line; `None` if it fails any check.
fn parse_line(line: &[u8]) -> Option<(EventId, DateTime<Utc>)> {
    let line = std::str::from_utf8(line).ok()?;
    let (body, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
        return None;
    }
    let (ms, id) = body.split_once(' ')?;
    let at = DateTime::<Utc>::from_timestamp_millis(ms.parse().ok()?)?;
    let id = EventId::parse(serde_json::from_str::<String>(id).ok()?).ok()?;
    Some((id, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_fail_their_checks_when_changed() {
        let id = EventId::parse("odd id with \"quotes\"\nand a newline").unwrap();
        let at = DateTime::<Utc>::from_timestamp_millis(1_767_225_600_123).unwrap();
        let mut line = String::new();
        push_line(&mut line, &id, at);
        assert_eq!(line.matches('\n').count(), 1, "one line: {line:?}");
        let body = line.trim_end_matches('\n');
        assert_eq!(parse_line(body.as_bytes()), Some((id, at)));
        let changed = body.replacen("1767", "1768", 1);
        assert_eq!(parse_line(changed.as_bytes()), None);
        assert_eq!(parse_line(&body.as_bytes()[..body.len() - 3]), None);
    }
}
