//! The on-disk format: segment headers and checksummed, length-prefixed frames.
//!
//! A segment file starts with a 16-byte header (`ORCHSEG\0`, format version as `u32` LE,
//! four zero bytes). Then come frames, back to back, one per event:
//!
//! ```text
//! offset  size  field
//!      0     4  body length, u32 LE
//!      4     4  CRC-32 of the body, u32 LE
//!      8     4  CRC-32 of bytes 0..8 (the two fields above), u32 LE
//!     12     1  flags: bit 0 = last event of its append
//!     13     …  the stored envelope, encoded with the core `Bincode` codec (stream id,
//!               stream version and global position included)
//! ```
//!
//! The header checksum lets recovery trust a length it reads: a frame whose header checks
//! out but whose body runs past the end of the file is a torn write, while a header that
//! does not check out with more bytes after it is corruption. The end-of-append flag makes
//! multi-event appends all-or-nothing across a crash: recovery drops a trailing append whose
//! last frame is missing.

use orchestrator_core::EventEnvelope;
use orchestrator_core::codec::{Bincode, Codec};

/// The bytes every segment starts with.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"ORCHSEG\0";
/// The format version written after the magic.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// The size of the segment header.
pub(crate) const SEGMENT_HEADER_LEN: usize = 16;
/// The size of a frame header.
pub(crate) const FRAME_HEADER_LEN: usize = 12;
/// Flag: this frame is the last event of its append.
pub(crate) const FLAG_END_OF_APPEND: u8 = 1;
/// The largest body a frame may have (the codec's limit plus the flags byte).
pub(crate) const MAX_BODY_LEN: usize = Bincode::MAX_LEN + 1;

/// The segment header bytes.
pub(crate) fn segment_header() -> [u8; SEGMENT_HEADER_LEN] {
    let mut header = [0; SEGMENT_HEADER_LEN];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

/// Appends one frame holding `envelope` (already Bincode-encoded) to `buf`; returns the
/// frame's length.
pub(crate) fn push_frame(buf: &mut Vec<u8>, flags: u8, envelope: &[u8]) -> usize {
    let body_len = envelope.len() + 1;
    let mut body_crc = crc32fast::Hasher::new();
    body_crc.update(&[flags]);
    body_crc.update(envelope);
    let mut header = [0_u8; FRAME_HEADER_LEN];
    // The codec refuses values over `Bincode::MAX_LEN`, so the length fits in a u32.
    header[..4].copy_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    header[4..8].copy_from_slice(&body_crc.finalize().to_le_bytes());
    let header_crc = crc32fast::hash(&header[..8]);
    header[8..].copy_from_slice(&header_crc.to_le_bytes());
    buf.reserve(FRAME_HEADER_LEN + body_len);
    buf.extend_from_slice(&header);
    buf.push(flags);
    buf.extend_from_slice(envelope);
    FRAME_HEADER_LEN + body_len
}

/// What [`parse_frame`] found at an offset.
#[derive(Debug)]
pub(crate) enum Parsed<'a> {
    /// A whole, checked frame.
    Frame {
        /// The flags byte.
        flags: u8,
        /// The encoded envelope.
        envelope: &'a [u8],
        /// The frame's length, header included.
        len: usize,
    },
    /// The bytes end inside the frame, as a write cut short leaves them (or only zeros
    /// follow, as a file extended but never written leaves them).
    Torn(&'static str),
    /// The frame fails its checks.
    Bad(String),
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Reads the frame at the start of `bytes` (which run to the end of the file or of the read).
pub(crate) fn parse_frame(bytes: &[u8]) -> Parsed<'_> {
    if bytes.iter().all(|&b| b == 0) {
        return Parsed::Torn("only zero bytes follow");
    }
    if bytes.len() < FRAME_HEADER_LEN {
        return Parsed::Torn("the file ends inside a frame header");
    }
    if crc32fast::hash(&bytes[..8]) != u32_at(bytes, 8) {
        return Parsed::Bad("frame header checksum mismatch".to_owned());
    }
    let body_len = u32_at(bytes, 0) as usize;
    if body_len == 0 || body_len > MAX_BODY_LEN {
        return Parsed::Bad(format!("impossible frame length {body_len}"));
    }
    let Some(body) = bytes.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len) else {
        return Parsed::Torn("the file ends inside a frame body");
    };
    if crc32fast::hash(body) != u32_at(bytes, 4) {
        return Parsed::Bad("frame body checksum mismatch".to_owned());
    }
    Parsed::Frame {
        flags: body[0],
        envelope: &body[1..],
        len: FRAME_HEADER_LEN + body_len,
    }
}

/// Decodes a frame's envelope.
pub(crate) fn decode_envelope(envelope: &[u8]) -> orchestrator_core::Result<EventEnvelope> {
    Bincode.decode(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_every_cut_is_torn() {
        let mut buf = Vec::new();
        let len = push_frame(&mut buf, FLAG_END_OF_APPEND, b"hello");
        assert_eq!(len, buf.len());
        match parse_frame(&buf) {
            Parsed::Frame {
                flags,
                envelope,
                len: l,
            } => assert_eq!((flags, envelope, l), (1, &b"hello"[..], len)),
            other => panic!("{other:?}"),
        }
        for cut in 0..buf.len() {
            assert!(
                matches!(parse_frame(&buf[..cut]), Parsed::Torn(_)),
                "cut at {cut}"
            );
        }
    }

    /// A frame header whose checksum holds but whose length claims 4 GiB is refused as
    /// impossible, without reading (or allocating) a body: recovery reports it as corruption
    /// instead of waiting for, or truncating at, four gigabytes.
    #[test]
    fn a_length_over_the_limit_is_refused_unread() {
        for claimed in [u32::MAX, u32::try_from(MAX_BODY_LEN + 1).unwrap()] {
            let mut header = [0_u8; FRAME_HEADER_LEN + 1];
            header[..4].copy_from_slice(&claimed.to_le_bytes());
            let header_crc = crc32fast::hash(&header[..8]);
            header[8..12].copy_from_slice(&header_crc.to_le_bytes());
            header[12] = FLAG_END_OF_APPEND;
            match parse_frame(&header) {
                Parsed::Bad(why) => assert!(why.contains("impossible frame length"), "{why}"),
                other => panic!("a {claimed}-byte frame: {other:?}"),
            }
        }
    }

    #[test]
    fn flipped_bits_are_bad() {
        let mut buf = Vec::new();
        push_frame(&mut buf, 0, b"payload");
        for at in 0..buf.len() {
            let mut copy = buf.clone();
            copy[at] ^= 0x10;
            assert!(
                !matches!(parse_frame(&copy), Parsed::Frame { .. }),
                "flip at {at} went unnoticed"
            );
        }
    }
}
