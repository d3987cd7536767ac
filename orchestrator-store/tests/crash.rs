//! Crash test of the embedded store: a child process appends in a loop, printing each
//! acknowledged append; the parent kills it with SIGKILL at random moments, reopens the
//! store and checks that every acknowledged append is there, in order, and that nothing
//! half-exists: global positions and stream versions are gapless, and every append's
//! events are all there or none is.
//!
//! The child is this test binary run again with `ORCHESTRATOR_STORE_CRASH_DIR` set (the
//! file has its own `main`, `harness = false`). `ORCHESTRATOR_STORE_CRASH_SEED` replays a
//! run; `ORCHESTRATOR_STORE_CRASH_KILLS` changes the number of kills (24 by default).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, ReadAll};
use orchestrator_store::file::{FileEventStore, FileStoreOptions, FsyncPolicy};

const DIR_ENV: &str = "ORCHESTRATOR_STORE_CRASH_DIR";
const POLICY_ENV: &str = "ORCHESTRATOR_STORE_CRASH_POLICY";
const SEED_ENV: &str = "ORCHESTRATOR_STORE_CRASH_SEED";
const KILLS_ENV: &str = "ORCHESTRATOR_STORE_CRASH_KILLS";
const WRITERS: usize = 4;
/// Appends per writer and run; a child that gets there waits to be killed.
const APPENDS_PER_RUN: usize = 300;

fn options(policy: &str) -> FileStoreOptions {
    let fsync = match policy {
        "interval" => FsyncPolicy::Interval(Duration::from_millis(2)),
        "never" => FsyncPolicy::Never,
        _ => FsyncPolicy::EveryAppend,
    };
    FileStoreOptions::default()
        .fsync(fsync)
        .max_segment_bytes(1024 * 1024)
}

fn main() {
    if let Ok(dir) = std::env::var(DIR_ENV) {
        let policy = std::env::var(POLICY_ENV).unwrap_or_default();
        return child(Path::new(&dir), &policy);
    }
    parent();
    println!("crash: 1 passed, 0 failed");
}

// ---------------------------------------------------------------------------------------------
// The child: append until killed.
// ---------------------------------------------------------------------------------------------

fn child(dir: &Path, policy: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = std::sync::Arc::new(FileEventStore::open_with(dir, options(policy)).unwrap());
        let run = std::process::id();
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let stream = format!("writer-{writer}");
                let mut version = store.stream_version(&stream).await.unwrap().unwrap_or(0);
                for seq in 0..APPENDS_PER_RUN {
                    let size = 1 + fastrand::usize(..6);
                    let batch = format!("{run}-{writer}-{seq}");
                    // Now and then a large append, so that kills land inside writes too.
                    let pad_len = if fastrand::u8(..4) == 0 {
                        fastrand::usize(..64 * 1024)
                    } else {
                        fastrand::usize(..1500)
                    };
                    let pad = "p".repeat(pad_len);
                    let events = (0..size)
                        .map(|item| {
                            EventEnvelope::new("crash.appended", &serde_json::json!({ "pad": pad }))
                                .unwrap()
                                .with_header("batch", batch.clone())
                                .unwrap()
                                .with_header("item", item.to_string())
                                .unwrap()
                                .with_header("size", size.to_string())
                                .unwrap()
                        })
                        .collect();
                    let written = store
                        .append(&stream, ExpectedVersion::Exact(version), events)
                        .await
                        .unwrap();
                    version = written.next_expected_version;
                    let line = format!(
                        "ack {stream} {} {} {version} {batch}\n",
                        written.first_position, written.last_position
                    );
                    let mut out = std::io::stdout().lock();
                    out.write_all(line.as_bytes()).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        println!("done");
        // Wait to be killed, without appending.
        std::future::pending::<()>().await;
    });
}

// ---------------------------------------------------------------------------------------------
// The parent: kill, reopen, check.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Ack {
    stream: String,
    first: u64,
    last: u64,
    version: u64,
    batch: String,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut parts = line.split_whitespace();
    if parts.next()? != "ack" {
        return None;
    }
    Some(Ack {
        stream: parts.next()?.to_owned(),
        first: parts.next()?.parse().ok()?,
        last: parts.next()?.parse().ok()?,
        version: parts.next()?.parse().ok()?,
        batch: parts.next()?.to_owned(),
    })
}

