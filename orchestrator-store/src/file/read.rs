//! Reading events back: frames next to each other on disk are read with one positioned read,
//! then each is checked (both checksums) and decoded.

use std::cell::RefCell;
use std::path::Path;

use orchestrator_core::EventEnvelope;

use crate::error::{Error, Result};

use super::format::{Parsed, decode_envelope, parse_frame};
use super::handles::SegmentFiles;
use super::index::{Loc, SegmentRef};
use super::segment::read_exact_at;

/// The most bytes one positioned read fetches (a larger frame is read alone).
const READ_CHUNK: u64 = 1024 * 1024;

/// Reads and decodes the events at `locs`, in order, appending them to `out`.
pub(crate) fn read_locs(
    files: &SegmentFiles,
    segments: &[SegmentRef],
    locs: &[Loc],
    out: &mut Vec<EventEnvelope>,
) -> Result<()> {
    // One read buffer per thread, kept between reads: a page of events is read without
    // allocating, or zeroing, its bytes again.
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        let read = read_into(buf, files, segments, locs, out);
        if buf.capacity() > KEEP_BUFFER {
            // After a frame larger than a read chunk: give its memory back.
            *buf = Vec::new();
        }
        read
    })
}

/// Checks and decodes the frames at `locs`, which sit back to back at the start of `buf`,
/// appending the events to `out`.
fn decode_frames(
    buf: &[u8],
    locs: &[Loc],
    path: &Path,
    out: &mut Vec<EventEnvelope>,
) -> Result<()> {
    let mut at = 0;
    for loc in locs {
        let frame_len = loc.len as usize;
        let offset = loc.offset;
        let envelope = match parse_frame(&buf[at..at + frame_len]) {
            Parsed::Frame { envelope, len, .. } if len == frame_len => envelope,
            Parsed::Frame { .. } => {
                return Err(Error::corrupt(path, offset, "frame length changed"));
            }
            Parsed::Torn(why) => return Err(Error::corrupt(path, offset, why)),
            Parsed::Bad(why) => return Err(Error::corrupt(path, offset, why)),
        };
        let event = decode_envelope(envelope)
            .map_err(|e| Error::corrupt(path, offset, format!("undecodable event: {e}")))?;
        out.push(event);
        at += frame_len;
    }
    Ok(())
}

/// The largest read buffer a thread keeps between reads.
const KEEP_BUFFER: usize = 2 * READ_CHUNK as usize;

fn read_into(
    buf: &mut Vec<u8>,
    files: &SegmentFiles,
    segments: &[SegmentRef],
    locs: &[Loc],
    out: &mut Vec<EventEnvelope>,
) -> Result<()> {
    out.reserve(locs.len());
    let mut i = 0;
    while i < locs.len() {
        // The run of frames that sit back to back in one segment, up to READ_CHUNK bytes.
        let first = locs[i];
        let mut end = first.offset + u64::from(first.len);
        let mut j = i + 1;
        while let Some(next) = locs.get(j) {
            if next.segment != first.segment
                || next.offset != end
                || end + u64::from(next.len) - first.offset > READ_CHUNK
            {
                break;
            }
            end += u64::from(next.len);
            j += 1;
        }
        let segment = segments.get(first.segment as usize).ok_or_else(|| {
            Error::Core(orchestrator_core::Error::invalid(
                "segment",
                format!("index names segment {} which is not open", first.segment),
            ))
        })?;
        let len = usize::try_from(end - first.offset).unwrap_or(usize::MAX);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let buf = &mut buf[..len];
        let file = files.get(first.segment, &segment.path)?;
        read_exact_at(&file, buf, first.offset).map_err(|e| Error::io("read", &segment.path, e))?;
        decode_frames(&buf[..], &locs[i..j], &segment.path, out)?;
        i = j;
    }
    Ok(())
}
