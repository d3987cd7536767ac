//! The in-memory index of the embedded store, rebuilt from the segments on open.
//!
//! It keeps, per event, where its frame sits plus what filters look at (stream, type, time),
//! so filtered reads touch the disk only for matching events; and per stream, the global
//! positions of its events and the version of each event id, so that an append sent again
//! is recognised after a restart too
//! ([idempotent appends](orchestrator_core::store#idempotent-appends)). About 40 bytes per
//! event for the locations and 40 to 70 for the id map (a UUID id is kept as its 16 bytes,
//! any other as its text), plus each distinct stream id and type once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use orchestrator_core::{EventEnvelope, EventFilter, EventId, StoredPosition};

/// A segment as readers see it: its file, opened when a read needs it (see `handles.rs`).
#[derive(Debug, Clone)]
pub(crate) struct SegmentRef {
    /// The file's path.
    pub(crate) path: PathBuf,
}

/// Where one event's frame is, and what filters need to know about it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Loc {
    /// Index into [`Index::segments`].
    pub(crate) segment: u32,
    /// Byte offset of the frame in its segment.
    pub(crate) offset: u64,
    /// Frame length, header included.
    pub(crate) len: u32,
    /// Interned stream id.
    stream: u32,
    /// Interned event type.
    event_type: u32,
    /// The event's time, as seconds and nanoseconds since the epoch.
    time: (i64, u32),
}

/// An event id as the index keeps it: a UUID in its canonical text form (what
/// [`EventId::new`] makes) as its 16 bytes, any other id as its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum IdKey {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl IdKey {
    pub(crate) fn of(id: &EventId) -> Self {
        if let Some(uuid) = id.as_uuid() {
            // Only the canonical form: `{…}`, `urn:uuid:…` or upper-case spellings of the same
            // UUID are other ids.
            let mut text = [0_u8; 36];
            if uuid.hyphenated().encode_lower(&mut text) == id.as_str() {
                return Self::Uuid(*uuid.as_bytes());
            }
        }
        Self::Text(id.as_str().into())
    }
}

