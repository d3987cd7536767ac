//! The embedded durable store: events in append-only segment files under one directory.
//!
//! For applications that want their events to survive a restart on one machine, without a
//! broker. [`FileEventStore`] implements [`EventStore`] with every capability
//! ([`StoreCapabilities::FULL`]) and passes the same conformance suite as every other store.
//!
//! # How it works
//!
//! - **Records.** Each event is one frame: length, CRC-32 of the body, CRC-32 of the header,
//!   an end-of-append flag, then the stored envelope encoded with the core
//!   [`Bincode`](orchestrator_core::codec::Bincode) codec. See `format.rs` for the layout.
//! - **Segments.** Frames go to `segment-NNNNNNNNNN.log`; when the next append would push a
//!   segment past [`FileStoreOptions::max_segment_bytes`], the segment is synced and sealed
//!   and a new one begins. An append never spans two segments.
//! - **Group commit.** One writer thread takes every append queued while the previous group
//!   was being written, writes them with one `write` and syncs once, per the
//!   [`FsyncPolicy`]. An append is acknowledged, and becomes visible to readers, only after
//!   its group is durable per the policy.
//! - **Recovery.** Opening scans every segment, checks both checksums of every frame and
//!   the sequence of positions and versions, and rebuilds the index in memory (the index is
//!   not persisted: rebuilding is a sequential read, and it cannot disagree with the data).
//!   A torn tail of the last segment (what a crash mid-write leaves, including an append
//!   missing its last frames) is cut off; anything else that fails a check is an
//!   [`Error::Corrupt`] naming the file and byte offset, and the store
//!   does not open. [`FileEventStore::recovery_report`] tells what was found.
//! - **Reads.** The index holds each event's location, stream, type and time, so filtered
//!   reads fetch only matching frames; frames next to each other are fetched with one
//!   positioned read and checked again before decoding. Reads are plain blocking file reads
//!   on the calling task (mostly served from the page cache). Segment files are opened when
//!   a read needs them and kept in a cache of [`FileStoreOptions::max_open_segments`]
//!   handles (64 by default), so the number of segments is not bounded by the process's
//!   file-descriptor limit.
//!
//! Dropping the last handle of a store waits for the writer to finish the appends in flight
//! and sync them.
//!
//! # One writer per directory
//!
//! A second writer would corrupt the store (its recovery could cut off the tail the first is
//! still writing), so [`FileEventStore::open`] locks the directory: it takes an exclusive
//! operating-system lock on `DIR/LOCK` ([`std::fs::File::try_lock`]) and writes its process
//! id into it. While that store is open, another `open` of the directory — from another
//! process, or from this one — fails at once with [`Error::Locked`], naming the directory
//! and the holder's pid, and touches nothing. The lock goes when the last handle is dropped
//! (after the writer has finished), or when the holder's process ends however it ends: a
//! `LOCK` file left by a killed process blocks nobody. The lock is advisory and local:
//! it relies on the file system's locks, which network file systems may not honour.
//!
//! # Reading beside a running writer
//!
//! [`FileEventStore::open_read_only`] takes no lock and writes nothing: tools (the
//! `orchestrator` CLI's read commands) use it on the directory of a running application. It
//! sees the whole appends on disk when it opens — an append still being written is left
//! unread, not cut — and [`FileEventStore::refresh`] reads what was appended since.
//! Appending to it is [`CoreError::Unsupported`].
//!
//! ```
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
//! use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let options = FileStoreOptions::default().fsync(FsyncPolicy::EveryAppend);
//! let store = FileEventStore::open_with(dir.path(), options.clone())?;
//! let placed = EventEnvelope::new("order.placed", &serde_json::json!({ "order_id": "o-1" }))?;
//! store.append("order-o-1", ExpectedVersion::NoStream, vec![placed]).await?;
//! drop(store);
//!
//! let reopened = FileEventStore::open_with(dir.path(), options)?;
//! assert_eq!(reopened.recovery_report().events, 1);
//! assert_eq!(reopened.stream_version("order-o-1").await?, Some(1));
//!
//! // The directory is locked while `reopened` lives; reading beside it needs no lock.
//! let again = FileEventStore::open(dir.path());
//! assert!(matches!(again, Err(orchestrator_store::Error::Locked { .. })));
//! let reader = FileEventStore::open_read_only(dir.path())?;
//! assert_eq!(reader.stream_version("order-o-1").await?, Some(1));
//! # Ok(())
//! # }
//! ```

