//! Segment files: naming, creating and reading them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

use super::format::segment_header;

const PREFIX: &str = "segment-";
const SUFFIX: &str = ".log";

/// The file name of segment number `seq` (numbers start at 1).
pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{seq:010}{SUFFIX}"))
}

/// The segment numbers found in `dir`, ascending. Files with other names are left alone.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix(PREFIX)
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push(seq);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Creates segment `seq` with its header, durably (file and directory synced), and returns
/// it open for appending.
pub(crate) fn create_segment(dir: &Path, seq: u64) -> Result<File> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    file.write_all(&segment_header())
        .map_err(|e| Error::io("write", &path, e))?;
    file.sync_all().map_err(|e| Error::io("sync", &path, e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Makes a directory entry just created or removed durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync", dir, e))?;
    // Other platforms cannot open a directory as a file; their file systems order
    // metadata updates themselves.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset` without moving a shared cursor, so many
/// readers can share one handle.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut done, mut offset) = (0, offset);
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(file, &mut buf[done..], offset)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
            offset += n as u64;
        }
        Ok(())
    }
}
