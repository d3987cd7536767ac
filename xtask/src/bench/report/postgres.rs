//! The PostgreSQL bench's rows: the event store's and the transport's, each against raw
//! tokio-postgres doing the same work in the same round (issue 21's targets).

use super::{Area, Figure, Row, Run, Target, output};
use crate::bench::parse::{self, Comparison};

/// Ours ÷ raw tokio-postgres at least this, everywhere (issue 21).
const RATIO: f64 = 0.8;

/// Appends of 100 events at least this many events per second on 2 cores (issue 21).
const BATCHED_RATE: f64 = 50_000.0;

/// The event store's area and the transport's, from the bench's one run.
pub(super) fn areas(run: &Run<'_>) -> [Area; 2] {
    let report = output(run, "postgres")
        .map(|(stdout, _)| parse::postgres_report(stdout))
        .unwrap_or_default();
    let note = report.settings.map(|settings| {
        format!(
            "Settings: {settings}. Baselines: raw tokio-postgres in the same round — appends \
             as `BEGIN; INSERT …; COMMIT` pipelined, a connection per writer, into a table \
             with the store's columns, indexes and version check (positions from an identity \
             column: not gap-safe); reads with the store's SELECT, not decoded; the queue \
             rows the transport writes, and claims with its statement. Ratios are the medians \
             of the per-round ratios; the flush time of the machine's WAL moves both sides."
        )
    });
    let (transport, store): (Vec<Comparison>, Vec<Comparison>) = report
        .rows
        .into_iter()
        .partition(|c| c.label.starts_with("PostgresTransport"));
    [
        Area {
            title: "PostgreSQL event store (appends, read_all, subscription catch-up)".to_owned(),
            bench: "postgres",
            rows: store.into_iter().map(|c| row(c, "events/s")).collect(),
            note,
        },
        Area {
            title: "PostgreSQL transport publish and consume".to_owned(),
            bench: "postgres",
            rows: transport.into_iter().map(|c| row(c, "msgs/s")).collect(),
            note: None,
        },
    ]
}

/// One of our rows, with its target.
fn row(c: Comparison, unit: &'static str) -> Row {
    let target = if c.label.contains("append, 100 events") {
        Target::RatioAndRateAtLeast(RATIO, BATCHED_RATE)
    } else {
        Target::RatioAtLeast(RATIO)
    };
    Row {
        ours: Figure::Rate(c.ours, unit),
        baseline: Some((c.baseline_label, Figure::Rate(c.baseline, unit))),
        ratio: Some(c.ratio),
        what: c.label,
        target,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{Outcome, Run, markdown, terminal_summary};

    /// The rows of a run of the bench (2026-12-07 23:22 UTC), some met, some missed.
    const OUTPUT: &str = "\
postgres bench: PostgreSQL 15.20, synchronous_commit = on, 5 rounds, medians
                                           median events/s  ours/raw median
raw INSERT, 16 writers                              11248
PostgresEventStore::append, 16 writers              10711             1.05
raw INSERT unnest 100, 1 writer                     80452
PostgresEventStore::append, 100 events              60857             0.77
raw INSERT queue row, 1 publisher                    3969
PostgresTransport::publish                           2816             0.71
";

    fn run_with(outcome: Outcome) -> String {
        let outcomes = [("postgres", outcome)];
        let run = Run::for_test(&outcomes);
        format!("{}\n{}", markdown(&run), terminal_summary(&run))
    }

    #[test]
    fn the_store_and_transport_sections() {
        let md = run_with(Outcome::Ran {
            stdout: OUTPUT.to_owned(),
            stderr: String::new(),
            took: Duration::from_secs(30),
        });
        assert!(
            md.contains(
                "## PostgreSQL event store (appends, read_all, subscription catch-up)\n\n\
                 Settings: PostgreSQL 15.20, synchronous_commit = on, 5 rounds, medians. Baselines:"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| PostgresEventStore::append, 16 writers | 10.7k events/s | 11.2k events/s (raw \
                 INSERT, 16 writers) | 1.05× | ≥ 0.8× | met |"
            ),
            "{md}"
        );
        // Two targets: the ratio is missed, 50k events/s met.
        assert!(
            md.contains(
                "| PostgresEventStore::append, 100 events | 60.9k events/s | 80.5k events/s (raw \
                 INSERT unnest 100, 1 writer) | 0.77× | ≥ 0.8×, ≥ 50.0k/s | **missed** (≥ 50.0k/s met) |"
            ),
            "{md}"
        );
        assert!(
            md.contains("## PostgreSQL transport publish and consume\n\n| measurement |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| PostgresTransport::publish | 2.8k msgs/s | 4.0k msgs/s (raw INSERT queue row, 1 \
                 publisher) | 0.71× | ≥ 0.8× | **missed** |"
            ),
            "{md}"
        );
        assert!(md.contains("1 targets met, 2 missed."), "{md}");
        assert!(
            md.contains(
                "- missed: PostgreSQL transport publish and consume: PostgresTransport::publish"
            ),
            "{md}"
        );
        assert!(md.contains("MISSED"), "{md}");
    }

    #[test]
    fn a_batched_append_under_50k_misses_even_at_the_ratio() {
        let md = run_with(Outcome::Ran {
            stdout: "raw INSERT unnest 100, 1 writer  40000\n\
                     PostgresEventStore::append, 100 events  36000  0.90\n"
                .to_owned(),
            stderr: String::new(),
            took: Duration::from_secs(30),
        });
        assert!(
            md.contains("| 0.90× | ≥ 0.8×, ≥ 50.0k/s | **missed** (≥ 0.8× met) |"),
            "{md}"
        );
    }

    #[test]
    fn both_sections_say_why_nothing_was_measured() {
        let md = run_with(Outcome::Failed(
            "PostgreSQL at 127.0.0.1:5432 is down (refused), and CI=true: a bench cannot skip \
             its service"
                .to_owned(),
        ));
        assert_eq!(
            md.matches("Not measured: failed: PostgreSQL at 127.0.0.1:5432 is down")
                .count(),
            2,
            "{md}"
        );
    }
}
