//! Opening a store directory: scan every segment, check every frame, rebuild the index, and
//! cut a torn tail off the last segment.
//!
//! What counts as a torn tail (dropped, with a warning): in the **last** segment only, bytes
//! after the last complete append that are a prefix of a frame (the header or the body runs
//! past the end of the file), only zeros, or whole frames of an append whose final frame is
//! missing. A crash mid-write leaves exactly these. Anything else — a checksum mismatch on a
//! frame that is all there, an impossible length, an undecodable envelope, positions or
//! versions out of sequence, a torn frame in a sealed segment — is [`Error::Corrupt`] naming
//! the file and offset, and the store does not open.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

pub(crate) fn open_reader(path: &Path) -> Result<SegmentRef> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    Ok(SegmentRef {
        path: path.to_owned(),
        file: Arc::new(file),
    })
}

fn open_writer(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// Scans `dir` (creating the first segment of a new store).
pub(crate) fn recover(dir: &Path) -> Result<Recovered> {
    let seqs = list_segments(dir)?;
    let mut index = Index::default();
    let mut report = RecoveryReport::default();
    let Some(&last_seq) = seqs.last() else {
        let file = create_segment(dir, 1)?;
        index.push_segment(open_reader(&segment_path(dir, 1))?);
        report.segments = 1;
        return Ok(Recovered {
            index,
            last_seq: 1,
            last_file: file,
            last_len: SEGMENT_HEADER_LEN as u64,
            report,
        });
    };
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
    let mut last_len = 0;
    for &seq in &seqs {
        let path = segment_path(dir, seq);
        let is_last = seq == last_seq;
        let segment = u32::try_from(index.segments.len()).unwrap_or(u32::MAX);
        let end = scan_segment(&path, segment, is_last, &mut index, &mut report)?;
        index.push_segment(open_reader(&path)?);
        last_len = end;
    }
    report.segments = seqs.len();
    report.events = index.head();
    let path = segment_path(dir, last_seq);
    let mut last_file = open_writer(&path)?;
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

/// Scans one segment into the index; returns the length it keeps.
fn scan_segment(
    path: &Path,
    segment: u32,
    is_last: bool,
    index: &mut Index,
    report: &mut RecoveryReport,
) -> Result<u64> {
    let data = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let header = segment_header();
    if data.get(..SEGMENT_HEADER_LEN) != Some(&header[..]) {
        let torn_header = data.len() <= SEGMENT_HEADER_LEN
            && data
                .iter()
                .zip(header.iter())
                .all(|(&got, &want)| got == want || got == 0);
        if is_last && torn_header {
            // Created but never finished: start it again.
            let mut file = open_writer(path)?;
            file.set_len(0)
                .and_then(|()| file.write_all(&header))
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("repair", path, e))?;
            return Ok(SEGMENT_HEADER_LEN as u64);
        }
        return Err(Error::corrupt(
            path,
            0,
            "not an orchestrator segment header",
        ));
    }

    let mut offset = SEGMENT_HEADER_LEN;
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
            Parsed::Bad(why) => return Err(Error::corrupt(path, offset as u64, why)),
        };
        let at = offset as u64;
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
        }
    };
    let Some(why) = torn else {
        return Ok(data.len() as u64);
    };
    if !is_last {
        return Err(Error::corrupt(
            path,
            append_start as u64,
            format!("{why}, in a sealed segment (only the last segment may have a torn tail)"),
        ));
    }
    let cut = (data.len() - append_start) as u64;
    tracing::warn!(
        file = %path.display(),
        offset = append_start,
        bytes = cut,
        "cutting off a torn tail: {why}"
    );
    let file = open_writer(path)?;
    file.set_len(append_start as u64)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("truncate", path, e))?;
    report.truncated_at = Some((path.to_owned(), append_start as u64));
    report.truncated_bytes = cut;
    Ok(append_start as u64)
}
