//! The embedded durable dead-letter queue: the queue operations, restarts, what a crash
//! leaves, and bad files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use chrono::Utc;
use orchestrator_core::{DeadLetter, DeadLetterQuery, DeadLetterQueue, EventEnvelope};
use orchestrator_store::{Error, FileDeadLetterQueue};
use serde_json::json;

fn letter(event_type: &str, subscription: &str, n: u32) -> DeadLetter {
    let now = Utc::now();
    DeadLetter::new(
        EventEnvelope::new(event_type, &json!({ "n": n }))
            .unwrap()
            .with_correlation_id(format!("corr-{n}")),
        event_type.to_owned(),
        subscription.to_owned(),
        format!("failure {n}"),
        n + 1,
        now,
        now,
    )
}

fn ids(letters: &[DeadLetter]) -> Vec<&str> {
    letters.iter().map(|l| l.id.as_str()).collect()
}

fn all() -> DeadLetterQuery {
    DeadLetterQuery::default()
}

/// Letter files in `dir`, by name.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn push_get_remove_and_len() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = FileDeadLetterQueue::open(dir.path().join("dlq")).unwrap();
    assert!(dlq.is_empty().await.unwrap());
    let (a, b) = (letter("a.x", "s1", 0), letter("b.x", "s2", 1));
    dlq.push(a.clone()).await.unwrap();
    dlq.push(b.clone()).await.unwrap();
    assert_eq!(dlq.len().await.unwrap(), 2);
    assert_eq!(dlq.get(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(dlq.get("nope").await.unwrap(), None);
    assert_eq!(dlq.list(&all()).await.unwrap(), [a.clone(), b.clone()]);

    let other = dlq.clone();
    assert_eq!(other.remove(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(dlq.remove(&a.id).await.unwrap(), None);
    assert_eq!(dlq.get(&a.id).await.unwrap(), None);
    assert_eq!(dlq.len().await.unwrap(), 1);
    assert_eq!(files(dlq.dir()).len(), 1, "one file per letter");
}

#[tokio::test]
async fn lists_oldest_first_with_filters_and_paging() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = FileDeadLetterQueue::open(dir.path()).unwrap();
    // a0 b1 a2 b3 a4 of s1, then a5 of s2.
    let mut pushed: Vec<DeadLetter> = (0..5)
        .map(|n| letter(if n % 2 == 0 { "a.x" } else { "b.x" }, "s1", n))
        .collect();
    pushed.push(letter("a.x", "s2", 5));
    for l in &pushed {
        dlq.push(l.clone()).await.unwrap();
    }
    let want = |idx: &[usize]| {
        idx.iter()
            .map(|&i| pushed[i].id.as_str())
            .collect::<Vec<_>>()
    };
    let query =
        |event_type: Option<&str>, subscription: Option<&str>, offset, limit| DeadLetterQuery {
            event_type: event_type.map(str::to_owned),
            subscription: subscription.map(str::to_owned),
            offset,
            limit,
        };
    let cases = [
        (
            "everything",
            query(None, None, 0, 100),
            want(&[0, 1, 2, 3, 4, 5]),
        ),
        (
            "subscription",
            query(None, Some("s1"), 0, 100),
            want(&[0, 1, 2, 3, 4]),
        ),
        (
            "other subscription",
            query(None, Some("s2"), 0, 100),
            want(&[5]),
        ),
        (
            "event type",
            query(Some("a.x"), Some("s1"), 0, 100),
            want(&[0, 2, 4]),
        ),
        (
            "type only",
            query(Some("a.x"), None, 0, 100),
            want(&[0, 2, 4, 5]),
        ),
        (
            "offset 1 limit 2",
            query(None, Some("s1"), 1, 2),
            want(&[1, 2]),
        ),
        (
            "type b offset 1",
            query(Some("b.x"), Some("s1"), 1, 10),
            want(&[3]),
        ),
        ("past the end", query(None, None, 10, 10), want(&[])),
        ("limit 0", query(None, None, 0, 0), want(&[])),
    ];
    for (what, query, want) in cases {
        let got = dlq.list(&query).await.unwrap();
        assert_eq!(ids(&got), want, "{what}");
    }
}

#[tokio::test]
async fn pushing_an_id_again_replaces_it_and_moves_it_last() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = FileDeadLetterQueue::open(dir.path()).unwrap();
    let (first, second) = (letter("a.x", "s", 0), letter("b.x", "s", 1));
    dlq.push(first.clone()).await.unwrap();
    dlq.push(second.clone()).await.unwrap();
    let mut again = first.clone();
    again.attempts = 9;
    dlq.push(again.clone()).await.unwrap();
    assert_eq!(dlq.list(&all()).await.unwrap(), [second, again]);
    assert_eq!(files(dir.path()).len(), 2, "the older copy is deleted");
}

#[tokio::test]
async fn letters_and_their_order_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let pushed: Vec<DeadLetter> = (0..4).map(|n| letter("a.x", "s", n)).collect();
    {
        let dlq = FileDeadLetterQueue::open(dir.path()).unwrap();
        for l in &pushed {
            dlq.push(l.clone()).await.unwrap();
        }
        dlq.remove(&pushed[1].id).await.unwrap();
    }
    let dlq = FileDeadLetterQueue::open(dir.path()).unwrap();
    let later = letter("a.x", "s", 9);
    dlq.push(later.clone()).await.unwrap();
    let listed = dlq.list(&all()).await.unwrap();
    assert_eq!(
        listed,
        [
            pushed[0].clone(),
            pushed[2].clone(),
            pushed[3].clone(),
            later
        ],
        "a letter parked after reopening comes after the older ones"
    );
    drop(dlq);
    let dlq = FileDeadLetterQueue::open(dir.path()).unwrap();
    assert_eq!(
        dlq.get(&pushed[1].id).await.unwrap(),
        None,
        "removed for good"
    );
    assert_eq!(dlq.len().await.unwrap(), 4);
}

