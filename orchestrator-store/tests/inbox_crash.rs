//! Crash test of the file inbox: a child process records ids in a loop, printing each
//! acknowledged record; the parent kills it with SIGKILL at random moments (mid-write,
//! mid-compaction), reopens the inbox and checks that it loads and that every acknowledged
//! id still within the window is seen.
//!
//! The child is this test binary run again with `ORCHESTRATOR_INBOX_CRASH_DIR` set (the file
//! has its own `main`, `harness = false`). `ORCHESTRATOR_INBOX_CRASH_SEED` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use orchestrator_core::{EventId, Inbox, InboxRetention};
use orchestrator_store::inbox::{FileInbox, InboxSync};

const DIR_ENV: &str = "ORCHESTRATOR_INBOX_CRASH_DIR";
const SEED_ENV: &str = "ORCHESTRATOR_INBOX_CRASH_SEED";
const KILLS: usize = 12;
/// Small enough that the log is compacted every few hundred records, so kills land in
/// compactions too.
const WINDOW: usize = 300;
const GROUP: &str = "crash";

fn open(dir: &Path) -> FileInbox {
    // Not syncing: a SIGKILL does not lose what the OS has; the test is about torn writes.
    FileInbox::open(dir)
        .unwrap()
        .with_retention(InboxRetention::last(WINDOW))
        .with_sync(InboxSync::Never)
}

fn main() {
    if let Ok(dir) = std::env::var(DIR_ENV) {
        return child(Path::new(&dir));
    }
    parent();
    println!("inbox_crash: 1 passed, 0 failed");
}

fn child(dir: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async {
        let inbox = open(dir);
        let mut out = std::io::stdout().lock();
        loop {
            let id = EventId::new();
            inbox.record(GROUP, &id).await.unwrap();
            writeln!(out, "{id}").unwrap();
            out.flush().unwrap();
        }
    });
}

fn parent() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("inbox crash test, seed {seed} (replay with {SEED_ENV}={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let mut acked: Vec<EventId> = Vec::new();
    for round in 0..KILLS {
        let mut child = Command::new(&me)
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(EventId::parse(line).unwrap()).is_err() {
                    break;
                }
            }
        });
        // Let it record a random number of ids, then kill it wherever it is.
        let target = rng.usize(50..2_000);
        let mut got = 0;
        while got < target {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(id) => {
                    acked.push(id);
                    got += 1;
                }
                Err(e) => panic!("round {round}: the child stopped recording: {e}"),
            }
        }
        std::thread::sleep(Duration::from_micros(rng.u64(0..2_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        // Records acknowledged before the kill landed: all of them, since the window is
        // counted from the newest.
        reader.join().unwrap();
        acked.extend(rx.try_iter());

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let inbox = open(dir.path());
            // Each kill may land between a record and its acknowledgement: that record is in
            // the window, unknown to the parent, and pushed an acknowledged one out of it.
            let kept = WINDOW - (round + 1);
            for (age, id) in acked.iter().rev().take(kept).enumerate() {
                assert!(
                    inbox.seen(GROUP, id).await.unwrap(),
                    "round {round} (seed {seed}): the acknowledged id {age} from the newest \
                     (of {}) is lost",
                    acked.len()
                );
            }
        });
        println!("round {round}: {} ids acknowledged so far", acked.len());
    }
}
