//! The embedded durable dead-letter queue: one JSON file per letter in a directory.
//!
//! [`FileDeadLetterQueue`] implements [`DeadLetterQueue`] for applications on the embedded
//! [`FileEventStore`](super::FileEventStore) without a broker: the in-process transport parks
//! failed deliveries here, and they are still there after a restart, to be listed,
//! reprocessed or discarded. The facade puts it in `DIR/dead-letters` beside a `file://DIR`
//! store ([`FileDeadLetterQueue::dir_in_store`]).
//!
//! # Layout, and why it is crash-safe
//!
//! Each letter is one file, `<seq>-<id>.json`: `seq` is a 20-digit number giving the order
//! letters were parked in (oldest first), `id` the letter's id (characters other than ASCII
//! letters, digits, `-` and `_` are `%XX`-escaped), and the content is
//! [`DeadLetter::to_json`] — the same form the broker queues store.
//!
//! A letter is written to a hidden temporary file (`.<seq>-<id>.json.tmp`), synced, renamed
//! to its name, and the directory is synced. A rename is atomic, so after a crash (even
//! `kill -9` or a power loss) a letter is either whole under its name or not there: a torn
//! temporary file is ignored by every read and deleted by the next [`open`]. Removing a letter
//! is one `unlink` followed by a directory sync. This was chosen over an append-only log
//! with tombstones because it needs no compaction, no recovery scan of a log, and lets the
//! CLI list and discard letters (see [`open_read_only`] and [`attach`]) while the application
//! is running:
//! every operation reads the directory afresh, and readers never see a half-written file.
//!
//! Parking a letter whose id is already parked writes the new letter first and then deletes
//! the old file; a crash between the two leaves both, and the newer (higher `seq`) wins
//! everywhere; the next [`open`] deletes the older.
//!
//! # Bad files
//!
//! A `*.json` file in the directory that is not a letter (its name is not `<seq>-<id>.json`,
//! its content is not a letter's JSON, or the id inside differs from its name) cannot come
//! from a crash — only from a person or a failing disk. Reading it is an
//! [`Error::CorruptDeadLetter`] naming the file, not a skip with a warning: a dead letter is
//! data someone must look at, and skipping would make it vanish from `list` without anyone
//! noticing (the CLI has no log to print a warning to). The error says what to do: move the
//! file out of the directory to go on. So `list` fails while such a file is there; `get` and
//! `remove` fail only for the letter whose file is bad; `push` reads no other letter and
//! keeps working, so a bad file never stops the application from parking letters; `len`
//! counts bad files too. Other files (not ending in `.json`, or hidden) are left alone.
//!
//! [`open`]: FileDeadLetterQueue::open
//! [`open_read_only`]: FileDeadLetterQueue::open_read_only
//! [`attach`]: FileDeadLetterQueue::attach
//!
//! ```
//! use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, EventEnvelope};
//! use orchestrator_store::FileDeadLetterQueue;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let dlq = FileDeadLetterQueue::open(dir.path().join("dead-letters"))?;
//! let now = chrono::Utc::now();
//! let event = EventEnvelope::new("payment.requested", &serde_json::json!({ "order": "o-1" }))?;
//! let letter = DeadLetter::new(
//!     event, "payment.requested".into(), "billing".into(), "gateway down".into(), 3, now, now,
//! );
//! dlq.push(letter.clone()).await?;
//! drop(dlq);
//!
//! // After a restart the letter is still parked.
//! let reopened = FileDeadLetterQueue::open(dir.path().join("dead-letters"))?;
//! assert_eq!(reopened.list(&DeadLetterQuery::default()).await?, [letter.clone()]);
//! assert_eq!(reopened.remove(&letter.id).await?, Some(letter));
//! assert!(reopened.is_empty().await?);
//! # Ok(())
//! # }
//! ```

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, Error as CoreError};

use super::segment::sync_dir;
use crate::error::{Error, Result};

/// The directory, beside a store's segments, where the facade parks dead letters.
const IN_STORE: &str = "dead-letters";
const SUFFIX: &str = ".json";
const TEMP_SUFFIX: &str = ".tmp";
/// Digits of the sequence number in a file name (`u64::MAX` has 20).
const SEQ_DIGITS: usize = 20;
/// The longest escaped id a file name may carry (file names are at most 255 bytes on
/// common file systems; the rest is the sequence number, `-`, `.json` and the temporary
/// file's `.` and `.tmp`).
const MAX_ESCAPED_ID: usize = 255 - SEQ_DIGITS - 1 - SUFFIX.len() - 1 - TEMP_SUFFIX.len();