pub mod dead_letters;
mod format;
mod handles;
mod index;
mod lock;
mod read;
mod recovery;
mod segment;
mod subscription;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::store::{validate_batch_ids, validate_stream_id};
use orchestrator_core::{
    AppendResult, Error as CoreError, EventEnvelope, EventFilter, EventStore, EventStream,
    ExpectedVersion, MaxEventSize, ReadAll, Result, StoreCapabilities,
};
use tokio::sync::{oneshot, watch};

use crate::error::Error;

pub use dead_letters::FileDeadLetterQueue;
pub use recovery::RecoveryReport;
pub(crate) use segment::sync_dir;

use handles::SegmentFiles;
use index::{Index, Loc};
use lock::DirLock;
use recovery::Cursor;
use writer::{AppendRequest, Request, Writer};

/// How many index entries one read looks at before letting go of the index lock.
const SCAN_CHUNK: usize = 4096;

/// When the writer syncs written appends to disk; an append is acknowledged only once the
/// policy is satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Sync every group of appends before acknowledging it: an acknowledged append
    /// survives a power loss. Concurrent appends share one sync.
    #[default]
    EveryAppend,
    /// Write at once, sync at most this often: appends wait up to this long for their
    /// acknowledgement, and many share one sync. Acknowledged appends survive a power loss.
    Interval(Duration),
    /// Never sync (except when sealing a segment): acknowledged appends are in the
    /// operating system's cache and survive a crash of the process, not of the machine.
    Never,
}

/// How a [`FileEventStore`] is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileStoreOptions {
    /// When to sync; [`FsyncPolicy::EveryAppend`] by default.
    pub fsync: FsyncPolicy,
    /// The size past which a segment is sealed and a new one started (64 MiB by default).
    pub max_segment_bytes: u64,
    /// How many segment files readers keep open at most (64 by default): segments are
    /// opened when a read needs them and the least recently read is closed first, so a
    /// store of any number of segments stays within the process's file-descriptor limit.
    /// The segment being written has one more handle, always open.
    pub max_open_segments: usize,
    /// The largest event an append accepts ([`MaxEventSize::DEFAULT`] by default); a batch
    /// with a larger event is refused with [`Error::TooLarge`](orchestrator_core::Error::TooLarge)
    /// before anything of it is written. Reading is not limited by it (only by the format's
    /// 64 MiB), so events written under a larger limit stay readable.
    pub max_event_size: MaxEventSize,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::EveryAppend,
            max_segment_bytes: 64 * 1024 * 1024,
            max_open_segments: 64,
            max_event_size: MaxEventSize::DEFAULT,
        }
    }
}

impl FileStoreOptions {
    /// Sets the sync policy.
    pub fn fsync(mut self, policy: FsyncPolicy) -> Self {
        self.fsync = policy;
        self
    }

    /// Sets the segment size (at least 4 KiB).
    pub fn max_segment_bytes(mut self, bytes: u64) -> Self {
        self.max_segment_bytes = bytes.max(4096);
        self
    }

    /// Sets how many segment files readers keep open at most (at least 1; see
    /// [`max_open_segments`](Self::max_open_segments)).
    pub fn max_open_segments(mut self, segments: usize) -> Self {
        self.max_open_segments = segments.max(1);
        self
    }

    /// Sets the largest event an append accepts (see [`max_event_size`](Self::max_event_size)).
    pub fn max_event_size(mut self, limit: MaxEventSize) -> Self {
        self.max_event_size = limit;
        self
    }
}

/// Counters of the writer's work, to see group commit at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FileStoreStats {
    /// Appends that wrote at least one event.
    pub appends: u64,
    /// Events written.
    pub events: u64,
    /// `write` calls.
    pub writes: u64,
    /// Syncs of written appends (sealing a segment is not counted).
    pub syncs: u64,
    /// Segments created since the store was opened.
    pub segments_created: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    appends: AtomicU64,
    events: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    segments: AtomicU64,
}

/// What the writer and the readers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) index: RwLock<Index>,
    /// The published head position; subscriptions wait on it and see the store close when
    /// it drops.
    pub(crate) head: watch::Sender<u64>,
    pub(crate) stats: Stats,
    /// The segments' read handles, opened on demand, at most `max_open_segments` at once.
    pub(crate) files: SegmentFiles,
}