#[tokio::test]
async fn ids_that_are_not_file_names_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = FileDeadLetterQueue::open(dir.path()).unwrap();
    let mut odd = letter("a.x", "s", 0);
    odd.id = "../up/ünï code %41".to_owned();
    dlq.push(odd.clone()).await.unwrap();
    assert_eq!(files(dir.path()).len(), 1);
    assert!(!dir.path().parent().unwrap().join("up").exists());
    assert_eq!(dlq.get(&odd.id).await.unwrap(), Some(odd.clone()));
    assert_eq!(dlq.list(&all()).await.unwrap(), [odd.clone()]);
    assert_eq!(dlq.remove(&odd.id).await.unwrap(), Some(odd));

    let mut long = letter("a.x", "s", 1);
    long.id = "x".repeat(300);
    let err = dlq.push(long).await.unwrap_err();
    assert!(err.to_string().contains("too long"), "{err}");
}

#[tokio::test]
async fn what_a_crash_leaves_is_ignored_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kept = letter("a.x", "s", 0);
    {
        let dlq = FileDeadLetterQueue::open(d).unwrap();
        dlq.push(kept.clone()).await.unwrap();
    }
    // A crash mid-write: a torn temporary file, never renamed into place.
    let torn = letter("a.x", "s", 1);
    let json = torn.to_json().unwrap();
    let temp = d.join(format!(".00000000000000000002-{}.json.tmp", torn.id));
    std::fs::write(&temp, &json[..json.len() / 2]).unwrap();
    // A crash mid-replace: an older copy of a letter parked again.
    let mut older = kept.clone();
    older.attempts = 1;
    let stale = d.join(format!("00000000000000000000-{}.json", kept.id));
    std::fs::write(&stale, older.to_json().unwrap()).unwrap();

    let read_only = FileDeadLetterQueue::open_read_only(d);
    assert_eq!(
        read_only.list(&all()).await.unwrap(),
        std::slice::from_ref(&kept)
    );
    assert_eq!(read_only.len().await.unwrap(), 1);
    assert_eq!(read_only.get(&torn.id).await.unwrap(), None);
    assert!(temp.exists() && stale.exists(), "a reader deletes nothing");

    let dlq = FileDeadLetterQueue::open(d).unwrap();
    assert!(!temp.exists(), "opening deletes torn temporary files");
    assert!(!stale.exists(), "opening deletes superseded copies");
    assert_eq!(dlq.list(&all()).await.unwrap(), [kept]);
}

