//! Opening a store directory: scan every segment, check every frame, rebuild the index, and
//! (when opening for writing) cut a torn tail off the last segment.
//!
//! [`scan`] only reads: it is what a read-only open and its refreshes run, resuming at the
//! [`Cursor`] where the previous scan stopped. [`recover`] runs it from the start, then
//! repairs the tail for the writer.
//!
//! What counts as a torn tail (dropped by `recover`, with a warning; left unread by a
//! read-only open, since a live writer may be writing it): in the **last** segment only, bytes
//! after the last complete append that are a prefix of a frame (the header or the body runs
//! past the end of the file), only zeros, or whole frames of an append whose final frame is
//! missing. A crash mid-write leaves exactly these. Anything else — a checksum mismatch on a
//! frame that is all there, an impossible length, an undecodable envelope, positions or
//! versions out of sequence, a torn frame in a sealed segment — is [`Error::Corrupt`] naming
//! the file and offset, and the store does not open.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{Error, Result};

use super::format::{
    FLAG_END_OF_APPEND, Parsed, SEGMENT_HEADER_LEN, decode_envelope, parse_frame, segment_header,
};
use super::index::{Index, NewEntry, SegmentRef};
use super::segment::{create_segment, list_segments, segment_path};

/// What opening a store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Segment files scanned.
    pub segments: usize,
    /// Events found.
    pub events: u64,
    /// Where a torn tail was cut off (file and offset), if one was.
    pub truncated_at: Option<(PathBuf, u64)>,
    /// How many bytes the torn tail had.
    pub truncated_bytes: u64,
    /// Bytes at the end of the last segment that a read-only open left unread, and on
    /// disk: an append a live writer was writing, or a torn tail the next writer will cut.
    /// Always 0 when opening for writing (see `truncated_bytes`).
    pub unread_bytes: u64,
}

/// The scanned state, ready for the writer.
pub(crate) struct Recovered {
    pub(crate) index: Index,
    /// The last segment's number.
    pub(crate) last_seq: u64,
    /// The last segment, open for appending, and its length.
    pub(crate) last_file: File,
    pub(crate) last_len: u64,
    pub(crate) report: RecoveryReport,
}

/// A segment for the index; its file is opened when a read needs it.
pub(crate) fn segment_ref(path: &Path) -> SegmentRef {
    SegmentRef {
        path: path.to_owned(),
    }
}

fn open_writer(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// Where scanning stopped: the last segment scanned and the end of its last complete
/// append, so a later scan can resume there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// The segment number (from 1).
    pub(crate) seq: u64,
    /// The byte offset in that segment where its complete appends end (0 before its header
    /// is read).
    pub(crate) offset: u64,
}

impl Cursor {
    /// Nothing scanned yet.
    pub(crate) const START: Self = Self { seq: 1, offset: 0 };
}

/// What the last segment holds past its complete appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Nothing: it ends at an append boundary.
    Clean,
    /// Its header is incomplete: created, not yet (or never) finished.
    TornHeader,
    /// Bytes that are not a complete append: a torn tail left by a crash, or an append a
    /// live writer is writing right now.
    Torn {
        /// Why they are not read.
        why: &'static str,
        /// How many bytes.
        bytes: u64,
    },
}

/// What [`scan`] found.
#[derive(Debug)]
pub(crate) struct Scanned {
    /// What follows the complete appends in the last segment.
    pub(crate) tail: Tail,
    /// How many segment files there are.
    pub(crate) segments: usize,
}