/// A durable [`DeadLetterQueue`] in a directory, one JSON file per letter; see the
/// [module docs](self).
///
/// Clones share the same queue. Every operation reads the directory afresh, so several
/// queues (in this process or another) may look at the same directory; only one of them
/// should park letters.
#[derive(Clone)]
pub struct FileDeadLetterQueue {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    read_only: bool,
    /// The next sequence number; held while a letter is parked or removed, so that this
    /// queue's writes do not interleave.
    next_seq: Mutex<u64>,
}

/// One letter file found in the directory.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    id: String,
    path: PathBuf,
}

impl std::fmt::Debug for FileDeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDeadLetterQueue")
            .field("dir", &self.inner.dir)
            .field("read_only", &self.inner.read_only)
            .finish()
    }
}

impl FileDeadLetterQueue {
    /// Opens the queue in `dir`, creating the directory if missing, deleting temporary files
    /// a crash left behind and older copies of letters parked again. Blocking file I/O: call
    /// it at start-up (or in `spawn_blocking`).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let scan = scan(&dir)?;
        let mut cleaned = false;
        for path in scan.temporary.iter().chain(&scan.superseded) {
            match std::fs::remove_file(path) {
                Ok(()) => cleaned = true,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", path, e)),
            }
        }
        if cleaned {
            sync_dir(&dir)?;
            tracing::debug!(
                dir = %dir.display(),
                temporary = scan.temporary.len(),
                superseded = scan.superseded.len(),
                "dead-letter queue: removed files left by a crash"
            );
        }
        Ok(Self::new(dir, false, scan.max_seq + 1))
    }

    /// Opens the queue in `dir` to read only: nothing is created or deleted, a missing
    /// directory is an empty queue, and [`push`](DeadLetterQueue::push) and
    /// [`remove`](DeadLetterQueue::remove) are [`Error::ReadOnly`]. For tools that look at a
    /// running application's letters.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Self {
        Self::new(dir.as_ref().to_owned(), true, 1)
    }

    /// Opens the queue in `dir` that a running application parks letters in, to look at
    /// and remove them from another process (the CLI's `dlq discard`): nothing is created,
    /// and nothing left by a crash is cleaned up — a temporary file may be a letter the
    /// application is writing right now. A missing directory is an empty queue.
    /// [`push`](DeadLetterQueue::push) works too, after every letter there is.
    pub fn attach(dir: impl AsRef<Path>) -> Self {
        Self::new(dir.as_ref().to_owned(), false, 1)
    }

    fn new(dir: PathBuf, read_only: bool, next_seq: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir,
                read_only,
                next_seq: Mutex::new(next_seq),
            }),
        }
    }

    /// Where dead letters are kept beside the embedded store in `store_dir`:
    /// `store_dir/dead-letters`.
    pub fn dir_in_store(store_dir: impl AsRef<Path>) -> PathBuf {
        store_dir.as_ref().join(IN_STORE)
    }

    /// The queue's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether the queue was opened with [`open_read_only`](Self::open_read_only).
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    fn check_writable(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::ReadOnly {
                dir: self.inner.dir.clone(),
            });
        }
        Ok(())
    }

    /// Runs blocking file work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> orchestrator_core::Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| {
                CoreError::backend(
                    crate::error::FILE_BACKEND,
                    false,
                    format!("dead-letter queue task failed: {e}"),
                )
            })?
            .map_err(CoreError::from)
    }
}