impl Shared {
    // A poisoned lock is recovered: the only writer of the index (the writer thread's
    // `publish`) pushes entries with operations that cannot panic half-way for reasons of
    // ours, so a panic elsewhere while a guard was held cannot have left it half-written.
    pub(crate) fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The embedded durable [`EventStore`]; see the [module docs](self).
///
/// Clones share the same store. Subscriptions end when the last clone is dropped.
#[derive(Clone)]
pub struct FileEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    shared: Arc<Shared>,
    /// `None` only while dropping, and for a read-only store.
    requests: Mutex<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    report: RecoveryReport,
    options: FileStoreOptions,
    /// The inbox in `<dir>/inbox`, handed out by [`EventStore::inbox`]; its directory is
    /// created when a group is first used. `None` on a store opened read-only, which
    /// writes nothing.
    inbox: Option<Arc<crate::inbox::FileInbox>>,
    /// Dropped after `Drop::drop` has joined the writer, so the directory is unlocked only
    /// once every append in flight is on disk.
    access: Access,
}

/// How the store was opened.
enum Access {
    /// For writing: the directory's lock, held while the store is open.
    Write {
        /// Held, never read: dropping it unlocks the directory.
        _lock: DirLock,
    },
    /// For reading only: where the last scan stopped, for [`FileEventStore::refresh`] (the
    /// lock makes refreshes take turns).
    ReadOnly(Mutex<Cursor>),
}

impl Inner {
    fn closed(&self) -> CoreError {
        CoreError::Closed {
            what: format!("embedded store in {}", self.dir.display()),
        }
    }

    /// The error of a write to a store opened read-only, if this one was.
    fn check_writable(&self, operation: &'static str) -> Result<()> {
        match self.access {
            Access::Write { .. } => Ok(()),
            Access::ReadOnly(_) => Err(CoreError::Unsupported {
                backend: "the embedded store opened read-only",
                operation,
                hint: "FileEventStore::open_read_only never writes; open the directory with \
                       FileEventStore::open to write (only one process may: stop the one \
                       holding it, or write through it)",
            }),
        }
    }

    fn send(&self, request: Request) -> Result<()> {
        let sent = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|requests| requests.send(request).is_ok());
        if sent { Ok(()) } else { Err(self.closed()) }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit; waiting for
        // it means a store reopened right after this drop sees every acknowledged append.
        drop(
            self.requests
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(writer) = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            && writer.join().is_err()
        {
            tracing::error!(dir = %self.dir.display(), "the embedded store's writer panicked");
        }
    }
}

impl FileEventStore {
    /// Opens the store in `dir` (created if missing) with the default options.
    pub fn open(dir: impl AsRef<Path>) -> crate::Result<Self> {
        Self::open_with(dir, FileStoreOptions::default())
    }