/// Scans the segments of `dir` from `cursor` on (an append boundary a previous scan stopped
/// at, or [`Cursor::START`]) into `index`, checking every frame, and moves `cursor` past
/// every append it enters (also when it then fails). It changes nothing on disk: a torn
/// tail of the last segment is reported, not cut. Each segment is read before the index is
/// locked (for writing) to enter its events.
pub(crate) fn scan(dir: &Path, index: &RwLock<Index>, cursor: &mut Cursor) -> Result<Scanned> {
    let from = *cursor;
    let seqs = list_segments(dir)?;
    for (i, &seq) in seqs.iter().enumerate() {
        let expected = i as u64 + 1;
        if seq != expected {
            return Err(Error::corrupt(
                segment_path(dir, expected),
                0,
                format!("segment {expected} is missing (found segment {seq} after it)"),
            ));
        }
    }
    let last_seq = seqs.len() as u64;
    let mut scanned = Scanned {
        tail: Tail::Clean,
        segments: seqs.len(),
    };
    if last_seq == 0 && from == Cursor::START {
        return Ok(scanned);
    }
    if last_seq < from.seq {
        return Err(Error::corrupt(
            segment_path(dir, from.seq),
            0,
            format!("segment {} was scanned before and is gone", from.seq),
        ));
    }
    for seq in from.seq..=last_seq {
        let path = segment_path(dir, seq);
        let start = if seq == from.seq { from.offset } else { 0 };
        let data = read_from(&path, start)?;
        let mut index = index.write().unwrap_or_else(PoisonError::into_inner);
        if (index.segments.len() as u64) < seq {
            index.push_segment(segment_ref(&path));
        }
        let segment = u32::try_from(seq - 1).unwrap_or(u32::MAX);
        *cursor = Cursor { seq, offset: start };
        let tail = scan_segment(&path, &data, segment, &mut cursor.offset, &mut index)?;
        let kept = cursor.offset;
        if seq != last_seq && tail != Tail::Clean {
            let why = match tail {
                Tail::Torn { why, .. } => why,
                _ => "the segment header is incomplete",
            };
            return Err(Error::corrupt(
                &path,
                kept,
                format!("{why}, in a sealed segment (only the last segment may have a torn tail)"),
            ));
        }
        scanned.tail = tail;
    }
    Ok(scanned)
}

/// The bytes of `path` from `start` on.
fn read_from(path: &Path, start: u64) -> Result<Vec<u8>> {
    let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut data = Vec::new();
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_to_end(&mut data))
        .map_err(|e| Error::io("read", path, e))?;
    Ok(data)
}

/// Opens `dir` for writing: scans every segment (creating the first one of a new store),
/// cuts a torn tail off the last, and opens it for appending.
pub(crate) fn recover(dir: &Path) -> Result<Recovered> {
    let index = RwLock::new(Index::default());
    let mut cursor = Cursor::START;
    let scanned = scan(dir, &index, &mut cursor)?;
    let mut index = index.into_inner().unwrap_or_else(PoisonError::into_inner);
    let mut report = RecoveryReport {
        segments: scanned.segments,
        events: index.head(),
        ..RecoveryReport::default()
    };
    if scanned.segments == 0 {
        let file = create_segment(dir, 1)?;
        index.push_segment(segment_ref(&segment_path(dir, 1)));
        report.segments = 1;
        return Ok(Recovered {
            index,
            last_seq: 1,
            last_file: file,
            last_len: SEGMENT_HEADER_LEN as u64,
            report,
        });
    }
    let Cursor {
        seq: last_seq,
        offset: mut last_len,
    } = cursor;
    let path = segment_path(dir, last_seq);
    let mut last_file = open_writer(&path)?;
    match scanned.tail {
        Tail::Clean => {}
        Tail::TornHeader => {
            // Created but never finished: start it again.
            last_file
                .set_len(0)
                .and_then(|()| last_file.write_all(&segment_header()))
                .and_then(|()| last_file.sync_all())
                .map_err(|e| Error::io("repair", &path, e))?;
            last_len = SEGMENT_HEADER_LEN as u64;
        }
        Tail::Torn { why, bytes } => {
            tracing::warn!(
                file = %path.display(),
                offset = last_len,
                bytes,
                "cutting off a torn tail: {why}"
            );
            last_file
                .set_len(last_len)
                .and_then(|()| last_file.sync_all())
                .map_err(|e| Error::io("truncate", &path, e))?;
            report.truncated_at = Some((path.clone(), last_len));
            report.truncated_bytes = bytes;
        }
    }
    // The writer appends with plain writes: start them where the kept data ends.
    last_file
        .seek(SeekFrom::Start(last_len))
        .map_err(|e| Error::io("seek", &path, e))?;
    Ok(Recovered {
        index,
        last_seq,
        last_file,
        last_len,
        report,
    })
}