impl Inner {
    fn push(&self, letter: &DeadLetter) -> Result<()> {
        let escaped = escape_id(&letter.id)?;
        let json = letter.to_json()?;
        let mut next_seq = self.next_seq.lock().unwrap_or_else(PoisonError::into_inner);
        // Another queue on this directory (another process) may have parked letters since
        // this one opened: stay after every letter there is.
        let scan = scan(&self.dir)?;
        let seq = (*next_seq).max(scan.max_seq + 1);
        let name = format!("{seq:0SEQ_DIGITS$}-{escaped}{SUFFIX}");
        let path = self.dir.join(&name);
        let temp = self.dir.join(format!(".{name}{TEMP_SUFFIX}"));
        write_durably(&temp, &json)?;
        std::fs::rename(&temp, &path).map_err(|e| Error::io("rename", &temp, e))?;
        *next_seq = seq + 1;
        // The new letter is in place: older copies of the same id can go. A crash before
        // this leaves them, and the newer one wins until the next `open` deletes them.
        for old in scan.entries.iter().filter(|e| e.id == letter.id) {
            match std::fs::remove_file(&old.path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &old.path, e)),
            }
        }
        sync_dir(&self.dir)
    }

    fn list(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        if query.limit == 0 {
            return Ok(out);
        }
        let scan = scan(&self.dir)?;
        if let Some(file) = scan.unnamed.into_iter().min() {
            return Err(corrupt(file, "the name is not `<seq>-<id>.json`"));
        }
        let mut skip = query.offset;
        for entry in scan.entries {
            let Some(letter) = read_letter(&entry)? else {
                continue;
            };
            if !query.matches(&letter) {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            out.push(letter);
            if out.len() == query.limit {
                break;
            }
        }
        Ok(out)
    }

    fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        match find(&self.dir, id)? {
            Some(entry) => read_letter(&entry),
            None => Ok(None),
        }
    }

    fn remove(&self, id: &str) -> Result<Option<DeadLetter>> {
        let _writing = self.next_seq.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = find(&self.dir, id)? else {
            return Ok(None);
        };
        let Some(letter) = read_letter(&entry)? else {
            return Ok(None);
        };
        match std::fs::remove_file(&entry.path) {
            Ok(()) => {}
            // Removed by another queue on this directory meanwhile: not ours to return.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("remove", &entry.path, e)),
        }
        sync_dir(&self.dir)?;
        Ok(Some(letter))
    }

    fn len(&self) -> Result<usize> {
        let scan = scan(&self.dir)?;
        Ok(scan.entries.len() + scan.unnamed.len())
    }
}

#[async_trait]
impl DeadLetterQueue for FileDeadLetterQueue {
    fn name(&self) -> &'static str {
        "file"
    }

    /// Parks `letter` as the newest, durably (synced before this returns). A letter whose
    /// id is already parked replaces it and becomes the newest.
    async fn push(&self, letter: DeadLetter) -> orchestrator_core::Result<()> {
        self.check_writable()?;
        self.blocking(move |inner| inner.push(&letter)).await
    }

    async fn list(&self, query: &DeadLetterQuery) -> orchestrator_core::Result<Vec<DeadLetter>> {
        let query = query.clone();
        self.blocking(move |inner| inner.list(&query)).await
    }

    async fn get(&self, id: &str) -> orchestrator_core::Result<Option<DeadLetter>> {
        let id = id.to_owned();
        self.blocking(move |inner| inner.get(&id)).await
    }

    /// Removes the letter durably (the directory is synced before this returns).
    async fn remove(&self, id: &str) -> orchestrator_core::Result<Option<DeadLetter>> {
        self.check_writable()?;
        let id = id.to_owned();
        self.blocking(move |inner| inner.remove(&id)).await
    }

    async fn len(&self) -> orchestrator_core::Result<usize> {
        self.blocking(Inner::len).await
    }
}

/// What a look at the directory found.
#[derive(Debug, Default)]
struct Scan {
    /// Letters, oldest first, one per id (the newest copy).
    entries: Vec<Entry>,
    /// Older copies of ids parked again (a crash mid-replace).
    superseded: Vec<PathBuf>,
    /// Temporary files (a crash mid-write).
    temporary: Vec<PathBuf>,
    /// `*.json` files whose names are not `<seq>-<id>.json`.
    unnamed: Vec<PathBuf>,
    /// The highest sequence number seen (0 if none).
    max_seq: u64,
}

