use std::collections::HashMap;

use super::*;

/// A deterministic pseudo-random sequence (xorshift), so the tests are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The representation the stores had: every position in a `Vec` per stream, with the same
/// accounting as [`StreamIndex::heap_size`].
#[derive(Default)]
struct Plain {
    streams: HashMap<String, Vec<u64>>,
}

impl Plain {
    fn push(&mut self, stream: &str, position: u64) {
        self.streams
            .entry(stream.to_owned())
            .or_default()
            .push(position);
    }

    fn heap_size(&self) -> usize {
        let entry = std::mem::size_of::<(String, Vec<u64>)>() + 1;
        buckets(self.streams.capacity()) * entry
            + self
                .streams
                .iter()
                .map(|(k, v)| k.capacity() + v.capacity() * 8)
                .sum::<usize>()
    }
}

/// Fills both representations with the same million events.
fn fill(events: u64, mut stream_of: impl FnMut(u64) -> String) -> (StreamIndex, Plain) {
    let mut index = StreamIndex::default();
    let mut plain = Plain::default();
    for position in 1..=events {
        let stream = stream_of(position);
        index.push(&stream, position).unwrap();
        plain.push(&stream, position);
    }
    (index, plain)
}

fn check_against(index: &StreamIndex, plain: &Plain, rng: &mut Rng) {
    for (stream, positions) in &plain.streams {
        let len = positions.len() as u64;
        assert_eq!(index.version(stream), Some(len), "{stream}");
        for (i, &p) in positions.iter().enumerate() {
            assert_eq!(
                index.version_of(stream, p),
                Some(i as u64 + 1),
                "{stream} @{p}"
            );
            if i == 0 || positions[i - 1] + 1 < p {
                assert_eq!(index.version_of(stream, p - 1), None, "{stream} @{}", p - 1);
            }
        }
        let last = *positions.last().unwrap();
        assert_eq!(index.version_of(stream, last + 1), None);
        assert_eq!(index.positions(stream, 0, usize::MAX), *positions);
        for _ in 0..20 {
            let from = rng.below(len + 2);
            let limit = usize::try_from(rng.below(80)).unwrap();
            let skip = usize::try_from(from.max(1) - 1).unwrap();
            let expected: Vec<u64> = positions.iter().skip(skip).take(limit).copied().collect();
            assert_eq!(
                index.positions(stream, from, limit),
                expected,
                "{stream} from {from}"
            );
        }
    }
    assert_eq!(index.version("nope"), None);
    assert_eq!(index.version_of("nope", 1), None);
    assert!(index.positions("nope", 1, 10).is_empty());
}

#[test]
fn the_index_agrees_with_a_plain_list() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut index = StreamIndex::default();
    let mut plain = Plain::default();
    let mut position = 0u64;
    for _ in 0..20_000 {
        // Mostly small gaps, some runs, some huge gaps (offsets far apart).
        position += match rng.below(10) {
            0 => 1 + rng.below(1 << 40),
            1..=3 => 1,
            _ => 1 + rng.below(300),
        };
        let stream = format!("s{}", rng.below(7));
        let run = if rng.below(5) == 0 { rng.below(100) } else { 0 };
        for p in position..=position + run {
            assert_eq!(
                index.push(&stream, p),
                Ok(plain.streams.get(&stream).map_or(0, Vec::len) as u64 + 1)
            );
            plain.push(&stream, p);
        }
        position += run;
    }
    check_against(&index, &plain, &mut rng);
}

#[test]
fn positions_must_ascend_within_a_stream() {
    let mut index = StreamIndex::default();
    assert_eq!(index.push("a", 0), Err(NotAscending { last: 0 }));
    assert_eq!(
        index.streams(),
        0,
        "a refused first position adds no stream"
    );
    assert_eq!(index.push("a", 5), Ok(1));
    assert_eq!(index.push("a", 5), Err(NotAscending { last: 5 }));
    assert_eq!(index.push("a", 3), Err(NotAscending { last: 5 }));
    assert_eq!(index.push("b", 3), Ok(1), "streams are independent");
    assert_eq!(index.push("a", u64::MAX), Ok(2));
    assert_eq!(index.version_of("a", u64::MAX), Some(2));
    assert_eq!(index.positions("a", 1, 5), vec![5, u64::MAX]);
}

fn report(what: &str, index: &StreamIndex, plain: &Plain, events: u64) -> (f64, f64) {
    let (after, before) = (index.heap_size(), plain.heap_size());
    let per = |bytes: usize| bytes as f64 / events as f64;
    eprintln!(
        "{what}: {} streams; Vec<u64> per stream {before} bytes ({:.2}/event), \
         compact {after} bytes ({:.2}/event)",
        index.streams(),
        per(before),
        per(after)
    );
    (per(before), per(after))
}

const MILLION: u64 = 1_000_000;

#[test]
fn a_million_events_of_one_stream_take_a_few_bytes() {
    let (index, plain) = fill(MILLION, |_| "orders".to_owned());
    let (before, _) = report("1 stream", &index, &plain, MILLION);
    assert!(before >= 8.0);
    assert!(index.heap_size() < 1024, "{}", index.heap_size());
    assert_eq!(index.version_of("orders", 765_432), Some(765_432));
    assert_eq!(
        index.positions("orders", 999_999, 5),
        vec![999_999, 1_000_000]
    );
}

#[test]
fn a_million_interleaved_events_take_at_most_three_bytes_each() {
    // A thousand streams written round-robin: every gap is 1,000 (a two-byte token).
    let (index, plain) = fill(MILLION, |p| format!("order-{:04}", p % 1000));
    let (before, after) = report("1,000 streams, round-robin", &index, &plain, MILLION);
    assert!(after <= 3.0 && before >= 8.0, "{after} {before}");
    // A hundred streams in random order, some written in bursts.
    let mut rng = Rng(7);
    let mut current = 0;
    let (index, plain) = fill(MILLION, |_| {
        if rng.below(4) != 0 {
            current = rng.below(100);
        }
        format!("cart-{current:03}")
    });
    let (before, after) = report("100 streams, random", &index, &plain, MILLION);
    assert!(after <= 3.0 && before >= 8.0, "{after} {before}");
    check_against(&index, &plain, &mut rng);
}

#[test]
fn a_million_one_event_streams_cost_their_ids_and_an_entry() {
    let (index, plain) = fill(MILLION, |p| format!("saga-{p:08}"));
    let (before, after) = report("1,000,000 streams of one event", &index, &plain, MILLION);
    assert!(after < before, "{after} {before}");
    // The id (13 bytes) plus the map entry, with at most 16 buckets for 7 entries.
    let entry = std::mem::size_of::<(Box<str>, Positions)>() + 1;
    assert_eq!(entry, 57, "the size the module docs give");
    assert!(after <= 13.0 + 131.0, "{after}");
}
