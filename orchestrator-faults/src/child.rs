//! The harness of the scenarios that run this binary again as child processes and kill
//! them with SIGKILL (publisher-crash, saga-crash, relay-failover, saga-takeover).
//!
//! A child talks to the parent in lines on its stdout ([`say`]); the parent reads them on a
//! thread of their own, each with the moment it arrived ([`ChildProcess::line`]). The parent
//! asks a child that runs until told to finish by closing its stdin
//! ([`ChildProcess::close_stdin`]; the child waits for it with [`stdin_closed`]). Children
//! and parent share files of lines, one `O_APPEND` write each ([`Lines`], [`read_ids`]).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read as _, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Res;

/// A line to the parent, flushed at once.
pub(crate) fn say(line: &str) -> Res {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// In a child: resolves once the parent closes our stdin (or dies), which is how a parent
/// tells a child that runs until told to finish up (the scenarios on Redis use it).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) async fn stdin_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        // Reads until end of file: the parent writes nothing, it only closes.
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.await;
}

/// A child process of this binary, whose stdout lines the parent reads.
pub(crate) struct ChildProcess {
    child: Child,
    /// Held open until [`close_stdin`](Self::close_stdin); dropping it closes it.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, String)>,
    reader: Option<JoinHandle<()>>,
}

impl ChildProcess {
    /// Runs this binary (`exe`) with `args`; its stderr goes to ours.
    pub(crate) fn spawn<I, S>(exe: &Path, args: I) -> Res<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout from the child")?;
        let stdin = child.stdin.take();
        let (lines_tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if lines_tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
            reader: Some(reader),
        })
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it said, with when it arrived; `None` after `timeout` or once its
    /// stdout closed.
    pub(crate) fn line(&self, timeout: Duration) -> Option<(Instant, String)> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The lines it said that have not been read yet, without waiting.
    pub(crate) fn said(&self) -> Vec<(Instant, String)> {
        self.lines.try_iter().collect()
    }

    /// Waits until it says `want`; fails if it says something else first, ends, or is
    /// silent for `timeout`.
    pub(crate) fn expect(&mut self, want: &str, timeout: Duration) -> Res<Instant> {
        match self.line(timeout) {
            Some((at, line)) if line == want => Ok(at),
            other => {
                self.kill()?;
                Err(format!("child {} said {other:?}, not {want:?}", self.pid()).into())
            }
        }
    }

    /// Its exit status, if it has ended.
    pub(crate) fn try_wait(&mut self) -> Res<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGKILL (our own child, by its handle), and reaps it.
    pub(crate) fn kill(&mut self) -> Res {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.child.wait()?;
        Ok(())
    }

    /// Closes its stdin: the child's [`stdin_closed`] resolves.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for it to end, at most `timeout` (then kills it and fails).
    pub(crate) fn wait(&mut self, timeout: Duration) -> Res<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                self.kill()?;
                return Err(
                    format!("child {} did not end within {timeout:?}", self.child.id()).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the end of its stdout (after it ended) and returns what it said since
    /// the last read.
    pub(crate) fn finish(mut self) -> Vec<(Instant, String)> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.said()
    }
}

impl Drop for ChildProcess {
    /// A scenario that fails half-way leaves no child running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Appends lines to a file, one `O_APPEND` write each (lines from concurrent tasks and
/// processes never interleave).
#[derive(Clone)]
pub(crate) struct Lines(Arc<Mutex<std::fs::File>>);

impl Lines {
    /// Opens `path` for appending, creating it.
    pub(crate) fn open(path: &Path) -> Res<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self(Arc::new(Mutex::new(file))))
    }

    /// Appends `line` and a newline, in one write.
    pub(crate) fn write(&self, line: &str) -> std::io::Result<()> {
        let mut file = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(format!("{line}\n").as_bytes())
    }
}

/// The ids in a file of lines, with how often each appears (none if there is no file).
pub(crate) fn read_ids(path: &Path) -> Res<BTreeMap<String, usize>> {
    let mut ids = BTreeMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e.into()),
    };
    for line in text.lines() {
        *ids.entry(line.to_owned()).or_insert(0) += 1;
    }
    Ok(ids)
}

/// Milliseconds since the Unix epoch: a clock all processes of a run share.
pub(crate) fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
