//! A compact in-memory index of which global positions belong to which stream, for the event
//! stores whose broker keeps one log of every stream (Kafka, RabbitMQ): an event's stream
//! version is its rank among its stream's positions.
//!
//! Each stream's positions are ascending, so they are stored as gaps: a run of consecutive
//! positions is one token (first gap, run length), and a token is a varint — one byte for a
//! gap below 64 with no run, two below 8,192. Every [`CHECKPOINT_EVERY`] tokens a checkpoint
//! (position before, rank before, byte offset) lets a lookup start near its target, so
//! finding a version or a page of positions decodes at most that many tokens, plus the
//! values asked for.
//!
//! What that costs ([`StreamIndex::heap_size`], measured by this module's tests for a million
//! events; a plain `Vec<u64>` per stream took 8 bytes per event plus its growth slack, up to
//! 16):
//!
//! - a stream written in one go (consecutive positions): a few bytes in all, whatever its
//!   length;
//! - streams whose events interleave with other streams' (gaps below 8,192): at most 3
//!   bytes per event (2 for the token, 0.4 for checkpoints, and `Vec` growth slack);
//! - every stream, however short: its id plus one 57-byte map entry, which the hash table's
//!   slack (at most 16 buckets for 7 entries) brings to at most 131 bytes.

use std::collections::HashMap;

/// Tokens between two checkpoints: a lookup decodes at most this many.
pub(crate) const CHECKPOINT_EVERY: u64 = 64;

/// Every stream's positions.
#[derive(Debug, Default)]
pub(crate) struct StreamIndex {
    streams: HashMap<Box<str>, Positions>,
}

/// Why a position was not indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotAscending {
    /// The stream's last position (0 when it has none).
    pub(crate) last: u64,
}

impl StreamIndex {
    /// Records that the event at `position` belongs to `stream`; returns its version (the
    /// stream's length now). Positions start at 1 and must ascend within a stream: a position
    /// not above the stream's last one is refused (the index is unchanged).
    pub(crate) fn push(&mut self, stream: &str, position: u64) -> Result<u64, NotAscending> {
        if let Some(positions) = self.streams.get_mut(stream) {
            return positions.push(position);
        }
        let mut positions = Positions::default();
        let version = positions.push(position)?;
        self.streams.insert(Box::from(stream), positions);
        Ok(version)
    }

    /// The stream's version (how many events it has), `None` if it has none.
    pub(crate) fn version(&self, stream: &str) -> Option<u64> {
        self.streams.get(stream).map(|p| p.len)
    }

    /// The version of `stream`'s event at `position`, if `position` is one of the stream's.
    pub(crate) fn version_of(&self, stream: &str, position: u64) -> Option<u64> {
        self.streams.get(stream)?.rank_of(position)
    }

    /// The positions of `stream`'s events from version `from` (1-based; 0 reads as 1), at
    /// most `limit`, in order.
    pub(crate) fn positions(&self, stream: &str, from: u64, limit: usize) -> Vec<u64> {
        self.streams
            .get(stream)
            .map(|p| p.page(from.max(1) - 1, limit))
            .unwrap_or_default()
    }

    /// How many streams are indexed.
    #[cfg(test)]
    pub(crate) fn streams(&self) -> usize {
        self.streams.len()
    }

    /// The bytes this index holds on the heap, counted from capacities: the map's table
    /// (entries plus one control byte per bucket), the stream ids and each stream's encoded
    /// positions. The allocator's own overhead is not counted.
    pub(crate) fn heap_size(&self) -> usize {
        let entry = std::mem::size_of::<(Box<str>, Positions)>() + 1;
        let table = buckets(self.streams.capacity()) * entry;
        table
            + self
                .streams
                .iter()
                .map(|(id, p)| id.len() + p.heap_size())
                .sum::<usize>()
    }
}

/// How many buckets a hashbrown table with room for `capacity` entries has (7/8 load,
/// power-of-two buckets; small tables are full).
fn buckets(capacity: usize) -> usize {
    if capacity == 0 {
        0
    } else if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity.saturating_mul(8) / 7).next_power_of_two()
    }
}

/// One stream's ascending positions: encoded tokens, then the open token (the one still
/// growing) unencoded.
#[derive(Debug, Default)]
struct Positions {
    /// How many positions.
    len: u64,
    /// The position before the open token (0: none).
    before_open: u64,
    /// The open token's first position (0 while `len` is 0).
    open_first: u64,
    /// How many consecutive positions follow `open_first` in the open token.
    open_run: u64,
    /// The tokens before the open one; `None` until the first is closed, so a stream of one
    /// run costs no allocation.
    closed: Option<Box<Closed>>,
}

/// The closed tokens of a stream.
#[derive(Debug, Default)]
struct Closed {
    bytes: Vec<u8>,
    checkpoints: Vec<Checkpoint>,
    tokens: u64,
}

/// Where decoding can start: before token `CHECKPOINT_EVERY * i`.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    /// The position before the token (0: none).
    before: u64,
    /// How many positions come before the token.
    rank: u64,
    /// The token's byte offset.
    at: usize,
}