fn parent() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let kills: usize = std::env::var(KILLS_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    fastrand::seed(seed);
    println!("crash test: seed {seed} ({SEED_ENV} replays it), {kills} kills");
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acks: Vec<Ack> = Vec::new();
    let mut mid_append = 0;
    let mut torn_tails = 0;
    let mut stored_events = 0;
    let started = std::time::Instant::now();
    for round in 0..kills {
        let policy = ["every-append", "interval", "never"][round % 3];
        let mut child = Command::new(&exe)
            .env(DIR_ENV, dir.path())
            .env(POLICY_ENV, policy)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    // A line cut by the kill has no newline: it was not acknowledged to us.
                    Ok(n) if n > 0 && line.ends_with(b"\n") => {
                        let _ = lines_tx.send(String::from_utf8_lossy(&line).into_owned());
                    }
                    _ => return,
                }
            }
        });
        // Wait for the first acknowledgement, then kill at a random moment.
        let first = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("round {round}: the child acknowledged nothing: {e}"));
        std::thread::sleep(Duration::from_millis(fastrand::u64(..60)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: the child was not killed");
        reader.join().unwrap();
        let mut finished = false;
        for line in std::iter::once(first).chain(lines.try_iter()) {
            if line.trim() == "done" {
                finished = true;
            } else if let Some(ack) = parse_ack(&line) {
                acks.push(ack);
            } else {
                panic!("round {round}: unexpected child output {line:?}");
            }
        }
        if !finished {
            mid_append += 1;
        }
        let (torn, stored) = verify(dir.path(), &acks, round);
        torn_tails += usize::from(torn);
        stored_events = stored;
    }
    let events: u64 = acks.iter().map(|a| a.last - a.first + 1).sum();
    println!(
        "crash test: {kills} kills ({mid_append} while appending, {torn_tails} torn tails cut), \
         {} acknowledged appends ({events} events) verified after every kill; {stored_events} \
         events stored in the end (the rest: whole appends written but not yet reported \
         when killed), in {:.1?}",
        acks.len(),
        started.elapsed()
    );
    assert!(
        mid_append * 2 >= kills,
        "too few kills hit the child while appending"
    );
}

/// Reopens the store and checks it; returns whether recovery cut a torn tail, and how many
/// events the store holds.
fn verify(dir: &Path, acks: &[Ack], round: usize) -> (bool, usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = FileEventStore::open_with(dir, options("every-append"))
            .unwrap_or_else(|e| panic!("round {round}: reopening failed: {e}"));
        let torn = store.recovery_report().truncated_at.is_some();
        let events = store.read_all(ReadAll::from(0, usize::MAX)).await.unwrap();
        let what = |e: &EventEnvelope| format!("round {round}: event at {:?}", e.global_position());

        // Gapless positions and versions.
        let mut versions: HashMap<String, u64> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.global_position(), Some(i as u64 + 1), "{}", what(e));
            let version = versions
                .entry(e.stream_id().unwrap().to_owned())
                .or_default();
            *version += 1;
            assert_eq!(
                e.stream_version(),
                Some(*version),
                "{}: version gap",
                what(e)
            );
        }
        // Every append whole: its events are consecutive, items 0..size.
        let mut i = 0;
        while i < events.len() {
            let size: usize = events[i].header("size").unwrap().parse().unwrap();
            let batch = events[i].header("batch").unwrap();
            let whole = events.get(i..i + size).is_some_and(|run| {
                run.iter().enumerate().all(|(item, e)| {
                    e.header("batch") == Some(batch)
                        && e.header("item") == Some(item.to_string().as_str())
                })
            });
            assert!(whole, "{}: append {batch} is not whole", what(&events[i]));
            i += size;
        }
        // Every acknowledged append there, where it was acknowledged.
        for ack in acks {
            let at = |p: u64| events.get(p as usize - 1);
            let (Some(first), Some(last)) = (at(ack.first), at(ack.last)) else {
                panic!("round {round}: acknowledged append {ack:?} is missing");
            };
            for e in [first, last] {
                assert_eq!(e.header("batch"), Some(ack.batch.as_str()), "{ack:?}");
                assert_eq!(e.stream_id(), Some(ack.stream.as_str()), "{ack:?}");
            }
            assert_eq!(last.stream_version(), Some(ack.version), "{ack:?}");
        }
        (torn, events.len())
    })
}