    /// Opens the store in `dir` (created if missing): scans and checks every segment,
    /// cuts off a torn tail, rebuilds the index and starts the writer thread.
    ///
    /// This reads every segment once, with blocking file I/O: call it at start-up (or in
    /// `spawn_blocking`). A corrupt record is an [`Error::Corrupt`]
    /// naming the file and offset.
    ///
    /// Before anything is read, the directory is locked for this store (see the
    /// [module docs](self#one-writer-per-directory)): while another store has it open for
    /// writing, in this process or another, this is [`Error::Locked`] naming that process,
    /// and nothing is touched. [`open_read_only`](Self::open_read_only) needs no lock.
    pub fn open_with(dir: impl AsRef<Path>, options: FileStoreOptions) -> crate::Result<Self> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let lock = lock::acquire(&dir)?;
        let recovered = recovery::recover(&dir)?;
        let head = recovered.index.head();
        let shared = Arc::new(Shared {
            index: RwLock::new(recovered.index),
            head: watch::Sender::new(head),
            stats: Stats::default(),
            files: SegmentFiles::new(options.max_open_segments),
        });
        let (requests, receiver) = mpsc::channel();
        let writer = Writer::new(
            dir.clone(),
            shared.clone(),
            receiver,
            options.fsync,
            options.max_segment_bytes,
            recovered.last_file,
            recovered.last_seq,
            recovered.last_len,
            head + 1,
        );
        let writer = std::thread::Builder::new()
            .name("orchestrator-file-store".to_owned())
            .spawn(move || writer.run())
            .map_err(|e| Error::io("start writer for", &dir, e))?;
        tracing::debug!(dir = %dir.display(), report = ?recovered.report, "embedded store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                requests: Mutex::new(Some(requests)),
                writer: Mutex::new(Some(writer)),
                report: recovered.report,
                inbox: Some(Arc::new(
                    crate::inbox::FileInbox::at(&dir.join("inbox")).with_sync(
                        match options.fsync {
                            FsyncPolicy::Never => crate::inbox::InboxSync::Never,
                            FsyncPolicy::EveryAppend | FsyncPolicy::Interval(_) => {
                                crate::inbox::InboxSync::EveryRecord
                            }
                        },
                    ),
                )),
                options,
                access: Access::Write { _lock: lock },
                dir,
            }),
        })
    }

    /// Opens the store in `dir` for reading only, beside a process that may be writing to
    /// it: for tools that look into a running application's store.
    ///
    /// It never creates, truncates or writes a file, and takes no lock, so it opens while
    /// a writer holds the directory. It scans the segments as they are on disk at the call:
    /// the store holds every append complete by then, and an append being written (a frame
    /// cut short, or an append missing its last frames, at the end of the last segment) is
    /// left unread, and on disk ([`RecoveryReport::unread_bytes`]). That is a consistent
    /// prefix of the store: whole appends, gapless positions and versions. It may include
    /// appends the writer has written but not yet synced, and so not yet acknowledged to
    /// their appenders (a power loss before that sync would lose them).
    ///
    /// Reads and subscriptions see that snapshot, and what each
    /// [`refresh`](Self::refresh) adds; nothing else arrives by itself. Appending (and
    /// [`sync`](Self::sync)) is [`CoreError::Unsupported`].
    ///
    /// A directory that does not exist is an [`Error::Io`]; an empty one is an empty store.
    /// A corrupt record is an [`Error::Corrupt`], as for [`open`](Self::open). Like
    /// `open`, this reads every segment with blocking file I/O.
    pub fn open_read_only(dir: impl AsRef<Path>) -> crate::Result<Self> {
        let dir = dir.as_ref().to_owned();
        let index = RwLock::new(Index::default());
        let mut cursor = Cursor::START;
        let scanned = recovery::scan(&dir, &index, &mut cursor)?;
        let index = index.into_inner().unwrap_or_else(PoisonError::into_inner);
        let head = index.head();
        let report = RecoveryReport {
            segments: scanned.segments,
            events: head,
            unread_bytes: match scanned.tail {
                recovery::Tail::Torn { bytes, .. } => bytes,
                recovery::Tail::Clean | recovery::Tail::TornHeader => 0,
            },
            ..RecoveryReport::default()
        };
        tracing::debug!(dir = %dir.display(), ?report, "embedded store opened read-only");
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                shared: Arc::new(Shared {
                    index: RwLock::new(index),
                    head: watch::Sender::new(head),
                    stats: Stats::default(),
                    files: SegmentFiles::new(FileStoreOptions::default().max_open_segments),
                }),
                requests: Mutex::new(None),
                writer: Mutex::new(None),
                report,
                options: FileStoreOptions::default(),
                access: Access::ReadOnly(Mutex::new(cursor)),
                inbox: None,
            }),
        })
    }

    /// Whether the store was opened with [`open_read_only`](Self::open_read_only).
    pub fn is_read_only(&self) -> bool {
        matches!(self.inner.access, Access::ReadOnly(_))
    }

    /// Reads what was appended to the directory since a read-only store was opened (or last
    /// refreshed), by whichever process writes to it, and makes it visible to reads and
    /// subscriptions; returns how many events were added.
    ///
    /// It resumes where the last scan stopped, so it reads only the new bytes, with the same
    /// checks as opening and the same treatment of an append being written (left for the
    /// next refresh). Blocking file I/O, like opening. A store opened for writing sees every
    /// append as it is made: there, this does nothing and returns 0.
    pub fn refresh(&self) -> crate::Result<u64> {
        let Access::ReadOnly(cursor) = &self.inner.access else {
            return Ok(0);
        };
        let mut cursor = cursor.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = &self.inner.shared;
        let before = shared.index().head();
        // On an error, the index keeps the whole appends scanned before it and the cursor
        // stops after them: the next refresh reports the same trouble again.
        let result = recovery::scan(&self.inner.dir, &shared.index, &mut cursor);
        let head = shared.index().head();
        if head != before {
            shared.head.send_replace(head);
        }
        result?;
        Ok(head - before)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The options the store was opened with (the defaults for a read-only store, which has
    /// no writer to apply them to).
    pub fn options(&self) -> &FileStoreOptions {
        &self.inner.options
    }

    /// What opening the store found (segments, events, a torn tail cut off).
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// The writer's counters since the store was opened.
    pub fn stats(&self) -> FileStoreStats {
        let s = &self.inner.shared.stats;
        FileStoreStats {
            appends: s.appends.load(Ordering::Relaxed),
            events: s.events.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            segments_created: s.segments.load(Ordering::Relaxed),
        }
    }

    /// Syncs every append written so far to disk and acknowledges it, without waiting for
    /// the [`FsyncPolicy::Interval`] deadline (and, under [`FsyncPolicy::Never`], making
    /// what was written so far survive a power loss).
    pub async fn sync(&self) -> Result<()> {
        self.inner.check_writable("sync")?;
        let (reply, answer) = oneshot::channel();
        self.inner.send(Request::Sync(reply))?;
        answer.await.map_err(|_| self.inner.closed())?
    }

    /// Reads the events at `locs` (taken from the index, which must be released).
    fn read(&self, locs: &[Loc]) -> Result<Vec<EventEnvelope>> {
        let segments = self.inner.shared.index().segments.clone();
        let mut events = Vec::new();
        read::read_locs(&self.inner.shared.files, &segments, locs, &mut events)?;
        Ok(events)
    }
}

impl fmt::Debug for FileEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let index = self.inner.shared.index();
        f.debug_struct("FileEventStore")
            .field("dir", &self.inner.dir)
            .field("head_position", &index.head())
            .field("streams", &index.stream_count())
            .field("segments", &index.segments.len())
            .finish()
    }
}

