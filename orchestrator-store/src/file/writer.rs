//! The writer thread: group commit.
//!
//! Every append goes through one thread, which owns the open segment. It takes the first
//! waiting append, then every other append already queued (up to [`MAX_GROUP_BYTES`]),
//! checks each one's event ids and expected version, encodes their frames into one buffer, writes it with
//! one `write`, and syncs it as the [`FsyncPolicy`] says: so appenders that arrive while a
//! sync runs share the next one. Only once their group is durable (per the policy) are the
//! events entered into the index, made visible to readers and subscriptions, and the
//! appenders answered — an append is never visible before it is acknowledged, and a rejected
//! append is answered in order with the ones before it. An append that repeats one already
//! written ([idempotent appends](orchestrator_core::store#idempotent-appends)) is answered
//! with the original's result, also in order: when the original is in the same group, only
//! once that group is durable.
//!
//! If a write or a sync fails, the file's state is unknown: the appends of the group fail,
//! and so does every later append, until the store is reopened (recovery then decides what
//! made it to disk).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use orchestrator_core::codec::{Bincode, Codec};
use orchestrator_core::store::find_retried_append;
use orchestrator_core::{
    AppendResult, Error as CoreError, EventEnvelope, EventId, ExpectedVersion, StoredPosition,
};
use tokio::sync::oneshot;

use crate::error::Error;

use super::format::{FLAG_END_OF_APPEND, SEGMENT_HEADER_LEN, push_frame};
use super::index::NewEntry;
use super::recovery::segment_ref;
use super::segment::{create_segment, segment_path};
use super::{FsyncPolicy, Shared};

/// A group stops growing once its frames take this many bytes.
const MAX_GROUP_BYTES: usize = 4 * 1024 * 1024;

/// One append, as queued for the writer.
pub(crate) struct AppendRequest {
    pub(crate) stream: String,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<EventEnvelope>,
    pub(crate) reply: oneshot::Sender<orchestrator_core::Result<AppendResult>>,
}

/// What the writer is asked to do.
pub(crate) enum Request {
    /// Append events.
    Append(AppendRequest),
    /// Sync and publish everything written so far, then answer.
    Sync(oneshot::Sender<orchestrator_core::Result<()>>),
}

/// A stream's appends written but not yet published.
struct PendingStream {
    /// The stream's version after them.
    version: u64,
    /// Where they put each event id.
    ids: HashMap<EventId, StoredPosition>,
}

/// An append written (or rejected) but not yet answered.
struct Pending {
    reply: oneshot::Sender<orchestrator_core::Result<AppendResult>>,
    result: orchestrator_core::Result<AppendResult>,
    entries: Vec<NewEntry>,
}

