//! `KafkaLease` against the live broker: one holder at a time, a standby takes over after a
//! release and after the holder is dropped (both leave the group) and after it is killed
//! with SIGKILL (on tansu 0.6.0, whose coordinator never re-forms a group whose leader died
//! without leaving, through the lease's next epoch); a holder expelled while it was paused
//! finds out at its next renewal.
//!
//! The killed and paused holders run in a child process: this test binary again, running
//! only [`lease_holder_child`], which takes the lease and reports each renewal on stdout.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kafka_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_support::{Live, config, live};
use orchestrator_backends::kafka::{KafkaConfig, KafkaEventStore};
use orchestrator_core::{EventStore, Lease};

/// The environment variable that makes [`lease_holder_child`] a lease holder: the brokers,
/// the topic prefix and the lease's name, separated by spaces.
const CHILD: &str = "ORCHESTRATOR_KAFKA_LEASE_CHILD";

/// The session timeout the tests use: the default.
const SESSION: Duration = orchestrator_backends::kafka::DEFAULT_LEASE_SESSION_TIMEOUT;

async fn store(live: &Live) -> KafkaEventStore {
    KafkaEventStore::connect(config(&live.brokers, &live.prefix))
        .await
        .unwrap()
}

/// Tries `lease` every `every` until it is taken, for at most `within`; returns how long it
/// took.
async fn taken_within(lease: &dyn Lease, every: Duration, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        match lease.try_acquire().await {
            Ok(true) => return Some(started.elapsed()),
            Ok(false) => {}
            Err(e) => eprintln!("try_acquire: {e}"),
        }
        tokio::time::sleep(every).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_lease_has_one_holder_at_a_time() {
    let Some(live) = live().await else {
        return;
    };
    let store = store(&live).await;
    let first = store
        .lease("relay.default")
        .expect("the Kafka store has a lease");
    let second = store.lease("relay.default").unwrap();
    assert!(!first.is_local());
    assert_eq!(first.ttl(), SESSION);
    let description = first.describe();
    assert!(
        description.contains(&format!(
            "{}__orchestrator.lease.relay.default",
            live.prefix
        )),
        "{description}"
    );

    let started = Instant::now();
    assert!(first.try_acquire().await.unwrap(), "free: taken");
    eprintln!("first take (join and assignment): {:?}", started.elapsed());
    assert!(first.try_acquire().await.unwrap(), "kept by its holder");
    assert!(!second.try_acquire().await.unwrap(), "held by the first");
    assert!(
        first.try_acquire().await.unwrap(),
        "a standby joining moves nothing"
    );
    assert!(!second.try_acquire().await.unwrap(), "still held");
    let other = store.lease("relay.other").unwrap();
    assert!(
        other.try_acquire().await.unwrap(),
        "another name is another lease"
    );

    first.release().await.unwrap();
    // A standby tries again at its pace (the relay: a third of the lease's time to live).
    let took = taken_within(&*second, Duration::from_millis(100), SESSION * 3)
        .await
        .expect("released: the standby takes it");
    eprintln!("takeover after release: {took:?}");
    assert!(
        !first.try_acquire().await.unwrap(),
        "the released candidate joins again as a standby"
    );
    assert!(second.try_acquire().await.unwrap(), "and moves nothing");

    second.release().await.unwrap();
    let took = taken_within(&*first, Duration::from_millis(100), SESSION * 3)
        .await
        .expect("a candidate that released once takes it again");
    eprintln!("takeover after release (again): {took:?}");
    first.release().await.unwrap();
    other.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_holder_hands_the_lease_over() {
    let Some(live) = live().await else {
        return;
    };
    let store = store(&live).await;
    let holder = store.lease("relay.default").unwrap();
    let standby = store.lease("relay.default").unwrap();
    assert!(holder.try_acquire().await.unwrap());
    assert!(!standby.try_acquire().await.unwrap());
    // Dropped without release: its consumer closes, and leaves the group.
    drop(holder);
    let took = taken_within(&*standby, Duration::from_millis(100), SESSION * 3)
        .await
        .expect("the standby takes over from a dropped holder");
    eprintln!("takeover after the holder was dropped: {took:?}");
    assert!(standby.try_acquire().await.unwrap());
    standby.release().await.unwrap();
}

/// A holder in a child process, stopped with SIGSTOP for longer than its session timeout:
/// the coordinator expels it, and once it runs again its next renewal says it lost the
/// lease. (The standby's takeover is checked in `a_killed_holder_is_replaced`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_finds_at_its_next_renewal_that_it_lost_the_lease() {
    let Some(live) = live().await else {
        return;
    };
    let (_store, standby, mut child) = held_by_a_child(&live).await;

    signal(&child.child, "-STOP");
    // Heartbeats stop with the process: the coordinator expels it after a session timeout.
    tokio::time::sleep(SESSION * 2).await;
    let resumed = Instant::now();
    signal(&child.child, "-CONT");
    let line = child.wait_for("lost");
    eprintln!("the resumed holder: `{line}` after {:?}", resumed.elapsed());
    assert!(
        resumed.elapsed() < SESSION,
        "the resumed holder learns at its next renewal that it lost the lease"
    );
    let _ = child.child.wait();
    drop(child);
    standby.release().await.unwrap();
}

/// A holder in a child process killed with SIGKILL (it never leaves the group): a standby
/// takes the lease over. On Apache Kafka the coordinator expels the dead member after a
/// session timeout; on tansu 0.6.0, whose coordinator keeps a dead leader, the standby sees
/// no renewal for three session timeouts and moves the lease to the next epoch's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced() {
    let Some(live) = live().await else {
        return;
    };
    let (store, standby, mut child) = held_by_a_child(&live).await;
    assert!(
        !standby.try_acquire().await.unwrap(),
        "and goes on holding it"
    );
    child.child.kill().unwrap();
    let _ = child.child.wait();
    let took = taken_within(&*standby, SESSION / 3, SESSION * 6)
        .await
        .expect("a standby takes over from a killed holder");
    eprintln!("takeover after the holder was killed: {took:?}");
    assert!(standby.try_acquire().await.unwrap(), "and keeps it");
    // A new candidate finds the lease where it went, and does not take it.
    let late = store.lease("relay.default").unwrap();
    assert!(
        !late.try_acquire().await.unwrap(),
        "a late candidate is a standby"
    );
    late.release().await.unwrap();
    standby.release().await.unwrap();
}