/// Looks at `dir`; a missing directory is an empty queue.
fn scan(dir: &Path) -> Result<Scan> {
    let mut scan = Scan::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hidden) = name.strip_prefix('.') {
            if hidden.ends_with(TEMP_SUFFIX) {
                scan.temporary.push(entry.path());
            }
            continue;
        }
        if !name.ends_with(SUFFIX) {
            continue;
        }
        match parse_name(name) {
            Some((seq, id)) => {
                scan.max_seq = scan.max_seq.max(seq);
                found.push(Entry {
                    seq,
                    id,
                    path: entry.path(),
                });
            }
            None => scan.unnamed.push(entry.path()),
        }
    }
    found.sort_by(|a, b| (a.seq, &a.path).cmp(&(b.seq, &b.path)));
    // Keep each id's newest copy, in the order of those copies.
    let mut newest = std::collections::HashMap::new();
    for (i, entry) in found.iter().enumerate() {
        newest.insert(entry.id.clone(), i);
    }
    for (i, entry) in found.into_iter().enumerate() {
        if newest.get(&entry.id) == Some(&i) {
            scan.entries.push(entry);
        } else {
            scan.superseded.push(entry.path);
        }
    }
    Ok(scan)
}

/// The file of letter `id`, if parked.
fn find(dir: &Path, id: &str) -> Result<Option<Entry>> {
    Ok(scan(dir)?.entries.into_iter().find(|e| e.id == id))
}

/// Reads and decodes a letter file; `None` if it was removed meanwhile.
fn read_letter(entry: &Entry) -> Result<Option<DeadLetter>> {
    let bytes = match std::fs::read(&entry.path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &entry.path, e)),
    };
    let letter = DeadLetter::from_json(&bytes)
        .map_err(|e| corrupt(entry.path.clone(), format!("not a dead letter: {e}")))?;
    if letter.id != entry.id {
        return Err(corrupt(
            entry.path.clone(),
            format!(
                "the file name says letter `{}` but it holds letter `{}`",
                entry.id, letter.id
            ),
        ));
    }
    Ok(Some(letter))
}

fn corrupt(file: PathBuf, reason: impl Into<String>) -> Error {
    Error::CorruptDeadLetter {
        file,
        reason: reason.into(),
    }
}

/// Writes `bytes` to a new file at `path` and syncs it.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    file.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    file.sync_all().map_err(|e| Error::io("sync", path, e))
}

/// `<seq>-<escaped id>.json` → `(seq, id)`.
fn parse_name(name: &str) -> Option<(u64, String)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (seq, escaped) = stem.split_at_checked(SEQ_DIGITS)?;
    if !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq = seq.parse().ok()?;
    let escaped = escaped.strip_prefix('-')?;
    Some((seq, unescape_id(escaped)?))
}

fn keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The id as it appears in a file name; an id too long for one is an invalid-input error.
fn escape_id(id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(Error::Core(CoreError::invalid(
            "dead letter id",
            "a dead letter needs an id",
        )));
    }
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if keeps(b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.len() > MAX_ESCAPED_ID {
        return Err(Error::Core(CoreError::invalid(
            "dead letter id",
            format!(
                "`{id}` is too long to name a file ({} bytes escaped, at most {MAX_ESCAPED_ID})",
                out.len()
            ),
        )));
    }
    Ok(out)
}

fn unescape_id(escaped: &str) -> Option<String> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = escaped.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if keeps(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    let id = String::from_utf8(out).ok()?;
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_file_names() {
        for id in [
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            "a/b c%",
            "ü.x",
            "_-",
        ] {
            let escaped = escape_id(id).unwrap();
            assert!(escaped.bytes().all(|b| keeps(b) || b == b'%'), "{escaped}");
            let name = format!("{:020}-{escaped}{SUFFIX}", 7);
            assert_eq!(parse_name(&name), Some((7, id.to_owned())), "{name}");
        }
        assert!(escape_id("").is_err());
        assert!(escape_id(&"/".repeat(100)).is_err());
        assert!(escape_id(&"a".repeat(MAX_ESCAPED_ID)).is_ok());
    }

    #[test]
    fn names_that_are_not_letters_do_not_parse() {
        for name in [
            "x.json",
            "1-a.json",
            "0000000000000000000a-a.json",
            "00000000000000000001a.json",
            "00000000000000000001-.json",
            "00000000000000000001-a%2.json",
            "00000000000000000001-a%ZZ.json",
            "00000000000000000001-a.b.json",
            "99999999999999999999-a.json",
        ] {
            assert_eq!(parse_name(name), None, "{name}");
        }
    }
}
