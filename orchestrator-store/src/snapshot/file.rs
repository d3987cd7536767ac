//! Snapshots in a directory: one checksummed file per stream, replaced atomically.
//!
//! A file is `ORCHSNP1`, a CRC-32 of the rest (u32 LE), then the snapshot encoded with the
//! core `Bincode` codec. Saving writes a temporary file, syncs it, renames it over the old
//! one and syncs the directory, so a crash leaves the old snapshot or the new one, never a
//! mix. File names are the stream id in hex (long ids are shortened with a checksum); the
//! stream id inside the file is checked on load, so two ids sharing a file name only cost
//! each other their snapshots, never return a wrong one. A file that fails its checks is
//! reported (and then ignored by [`load_aggregate`](super::load_aggregate), which folds
//! from the first event instead).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::codec::Bincode;
use orchestrator_core::{Error as CoreError, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::error::Error;
use crate::file::sync_dir;

use super::{Snapshot, SnapshotStore};

const MAGIC: &[u8; 8] = b"ORCHSNP1";
/// Stream ids longer than this many bytes get a shortened file name.
const MAX_NAME_BYTES: usize = 100;

#[derive(Serialize, Deserialize)]
struct Record {
    stream: String,
    version: u64,
    position: u64,
    state_version: u32,
    state: Vec<u8>,
    taken_secs: i64,
    taken_nanos: u32,
}

/// A [`SnapshotStore`] in a directory, beside the embedded event store (or any other).
#[derive(Debug)]
pub struct FileSnapshotStore {
    dir: PathBuf,
    /// Saves read the old snapshot before replacing it: one at a time.
    saving: Mutex<()>,
}

impl FileSnapshotStore {
    /// Opens (creating if missing) the snapshot directory `dir`.
    pub fn open(dir: impl AsRef<Path>) -> crate::Result<Self> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        Ok(Self {
            dir,
            saving: Mutex::new(()),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, stream: &str) -> PathBuf {
        let bytes = stream.as_bytes();
        let mut name = String::with_capacity(bytes.len().min(MAX_NAME_BYTES) * 2 + 24);
        for b in bytes.iter().take(MAX_NAME_BYTES) {
            let _ = write!(name, "{b:02x}");
        }
        if bytes.len() > MAX_NAME_BYTES {
            let _ = write!(name, "-{:08x}-{}", crc32fast::hash(bytes), bytes.len());
        }
        self.dir.join(format!("{name}.snapshot"))
    }

    fn read(&self, stream: &str) -> crate::Result<Option<Snapshot>> {
        let path = self.path_of(stream);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        if data.len() < 12 || &data[..8] != MAGIC {
            return Err(Error::corrupt(&path, 0, "not a snapshot file"));
        }
        let mut crc = [0; 4];
        crc.copy_from_slice(&data[8..12]);
        if crc32fast::hash(&data[12..]) != u32::from_le_bytes(crc) {
            return Err(Error::corrupt(&path, 12, "snapshot checksum mismatch"));
        }
        let record: Record = Bincode::decode_payload(&data[12..])
            .map_err(|e| Error::corrupt(&path, 12, format!("undecodable snapshot: {e}")))?;
        if record.stream != stream {
            // Another stream whose id shortens to the same file name.
            return Ok(None);
        }
        let taken_at = DateTime::<Utc>::from_timestamp(record.taken_secs, record.taken_nanos)
            .ok_or_else(|| Error::corrupt(&path, 12, "snapshot time out of range"))?;
        Ok(Some(Snapshot {
            stream: record.stream,
            version: record.version,
            position: record.position,
            state_version: record.state_version,
            state: record.state,
            taken_at,
        }))
    }

    fn write(&self, snapshot: Snapshot) -> crate::Result<()> {
        let path = self.path_of(&snapshot.stream);
        let record = Record {
            taken_secs: snapshot.taken_at.timestamp(),
            taken_nanos: snapshot.taken_at.timestamp_subsec_nanos(),
            stream: snapshot.stream,
            version: snapshot.version,
            position: snapshot.position,
            state_version: snapshot.state_version,
            state: snapshot.state,
        };
        let body = Bincode::encode_payload(&record)?;
        let mut data = Vec::with_capacity(body.len() + 12);
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        data.extend_from_slice(&body);
        let tmp = path.with_extension("snapshot.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        file.write_all(&data)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
        sync_dir(&self.dir)
    }
}

#[async_trait]
impl SnapshotStore for FileSnapshotStore {
    async fn save(&self, snapshot: Snapshot) -> Result<()> {
        let _one_at_a_time = self.saving.lock().await;
        // A damaged older file must not block a new snapshot: replace it.
        let newer = match self.read(&snapshot.stream) {
            Ok(old) => old.is_none_or(|old| old.version <= snapshot.version),
            Err(Error::Corrupt { .. }) => true,
            Err(e) => return Err(e.into()),
        };
        if newer {
            self.write(snapshot)?;
        }
        Ok(())
    }

    async fn load(&self, stream: &str) -> Result<Option<Snapshot>> {
        Ok(self.read(stream)?)
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        let path = self.path_of(stream);
        match self.read(stream) {
            Ok(None) => return Ok(()),
            Ok(Some(_)) | Err(Error::Corrupt { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        std::fs::remove_file(&path).map_err(|e| CoreError::from(Error::io("remove", &path, e)))?;
        Ok(sync_dir(&self.dir)?)
    }
}