pub(crate) struct Writer {
    pub(crate) dir: PathBuf,
    pub(crate) shared: Arc<Shared>,
    pub(crate) requests: Receiver<Request>,
    pub(crate) policy: FsyncPolicy,
    pub(crate) max_segment_bytes: u64,
    /// The open segment, its number and length.
    pub(crate) file: File,
    pub(crate) seq: u64,
    pub(crate) segment_len: u64,
    /// The position the next event gets (head plus events written but not yet published).
    pub(crate) next_position: u64,
    /// Streams with events written but not yet published.
    pending_streams: HashMap<Arc<str>, PendingStream>,
    pending: Vec<Pending>,
    /// Segments created but not yet published.
    new_segments: Vec<u64>,
    /// When the oldest written-but-unsynced group was written (interval policy).
    unsynced_since: Option<Instant>,
    buf: Vec<u8>,
    /// Why the store stopped accepting appends.
    failed: Option<String>,
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dir: PathBuf,
        shared: Arc<Shared>,
        requests: Receiver<Request>,
        policy: FsyncPolicy,
        max_segment_bytes: u64,
        file: File,
        seq: u64,
        segment_len: u64,
        next_position: u64,
    ) -> Self {
        Self {
            dir,
            shared,
            requests,
            policy,
            max_segment_bytes,
            file,
            seq,
            segment_len,
            next_position,
            pending_streams: HashMap::new(),
            pending: Vec::new(),
            new_segments: Vec::new(),
            unsynced_since: None,
            buf: Vec::new(),
            failed: None,
        }
    }

    /// Serves appends until every store handle is gone, then syncs what is left.
    pub(crate) fn run(mut self) {
        while let Some(first) = self.next_request() {
            let mut group = Vec::new();
            let mut syncs = Vec::new();
            let mut next = Some(first);
            let mut bytes = 0;
            let mut yielded = false;
            while let Some(request) = next.take() {
                match request {
                    Request::Append(append) => {
                        bytes += append
                            .events
                            .iter()
                            .map(|e| e.data_bytes().len() + 128)
                            .sum::<usize>();
                        group.push(append);
                    }
                    Request::Sync(reply) => syncs.push(reply),
                }
                if bytes < MAX_GROUP_BYTES {
                    next = self.requests.try_recv().ok();
                    if next.is_none() && !yielded {
                        // Appenders issued together are often still being queued: give
                        // them one chance to join this group rather than wait for the next
                        // sync.
                        yielded = true;
                        std::thread::yield_now();
                        next = self.requests.try_recv().ok();
                    }
                }
            }
            self.commit(group);
            if !syncs.is_empty() {
                if self.failed.is_none() {
                    self.sync(true);
                }
                for reply in syncs {
                    let result = match &self.failed {
                        Some(why) => Err(failed_error(why)),
                        None => Ok(()),
                    };
                    let _ = reply.send(result);
                }
            }
        }
        if !self.pending.is_empty() {
            self.sync(false);
        }
    }

    /// The next request, syncing on the interval policy's deadline while waiting; `None`
    /// once every sender is gone.
    fn next_request(&mut self) -> Option<Request> {
        loop {
            let deadline = match (self.policy, self.unsynced_since) {
                (FsyncPolicy::Interval(every), Some(since)) if !self.pending.is_empty() => {
                    since + every
                }
                _ => return self.requests.recv().ok(),
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.requests.recv_timeout(wait) {
                Ok(request) => return Some(request),
                Err(RecvTimeoutError::Timeout) => self.sync(false),
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn commit(&mut self, group: Vec<AppendRequest>) {
        if group.is_empty() {
            return;
        }
        for request in group {
            if let Some(why) = &self.failed {
                let _ = request.reply.send(Err(failed_error(why)));
                continue;
            }
            self.stage(request);
        }
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.flush_buf() {
            return self.fail(e);
        }
        match self.policy {
            FsyncPolicy::EveryAppend => self.sync(false),
            FsyncPolicy::Never => self.publish(),
            FsyncPolicy::Interval(every) => {
                let since = *self.unsynced_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= every {
                    self.sync(false);
                }
            }
        }
    }

    /// Checks one append and encodes its frames into the buffer.
    fn stage(&mut self, request: AppendRequest) {
        let AppendRequest {
            stream,
            expected,
            events,
            reply,
        } = request;
        let retried = {
            let pending = self.pending_streams.get(stream.as_str());
            let index = self.shared.index();
            find_retried_append(&stream, expected, &events, |id| {
                pending
                    .and_then(|p| p.ids.get(id).copied())
                    .or_else(|| index.stored(&stream, id))
            })
        };
        // A retry or a clash writes nothing; it is answered in order with the appends before
        // it, so a retry whose original is still pending hears once that is published.
        let result = match retried {
            Ok(None) => None,
            Ok(Some(original)) => Some(Ok(original)),
            Err(e) => Some(Err(e)),
        };
        if let Some(result) = result {
            return self.pending.push(Pending {
                reply,
                result,
                entries: Vec::new(),
            });
        }
        let (stream_name, actual) = self.lookup(&stream);
        if !expected.is_satisfied_by(actual) {
            let result = Err(CoreError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            });
            return self.pending.push(Pending {
                reply,
                result,
                entries: Vec::new(),
            });
        }
        let version = actual.unwrap_or(0);
        let first_position = self.next_position;
        let count = events.len() as u64;
        if count == 0 {
            let result = Ok(AppendResult {
                next_expected_version: version,
                first_position,
                last_position: first_position - 1,
            });
            return self.pending.push(Pending {
                reply,
                result,
                entries: Vec::new(),
            });
        }
        let mut frames = Vec::new();
        let mut located = Vec::with_capacity(events.len());
        let mut ids = HashMap::with_capacity(events.len());
        for (i, event) in (1..).zip(events) {
            let position = StoredPosition {
                stream_version: version + i,
                global_position: first_position + i - 1,
            };
            ids.insert(event.id().clone(), position);
            let stored = event.with_position(&*stream_name, position);
            let encoded = match Bincode.encode(&stored) {
                Ok(bytes) => bytes,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            };
            let flags = if i == count { FLAG_END_OF_APPEND } else { 0 };
            let start = frames.len();
            let len = push_frame(&mut frames, flags, &encoded);
            located.push((stored, start, len));
        }
        if let Err(e) = self.make_room(frames.len()) {
            let _ = reply.send(Err(failed_error(&e.to_string())));
            return self.fail(e);
        }
        let base = self.segment_len + self.buf.len() as u64;
        let segment = u32::try_from(self.seq - 1).unwrap_or(u32::MAX);
        let entries = located
            .into_iter()
            .map(|(event, start, len)| {
                NewEntry::new(
                    stream_name.clone(),
                    &event,
                    segment,
                    base + start as u64,
                    len,
                )
            })
            .collect();
        self.buf.extend_from_slice(&frames);
        self.next_position += count;
        match self.pending_streams.entry(stream_name) {
            Entry::Occupied(mut pending) => {
                let pending = pending.get_mut();
                pending.version = version + count;
                pending.ids.extend(ids);
            }
            Entry::Vacant(slot) => {
                slot.insert(PendingStream {
                    version: version + count,
                    ids,
                });
            }
        }
        self.pending.push(Pending {
            reply,
            result: Ok(AppendResult {
                next_expected_version: version + count,
                first_position,
                last_position: first_position + count - 1,
            }),
            entries,
        });
    }

    /// The stream's shared name and its version, written-but-unpublished appends included.
    fn lookup(&self, stream: &str) -> (Arc<str>, Option<u64>) {
        if let Some((name, pending)) = self.pending_streams.get_key_value(stream) {
            return (name.clone(), Some(pending.version));
        }
        let index = self.shared.index();
        match index.stream_name(stream) {
            Some(name) => (name, index.stream_version(stream)),
            None => (Arc::from(stream), None),
        }
    }

    /// Rolls over to a new segment if `bytes` more would overflow the open one (which must
    /// hold something: an append larger than a segment gets a segment of its own).
    fn make_room(&mut self, bytes: usize) -> Result<(), Error> {
        let used = self.segment_len + self.buf.len() as u64;
        if used + bytes as u64 <= self.max_segment_bytes || used <= SEGMENT_HEADER_LEN as u64 {
            return Ok(());
        }
        self.flush_buf()?;
        // Sealed segments are synced whatever the policy, so that only the last segment can
        // ever have a torn tail.
        let path = segment_path(&self.dir, self.seq);
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync", &path, e))?;
        self.file = create_segment(&self.dir, self.seq + 1)?;
        self.seq += 1;
        self.segment_len = SEGMENT_HEADER_LEN as u64;
        self.new_segments.push(self.seq);
        self.shared.stats.segments.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.seq);
        self.file
            .write_all(&self.buf)
            .map_err(|e| Error::io("write", &path, e))?;
        self.segment_len += self.buf.len() as u64;
        self.buf.clear();
        self.shared.stats.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Syncs what was written (if anything is pending, or if `always`) and publishes it.
    fn sync(&mut self, always: bool) {
        if always || self.pending.iter().any(|p| !p.entries.is_empty()) {
            let path = segment_path(&self.dir, self.seq);
            if let Err(e) = self.file.sync_data() {
                return self.fail(Error::io("sync", &path, e));
            }
            self.shared.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.publish();
    }

    /// Makes the pending appends visible and answers them.
    fn publish(&mut self) {
        self.unsynced_since = None;
        let readers: Vec<_> = std::mem::take(&mut self.new_segments)
            .into_iter()
            .map(|seq| segment_ref(&segment_path(&self.dir, seq)))
            .collect();
        let mut pending = std::mem::take(&mut self.pending);
        let mut appends = 0;
        let mut events = 0;
        let head = {
            let mut index = self
                .shared
                .index
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for reader in readers {
                index.push_segment(reader);
            }
            for p in &mut pending {
                if !p.entries.is_empty() {
                    appends += 1;
                }
                events += p.entries.len() as u64;
                for entry in p.entries.drain(..) {
                    index.push(entry);
                }
            }
            index.head()
        };
        self.pending_streams.clear();
        self.shared.head.send_replace(head);
        self.shared
            .stats
            .appends
            .fetch_add(appends, Ordering::Relaxed);
        self.shared
            .stats
            .events
            .fetch_add(events, Ordering::Relaxed);
        for p in pending {
            let _ = p.reply.send(p.result);
        }
    }

    /// Stops accepting appends: the pending ones fail with `error`.
    fn fail(&mut self, error: Error) {
        let why = error.to_string();
        tracing::error!(dir = %self.dir.display(), "embedded store write failed: {why}");
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Err(failed_error(&why)));
        }
        self.buf.clear();
        self.failed = Some(why);
    }
}

fn failed_error(why: &str) -> CoreError {
    CoreError::backend(
        crate::error::FILE_BACKEND,
        false,
        format!(
            "the store stopped accepting appends after a write failure ({why}); reopen it to recover"
        ),
    )
}