/// A store, a standby candidate on it, and a child process holding the lease
/// `relay.default` (checked: the standby does not get it).
async fn held_by_a_child(live: &Live) -> (KafkaEventStore, Arc<dyn Lease>, Holder) {
    let store = store(live).await;
    let standby = store.lease("relay.default").unwrap();
    let mut child = Holder::spawn(live, "relay.default");
    child.wait_for("held");
    assert!(!standby.try_acquire().await.unwrap(), "the child holds it");
    (store, standby, child)
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} failed");
}

/// The child process that holds the lease; killed when dropped.
struct Holder {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Holder {
    fn spawn(live: &Live, name: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["lease_holder_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD, format!("{} {} {name}", live.brokers, live.prefix))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Reads the child's reports until one starts with `what` (blocking: the child's
    /// renewals report every couple of seconds, and it exits on its own after a while).
    fn wait_for(&mut self, what: &str) -> String {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with(what) {
                return line;
            }
        }
        panic!("the lease holder child exited before it reported `{what}`");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test on its own: the lease holder that the tests above run in a child process
/// (see [`CHILD`]). Takes the lease, then renews it at the relay's pace, printing `held`,
/// `lost` or `error` after each try; exits once it lost the lease, or after two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the tests of this file in a child process"]
async fn lease_holder_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let mut parts = spec.split(' ');
    let (brokers, prefix, name) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let config: KafkaConfig = config(brokers, prefix);
    let store = KafkaEventStore::connect(config).await.unwrap();
    let lease: Arc<dyn Lease> = store.lease(name).unwrap();
    let started = Instant::now();
    let mut held = false;
    while started.elapsed() < Duration::from_secs(120) {
        match lease.try_acquire().await {
            Ok(true) => {
                held = true;
                println!("held");
            }
            Ok(false) if held => {
                println!("lost");
                return;
            }
            Ok(false) => println!("standby"),
            Err(e) => println!("error {e}"),
        }
        tokio::time::sleep(lease.ttl() / 3).await;
    }
}