#[tokio::test]
async fn a_corrupt_letter_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dlq = FileDeadLetterQueue::open(d).unwrap();
    let good = letter("a.x", "s", 0);
    dlq.push(good.clone()).await.unwrap();
    let bad = letter("a.x", "s", 1);
    let bad_file = d.join(format!("00000000000000000099-{}.json", bad.id));
    std::fs::write(&bad_file, b"{ not json").unwrap();

    let expect_corrupt = |err: orchestrator_core::Error, file: &Path| match Error::from_core(&err) {
        Some(Error::CorruptDeadLetter { file: named, .. }) => {
            assert_eq!(named, file);
            let message = err.to_string();
            assert!(
                message.contains(&file.display().to_string()) && message.contains("move it"),
                "{message}"
            );
        }
        other => panic!(
            "expected CorruptDeadLetter for {}, got {other:?}",
            file.display()
        ),
    };
    expect_corrupt(dlq.list(&all()).await.unwrap_err(), &bad_file);
    expect_corrupt(dlq.get(&bad.id).await.unwrap_err(), &bad_file);
    expect_corrupt(dlq.remove(&bad.id).await.unwrap_err(), &bad_file);
    assert!(bad_file.exists(), "a failed remove keeps the file");
    // The good letter is still reachable by id, parking still works, and len counts both.
    assert_eq!(dlq.get(&good.id).await.unwrap(), Some(good.clone()));
    dlq.push(letter("b.x", "s", 2)).await.unwrap();
    assert_eq!(dlq.len().await.unwrap(), 3);

    // A letter under another letter's name.
    std::fs::write(&bad_file, good.to_json().unwrap()).unwrap();
    let err = dlq.get(&bad.id).await.unwrap_err();
    assert!(err.to_string().contains("holds letter"), "{err}");

    // A file named like no letter.
    std::fs::remove_file(&bad_file).unwrap();
    let stray = d.join("notes.json");
    std::fs::write(&stray, b"{}").unwrap();
    expect_corrupt(dlq.list(&all()).await.unwrap_err(), &stray);
    std::fs::rename(&stray, d.join("notes.txt")).unwrap();
    assert_eq!(
        dlq.list(&all()).await.unwrap().len(),
        2,
        "other files are left alone"
    );
}

#[tokio::test]
async fn a_read_only_queue_reads_and_refuses_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let missing = FileDeadLetterQueue::open_read_only(dir.path().join("nothing-yet"));
    assert!(missing.is_read_only());
    assert!(missing.list(&all()).await.unwrap().is_empty());
    assert_eq!(missing.len().await.unwrap(), 0);
    assert!(
        !dir.path().join("nothing-yet").exists(),
        "nothing is created"
    );

    let writer = FileDeadLetterQueue::open(dir.path()).unwrap();
    let l = letter("a.x", "s", 0);
    writer.push(l.clone()).await.unwrap();
    let reader = FileDeadLetterQueue::open_read_only(dir.path());
    assert_eq!(reader.get(&l.id).await.unwrap(), Some(l.clone()));
    for err in [
        reader.push(letter("a.x", "s", 1)).await.unwrap_err(),
        reader.remove(&l.id).await.unwrap_err(),
    ] {
        assert!(
            matches!(Error::from_core(&err), Some(Error::ReadOnly { .. })),
            "{err}"
        );
    }
    assert_eq!(writer.len().await.unwrap(), 1);
    // A writer's removal is seen by the reader at once: nothing is cached.
    writer.remove(&l.id).await.unwrap();
    assert!(reader.is_empty().await.unwrap());
}

#[test]
fn the_store_keeps_dead_letters_in_a_subdirectory() {
    assert_eq!(
        FileDeadLetterQueue::dir_in_store("/var/lib/app"),
        Path::new("/var/lib/app/dead-letters")
    );
}

#[tokio::test]
async fn an_attached_queue_removes_without_cleaning_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = FileDeadLetterQueue::open(d).unwrap();
    let (a, b) = (letter("a.x", "s", 0), letter("a.x", "s", 1));
    app.push(a.clone()).await.unwrap();
    app.push(b.clone()).await.unwrap();
    // A letter the application is writing at this moment.
    let writing = d.join(".00000000000000000003-x.json.tmp");
    std::fs::write(&writing, b"{").unwrap();

    let tool = FileDeadLetterQueue::attach(d);
    assert!(writing.exists(), "attaching deletes nothing");
    assert_eq!(tool.remove(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(
        app.list(&all()).await.unwrap(),
        std::slice::from_ref(&b),
        "the app sees it gone"
    );
    // Both removing the same letter: one gets it.
    let (one, other) = tokio::join!(tool.remove(&b.id), app.remove(&b.id));
    assert_eq!(
        [one.unwrap(), other.unwrap()].into_iter().flatten().count(),
        1
    );
    // The application's next letter comes after everything, whoever removed what.
    let c = letter("a.x", "s", 2);
    app.push(c.clone()).await.unwrap();
    assert_eq!(tool.list(&all()).await.unwrap(), [c]);

    let missing = FileDeadLetterQueue::attach(d.join("none"));
    assert_eq!(missing.remove("x").await.unwrap(), None);
    assert!(!d.join("none").exists());
}
