//! The read handles of segments: opened when a read first needs them, and kept in a cache of
//! at most [`FileStoreOptions::max_open_segments`](super::FileStoreOptions::max_open_segments)
//! handles, least recently used first out.
//!
//! A store of thousands of segments would otherwise hold one descriptor per segment and
//! fail to open past the process's descriptor limit (`EMFILE` at `ulimit -n 1024`). A reader
//! takes a shared handle (`Arc<File>`) out of the cache and reads with positioned reads, so
//! readers on the same segment share one descriptor, and a handle evicted while a read uses
//! it is closed when that read lets go of it. The writer's own handle of the segment being
//! written is separate and always open.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};

/// The bounded cache of segment read handles, shared by every reader of a store.
#[derive(Debug)]
pub(crate) struct SegmentFiles {
    capacity: usize,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    /// Open handles by segment (index into the index's segment list), with their last use.
    open: HashMap<u32, (Arc<File>, u64)>,
    /// The same handles by last use, oldest first.
    by_use: BTreeMap<u64, u32>,
    /// The use counter.
    tick: u64,
}

impl Cache {
    fn touch(&mut self, segment: u32) -> Option<Arc<File>> {
        self.tick += 1;
        let tick = self.tick;
        let (file, used) = self.open.get_mut(&segment)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, segment);
        Some(Arc::clone(file))
    }
}

impl SegmentFiles {
    /// A cache of at most `capacity` handles (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            cache: Mutex::new(Cache::default()),
        }
    }

    // A poisoned lock is recovered: every change below leaves the two maps consistent
    // before anything that could panic.
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A read handle of `segment` (whose file is `path`), opened if it is not cached.
    pub(crate) fn get(&self, segment: u32, path: &Path) -> Result<Arc<File>> {
        if let Some(file) = self.cache().touch(segment) {
            return Ok(file);
        }
        // Opened without the lock, so that readers of cached segments do not wait for it.
        let file = Arc::new(File::open(path).map_err(|e| Error::io("open", path, e))?);
        let mut cache = self.cache();
        if let Some(raced) = cache.touch(segment) {
            // Another reader opened it meanwhile: share theirs, close ours.
            return Ok(raced);
        }
        while cache.open.len() >= self.capacity {
            let Some((_, oldest)) = cache.by_use.pop_first() else {
                break;
            };
            cache.open.remove(&oldest);
        }
        cache.tick += 1;
        let tick = cache.tick;
        cache.open.insert(segment, (Arc::clone(&file), tick));
        cache.by_use.insert(tick, segment);
        Ok(file)
    }

    /// How many handles the cache holds now.
    #[cfg(test)]
    pub(crate) fn open_count(&self) -> usize {
        self.cache().open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_handle_is_closed_first() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = (0..4)
            .map(|i| {
                let path = dir.path().join(format!("s{i}"));
                std::fs::write(&path, [i]).unwrap();
                path
            })
            .collect();
        let files = SegmentFiles::new(2);
        let zero = files.get(0, &paths[0]).unwrap();
        files.get(1, &paths[1]).unwrap();
        // 0 is used again, so 1 is the one to go when 2 comes in.
        assert!(Arc::ptr_eq(&zero, &files.get(0, &paths[0]).unwrap()));
        files.get(2, &paths[2]).unwrap();
        assert_eq!(files.open_count(), 2);
        let cache = files.cache();
        assert!(cache.open.contains_key(&0) && cache.open.contains_key(&2));
        assert_eq!(cache.by_use.len(), 2);
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = SegmentFiles::new(2);
        let error = files.get(0, &dir.path().join("gone")).unwrap_err();
        assert!(error.to_string().contains("gone"), "{error}");
        assert_eq!(files.open_count(), 0);
    }
}