/// Scans one segment's bytes, read from `kept` on (0, or an append boundary), into the
/// index, moving `kept` to the end of each append entered; returns what follows the last.
fn scan_segment(
    path: &Path,
    data: &[u8],
    segment: u32,
    kept: &mut u64,
    index: &mut Index,
) -> Result<Tail> {
    let start = *kept;
    let mut offset = 0;
    if start == 0 {
        let header = segment_header();
        if data.get(..SEGMENT_HEADER_LEN) != Some(&header[..]) {
            let torn_header = data.len() <= SEGMENT_HEADER_LEN
                && data
                    .iter()
                    .zip(header.iter())
                    .all(|(&got, &want)| got == want || got == 0);
            if torn_header {
                return Ok(Tail::TornHeader);
            }
            return Err(Error::corrupt(
                path,
                0,
                "not an orchestrator segment header",
            ));
        }
        offset = SEGMENT_HEADER_LEN;
    }
    let absolute = |offset: usize| start + offset as u64;

    // The current append's events, entered into the index only once its last frame is seen.
    let mut append_start = offset;
    let mut append: Vec<NewEntry> = Vec::new();
    let mut append_base_version = 0;
    let torn = loop {
        if offset == data.len() {
            break (!append.is_empty()).then_some("the file ends inside an append");
        }
        let (flags, envelope, len) = match parse_frame(&data[offset..]) {
            Parsed::Frame {
                flags,
                envelope,
                len,
            } => (flags, envelope, len),
            Parsed::Torn(why) => break Some(why),
            Parsed::Bad(why) => return Err(Error::corrupt(path, absolute(offset), why)),
        };
        let at = absolute(offset);
        let event = decode_envelope(envelope)
            .map_err(|e| Error::corrupt(path, at, format!("undecodable event: {e}")))?;
        let (Some(stream), Some(position)) = (event.stream_id(), event.position()) else {
            return Err(Error::corrupt(path, at, "event without stream or position"));
        };
        let expected_position = index.head() + append.len() as u64 + 1;
        if position.global_position != expected_position {
            return Err(Error::corrupt(
                path,
                at,
                format!(
                    "global position {} where {expected_position} was expected",
                    position.global_position
                ),
            ));
        }
        match append.first() {
            None => append_base_version = index.stream_version(stream).unwrap_or(0),
            Some(first) if &*first.stream != stream => {
                return Err(Error::corrupt(
                    path,
                    at,
                    format!(
                        "append to `{}` continues with stream `{stream}`",
                        first.stream
                    ),
                ));
            }
            Some(_) => {}
        }
        let expected_version = append_base_version + append.len() as u64 + 1;
        if position.stream_version != expected_version {
            return Err(Error::corrupt(
                path,
                at,
                format!(
                    "stream `{stream}` at version {} where {expected_version} was expected",
                    position.stream_version
                ),
            ));
        }
        let name = append
            .first()
            .map(|e| e.stream.clone())
            .or_else(|| index.stream_name(stream))
            .unwrap_or_else(|| Arc::from(stream));
        append.push(NewEntry::new(name, &event, segment, at, len));
        offset += len;
        if flags & FLAG_END_OF_APPEND != 0 {
            for entry in append.drain(..) {
                index.push(entry);
            }
            append_start = offset;
            *kept = absolute(append_start);
        }
    };
    *kept = absolute(append_start);
    Ok(match torn {
        None => Tail::Clean,
        Some(why) => Tail::Torn {
            why,
            bytes: (data.len() - append_start) as u64,
        },
    })
}
