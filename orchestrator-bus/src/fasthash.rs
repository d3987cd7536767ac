//! A small, fast hasher for the hot maps keyed by topic or event type.
//!
//! The route cache and the metric-handle maps are looked up once or twice per event, with
//! short keys; std's SipHash costs more than the rest of the lookup there. This is the
//! multiply-rotate hash used by rustc (FxHash). It is not resistant to chosen collisions,
//! which is acceptable for these maps: their keys are the application's own topics, and
//! each map is capped in size.

use std::hash::{BuildHasherDefault, Hasher};

/// Whether `a` and `b` are the same string: by address first (interned event types share
/// one allocation, see `orchestrator_core::intern_event_type`), by bytes otherwise.
pub(crate) fn same_str(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// A `HashMap` with [`FxHasher`].
pub(crate) type FxHashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// FxHash: for each word, `hash = (hash.rotate_left(5) ^ word) * SEED`.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // At most 7 bytes: the last one says how many, so that trailing zero bytes
            // still change the hash.
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            word[7] = rest.len() as u8;
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_hash_equal_and_maps_work() {
        let mut map: FxHashMap<String, u32> = FxHashMap::default();
        for i in 0..1000 {
            map.insert(format!("order.placed.{i}"), i);
        }
        for i in 0..1000 {
            assert_eq!(map.get(format!("order.placed.{i}").as_str()), Some(&i));
        }
        assert_eq!(map.get("order.placed"), None);
        // Keys that differ only past the first word, or only in length, still differ.
        let hash = |s: &str| {
            use std::hash::BuildHasher as _;
            BuildHasherDefault::<FxHasher>::default().hash_one(s)
        };
        assert_ne!(hash("order.placed.a"), hash("order.placed.b"));
        assert_ne!(hash("abc"), hash("abc\0"));
    }
}