/// An event about to enter the index.
#[derive(Debug, Clone)]
pub(crate) struct NewEntry {
    pub(crate) stream: Arc<str>,
    pub(crate) id: IdKey,
    pub(crate) event_type: String,
    pub(crate) time: DateTime<Utc>,
    pub(crate) segment: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl NewEntry {
    /// The entry for `event` (stored, so it has a stream id) in a frame at `offset`.
    pub(crate) fn new(
        stream: Arc<str>,
        event: &EventEnvelope,
        segment: u32,
        offset: u64,
        len: usize,
    ) -> Self {
        Self {
            stream,
            id: IdKey::of(event.id()),
            event_type: event.event_type().to_owned(),
            time: event.time(),
            segment,
            offset,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug)]
struct StreamEntry {
    id: u32,
    /// Global positions of the stream's events: version `v` is at `positions[v - 1]`.
    positions: Vec<u64>,
    /// The version of each event id. Segments written before ids were indexed may hold an
    /// id twice in a stream: the first one counts.
    ids: HashMap<IdKey, u64>,
}

/// The index: every event's location in global order, and each stream's positions.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// The event at global position `p` is `log[p - 1]`.
    log: Vec<Loc>,
    streams: HashMap<Arc<str>, StreamEntry>,
    stream_names: Vec<Arc<str>>,
    types: HashMap<String, u32>,
    /// Every segment, oldest first; shared with readers, replaced (not mutated in place
    /// while shared) when a segment is added.
    pub(crate) segments: Arc<Vec<SegmentRef>>,
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn index_of(position: u64) -> usize {
    usize::try_from(position.saturating_sub(1)).unwrap_or(usize::MAX)
}

fn time_key(time: DateTime<Utc>) -> (i64, u32) {
    (time.timestamp(), time.timestamp_subsec_nanos())
}

fn intern_id(n: usize) -> u32 {
    // More than 4 billion distinct streams or types would not fit in memory anyway.
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Index {
    /// The global position of the last event, 0 when empty.
    pub(crate) fn head(&self) -> u64 {
        as_u64(self.log.len())
    }

    /// The stream's version, `None` if it has no events.
    pub(crate) fn stream_version(&self, stream: &str) -> Option<u64> {
        self.streams.get(stream).map(|s| as_u64(s.positions.len()))
    }

    /// Where `stream` holds the event with id `id`.
    pub(crate) fn stored(&self, stream: &str, id: &EventId) -> Option<StoredPosition> {
        let entry = self.streams.get(stream)?;
        let stream_version = *entry.ids.get(&IdKey::of(id))?;
        let global_position = *entry.positions.get(index_of(stream_version))?;
        Some(StoredPosition {
            stream_version,
            global_position,
        })
    }

    /// How many distinct streams there are.
    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The shared stream id for `stream`, if the stream exists (to avoid one allocation per
    /// event).
    pub(crate) fn stream_name(&self, stream: &str) -> Option<Arc<str>> {
        self.streams.get_key_value(stream).map(|(k, _)| k.clone())
    }

    /// Adds a segment.
    pub(crate) fn push_segment(&mut self, segment: SegmentRef) {
        Arc::make_mut(&mut self.segments).push(segment);
    }

    /// Adds the next event; its position is the head plus one.
    pub(crate) fn push(&mut self, entry: NewEntry) {
        let position = self.head() + 1;
        let next_stream = intern_id(self.stream_names.len());
        let stream = match self.streams.get_mut(&*entry.stream) {
            Some(s) => {
                s.positions.push(position);
                s.ids.entry(entry.id).or_insert(as_u64(s.positions.len()));
                s.id
            }
            None => {
                self.stream_names.push(entry.stream.clone());
                self.streams.insert(
                    entry.stream,
                    StreamEntry {
                        id: next_stream,
                        positions: vec![position],
                        ids: HashMap::from([(entry.id, 1)]),
                    },
                );
                next_stream
            }
        };
        let next_type = intern_id(self.types.len());
        let event_type = *self.types.entry(entry.event_type).or_insert(next_type);
        self.log.push(Loc {
            segment: entry.segment,
            offset: entry.offset,
            len: entry.len,
            stream,
            event_type,
            time: time_key(entry.time),
        });
    }

    /// The locations of up to `limit` events of `stream` from `from_version` on.
    pub(crate) fn stream_locs(&self, stream: &str, from_version: u64, limit: usize) -> Vec<Loc> {
        let Some(entry) = self.streams.get(stream) else {
            return Vec::new();
        };
        let start = index_of(from_version.max(1)).min(entry.positions.len());
        entry.positions[start..]
            .iter()
            .take(limit)
            .filter_map(|&p| self.log.get(index_of(p)).copied())
            .collect()
    }

    /// Looks at positions `from..=until` (no further than the head), passing the locations
    /// of events matching `filter` to `take` until `limit` are taken. Returns the position
    /// of the first event not looked at.
    pub(crate) fn scan(
        &self,
        from: u64,
        until: u64,
        filter: &IndexFilter,
        limit: usize,
        mut take: impl FnMut(Loc),
    ) -> u64 {
        let start = index_of(from.max(1)).min(self.log.len());
        let end = usize::try_from(until).map_or(self.log.len(), |u| u.min(self.log.len()));
        let mut taken = 0;
        let mut next = start;
        for loc in self.log.get(start..end).unwrap_or_default() {
            if taken == limit {
                break;
            }
            next += 1;
            if filter.matches(self, loc) {
                take(*loc);
                taken += 1;
            }
        }
        as_u64(next) + 1
    }

    /// Compiles `filter` against the interned names.
    pub(crate) fn compile(&self, filter: &EventFilter) -> IndexFilter {
        IndexFilter {
            types: (!filter.event_types.is_empty()).then(|| {
                filter
                    .event_types
                    .iter()
                    .filter_map(|t| self.types.get(t).copied())
                    .collect()
            }),
            from_time: filter.from_time.map(time_key),
            to_time: filter.to_time.map(time_key),
            stream_prefix: filter.stream_prefix.clone(),
        }
    }
}

/// An [`EventFilter`] over interned names. Compile it again after the index grew: a type
/// unknown when it was compiled matches nothing.
#[derive(Debug, Clone)]
pub(crate) struct IndexFilter {
    types: Option<Vec<u32>>,
    from_time: Option<(i64, u32)>,
    to_time: Option<(i64, u32)>,
    stream_prefix: Option<String>,
}

impl IndexFilter {
    fn matches(&self, index: &Index, loc: &Loc) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.contains(&loc.event_type))
            && self.from_time.is_none_or(|t| loc.time >= t)
            && self.to_time.is_none_or(|t| loc.time < t)
            && self.stream_prefix.as_deref().is_none_or(|p| {
                index
                    .stream_names
                    .get(loc.stream as usize)
                    .is_some_and(|s| s.starts_with(p))
            })
    }
}