/// A run of consecutive positions: `first`, `first + 1`, … (`count` of them), the first
/// being the stream's `rank + 1`-th.
#[derive(Debug, Clone, Copy)]
struct Span {
    first: u64,
    count: u64,
    rank: u64,
}

impl Positions {
    fn last(&self) -> u64 {
        self.open_first + self.open_run
    }

    fn push(&mut self, position: u64) -> Result<u64, NotAscending> {
        let last = if self.len == 0 { 0 } else { self.last() };
        if position <= last {
            return Err(NotAscending { last });
        }
        if self.len > 0 && position == last + 1 {
            self.open_run += 1;
        } else {
            if self.len > 0 {
                self.close_open();
            }
            self.before_open = last;
            self.open_first = position;
            self.open_run = 0;
        }
        self.len += 1;
        Ok(self.len)
    }

    /// Encodes the open token.
    fn close_open(&mut self) {
        let rank = self.len - self.open_run - 1;
        let closed = self.closed.get_or_insert_with(Box::default);
        if closed.tokens.is_multiple_of(CHECKPOINT_EVERY) {
            closed.checkpoints.push(Checkpoint {
                before: self.before_open,
                rank,
                at: closed.bytes.len(),
            });
        }
        let gap = self.open_first - self.before_open;
        let head = (u128::from(gap - 1) << 1) | u128::from(self.open_run > 0);
        write_varint(&mut closed.bytes, head);
        if self.open_run > 0 {
            write_varint(&mut closed.bytes, u128::from(self.open_run));
        }
        closed.tokens += 1;
    }

    /// The spans from the checkpoint `start` picks (all when `None`), then the open one.
    fn spans(&self, start: Option<Checkpoint>) -> impl Iterator<Item = Span> + '_ {
        let (bytes, from) = match &self.closed {
            Some(closed) => (closed.bytes.as_slice(), start.map_or(0, |c| c.at)),
            None => (&[][..], 0),
        };
        let mut at = from;
        let mut before = start.map_or(0, |c| c.before);
        let mut rank = start.map_or(0, |c| c.rank);
        let open = (self.len > 0).then(|| Span {
            first: self.open_first,
            count: self.open_run + 1,
            rank: self.len - self.open_run - 1,
        });
        std::iter::from_fn(move || {
            let head = read_varint(bytes, &mut at)?;
            let run = if head & 1 == 1 {
                read_varint(bytes, &mut at)?
            } else {
                0
            };
            let gap = u64::try_from(head >> 1).ok()?.checked_add(1)?;
            let run = u64::try_from(run).ok()?;
            let span = Span {
                first: before.checked_add(gap)?,
                count: run.checked_add(1)?,
                rank,
            };
            before = span.first.checked_add(run)?;
            rank = rank.checked_add(span.count)?;
            Some(span)
        })
        .chain(open)
    }

    fn checkpoints(&self) -> &[Checkpoint] {
        self.closed.as_ref().map_or(&[], |c| &c.checkpoints)
    }

    /// The 1-based rank of `position`, if it is one of these.
    fn rank_of(&self, position: u64) -> Option<u64> {
        if self.len == 0 || position > self.last() {
            return None;
        }
        let checkpoints = self.checkpoints();
        let i = checkpoints.partition_point(|c| c.before < position);
        let start = i.checked_sub(1).map(|i| checkpoints[i]);
        self.spans(start)
            .find(|s| position < s.first || position - s.first < s.count)
            .filter(|s| position >= s.first)
            .map(|s| s.rank + (position - s.first) + 1)
    }

    /// At most `limit` positions, skipping the first `skip`.
    fn page(&self, skip: u64, limit: usize) -> Vec<u64> {
        if skip >= self.len || limit == 0 {
            return Vec::new();
        }
        let checkpoints = self.checkpoints();
        let i = checkpoints.partition_point(|c| c.rank <= skip);
        let start = i.checked_sub(1).map(|i| checkpoints[i]);
        let wanted = usize::try_from(self.len - skip).map_or(limit, |n| n.min(limit));
        let mut out = Vec::with_capacity(wanted);
        for span in self.spans(start) {
            let end = span.rank + span.count;
            if end <= skip {
                continue;
            }
            let from = skip.saturating_sub(span.rank);
            for offset in from..span.count {
                if out.len() == wanted {
                    return out;
                }
                out.push(span.first + offset);
            }
        }
        out
    }

    fn heap_size(&self) -> usize {
        self.closed.as_ref().map_or(0, |c| {
            std::mem::size_of::<Closed>()
                + c.bytes.capacity()
                + c.checkpoints.capacity() * std::mem::size_of::<Checkpoint>()
        })
    }
}

fn write_varint(out: &mut Vec<u8>, mut value: u128) {
    while value >= 0x80 {
        // The low seven bits, with the continuation bit: the cast keeps exactly them.
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u128> {
    let mut value = 0u128;
    let mut shift = 0;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u128::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift >= 128 {
            return None;
        }
    }
}

#[cfg(test)]
mod tests;