/// Reads up to `limit` events matching `filter` from `from`, no further than `until`,
/// chunk by chunk so the index lock is never held for long. Returns the events and the
/// position of the first event not looked at.
pub(crate) fn read_range(
    shared: &Shared,
    from: u64,
    until: u64,
    filter: &EventFilter,
    limit: usize,
) -> crate::Result<(Vec<EventEnvelope>, u64)> {
    let mut events = Vec::new();
    let mut next = from.max(1);
    let mut locs = Vec::new();
    while events.len() < limit && next <= until {
        let chunk_end = next.saturating_add(SCAN_CHUNK as u64 - 1).min(until);
        locs.clear();
        let segments = {
            let index = shared.index();
            let compiled = index.compile(filter);
            next = index.scan(next, chunk_end, &compiled, limit - events.len(), |loc| {
                locs.push(loc);
            });
            index.segments.clone()
        };
        read::read_locs(&shared.files, &segments, &locs, &mut events)?;
    }
    Ok((events, next))
}

#[async_trait]
impl EventStore for FileEventStore {
    fn name(&self) -> &'static str {
        "file"
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities::FULL
    }

    /// A [`FileInbox`](crate::inbox::FileInbox) in `<store dir>/inbox`, the same one on
    /// every call: default retention, every record synced unless the store never syncs
    /// ([`FsyncPolicy::Never`]).
    fn inbox(&self) -> Option<Arc<dyn orchestrator_core::Inbox>> {
        self.inner
            .inbox
            .as_ref()
            .map(|inbox| Arc::clone(inbox) as Arc<dyn orchestrator_core::Inbox>)
    }

    fn lease(&self, name: &str) -> Option<Arc<dyn orchestrator_core::Lease>> {
        // One process at a time opens the directory, so there is nobody to compete with.
        Some(Arc::new(orchestrator_core::LocalLease::new(format!(
            "lease `{name}` of the embedded store in {}",
            self.inner.dir.display()
        ))))
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> Result<AppendResult> {
        validate_stream_id(stream)?;
        self.inner.check_writable("append")?;
        validate_batch_ids(&events)?;
        self.inner
            .options
            .max_event_size
            .check_append(stream, &events)?;
        let (reply, answer) = oneshot::channel();
        self.inner.send(Request::Append(AppendRequest {
            stream: stream.to_owned(),
            expected,
            events,
            reply,
        }))?;
        answer.await.map_err(|_| self.inner.closed())?
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>> {
        validate_stream_id(stream)?;
        let mut events = Vec::new();
        let mut from = from_version.max(1);
        while events.len() < limit {
            let locs = self.inner.shared.index().stream_locs(
                stream,
                from,
                (limit - events.len()).min(SCAN_CHUNK),
            );
            if locs.is_empty() {
                break;
            }
            from += locs.len() as u64;
            events.extend(self.read(&locs)?);
        }
        Ok(events)
    }

    async fn read_all(&self, query: ReadAll) -> Result<Vec<EventEnvelope>> {
        // Events appended while this read runs are not waited for: it ends at today's head.
        let until = self.inner.shared.index().head();
        let (events, _) = read_range(
            &self.inner.shared,
            query.from_position,
            until,
            &query.filter,
            query.limit,
        )?;
        Ok(events)
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        validate_stream_id(stream)?;
        Ok(self.inner.shared.index().stream_version(stream))
    }

    async fn head_position(&self) -> Result<u64> {
        Ok(self.inner.shared.index().head())
    }

    async fn subscribe(&self, from_position: u64, filter: EventFilter) -> Result<EventStream> {
        Ok(subscription::subscribe(
            &self.inner.shared,
            from_position,
            filter,
        ))
    }
}
