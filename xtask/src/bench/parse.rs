//! Reading benchmark results: criterion's `estimates.json` files, and the tables the
//! plain bench binaries print.

use std::fs;
use std::path::Path;

use crate::json;

mod server;

pub(crate) use server::{ServerFanOutLine, ServerReport, server_report};

/// One criterion benchmark's result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Estimate {
    /// `group/function[/parameter]`, as criterion names it (`full_id`).
    pub(crate) id: String,
    /// Median time of one iteration, in nanoseconds.
    pub(crate) median_ns: f64,
    /// Elements one iteration processes, when the bench declares a throughput.
    pub(crate) elements: Option<f64>,
}

impl Estimate {
    /// Elements per second at the median, if the bench declares elements per iteration.
    pub(crate) fn rate(&self) -> Option<f64> {
        let elements = self.elements?;
        (self.median_ns > 0.0).then(|| elements * 1e9 / self.median_ns)
    }
}

/// Every criterion result under `home` (criterion's output folder): each `new/` folder
/// holding a `benchmark.json` and an `estimates.json`.
pub(crate) fn criterion_estimates(home: &Path) -> Vec<Estimate> {
    let mut found = Vec::new();
    visit(home, 0, &mut found);
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found
}

/// Walks `dir` looking for `new/` result folders, at most a few levels deep.
fn visit(dir: &Path, depth: usize, found: &mut Vec<Estimate>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            if let Some(estimate) = read_result(&path) {
                found.push(estimate);
            }
        } else if depth < 6 && path.file_name().is_some_and(|n| n != "report") {
            visit(&path, depth + 1, found);
        }
    }
}

/// Reads one `new/` folder.
fn read_result(dir: &Path) -> Option<Estimate> {
    let benchmark = json::parse(&fs::read_to_string(dir.join("benchmark.json")).ok()?).ok()?;
    let estimates = json::parse(&fs::read_to_string(dir.join("estimates.json")).ok()?).ok()?;
    parse_result(&benchmark, &estimates)
}

/// Combines a `benchmark.json` and an `estimates.json`.
fn parse_result(benchmark: &json::Value, estimates: &json::Value) -> Option<Estimate> {
    let id = benchmark.get("full_id")?.as_str()?.to_owned();
    let median_ns = number(estimates.get("median")?.get("point_estimate")?)?;
    let elements = benchmark
        .get("throughput")
        .and_then(|t| t.get("Elements"))
        .and_then(number);
    Some(Estimate {
        id,
        median_ns,
        elements,
    })
}

/// The value of a JSON number.
fn number(value: &json::Value) -> Option<f64> {
    match value {
        json::Value::Number(n) => Some(*n),
        _ => None,
    }
}

/// A line of a printed table: a label, then numbers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TableRow {
    /// The text before the numbers, trimmed.
    pub(crate) label: String,
    /// The numbers after it, left to right (a trailing `x` is allowed: `1.23x`).
    pub(crate) numbers: Vec<f64>,
}

/// Reads `line` as a table row: a label, a gap of at least two spaces, then only numbers.
///
/// The gap is what tells a label that ends in a number (`raw XADD, pipelined 100`) from
/// the columns after it; every table the benches print pads its labels.
pub(crate) fn table_row(line: &str) -> Option<TableRow> {
    let line = line.trim();
    let (label, rest) = line.split_once("  ")?;
    let numbers = rest
        .split_whitespace()
        .map(|word| word.trim_end_matches('x').parse::<f64>().ok())
        .collect::<Option<Vec<f64>>>()?;
    if label.trim().is_empty() || numbers.is_empty() {
        return None;
    }
    Some(TableRow {
        label: label.trim().to_owned(),
        numbers,
    })
}

/// A comparison a backend bench printed: our figure against the raw client's, same run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Comparison {
    /// What was measured, as the bench names it.
    pub(crate) label: String,
    /// The raw client's work, as the bench names it.
    pub(crate) baseline_label: String,
    /// Our rate.
    pub(crate) ours: f64,
    /// The raw client's rate.
    pub(crate) baseline: f64,
    /// ours / raw as the bench reports it (its own median of ratios when it has one).
    pub(crate) ratio: f64,
}

/// Reads the comparison tables of a plain bench binary's output. Three shapes are known:
///
/// - `label  raw  ours  ratio` (three numbers: each row stands alone);
/// - groups, as the Redis bench prints them: a `label  rate` row is the raw baseline of
///   the rows that follow it, each `label  rate  ratio`;
/// - as the Kafka bench prints them: `[<what>] raw median <rate> msg/s …`,
///   `[<what>] ours median <rate> msg/s …`, `[<what>] ratio ours/raw <ratio>`, where
///   `<what>` is the first word of the line or, when the lines are indented without it,
///   the last unindented line above them (a heading).
pub(crate) fn comparisons(output: &str) -> Vec<Comparison> {
    let mut found = Vec::new();
    let mut baseline: Option<TableRow> = None;
    // The Kafka shape: the heading, and the pending `raw` and `ours` lines as (what, rate).
    let mut heading = String::new();
    let mut raw: Option<(String, f64)> = None;
    let mut ours: Option<(String, f64)> = None;
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (what, rest) = match words.first() {
            Some(&("raw" | "ours" | "ratio")) => (heading.clone(), &words[..]),
            Some(first) => ((*first).to_owned(), &words[1..]),
            None => continue,
        };
        match rest {
            ["raw", "median", rate, ..] => {
                raw = rate.parse().ok().map(|r| (what, r));
                continue;
            }
            ["ours", "median", rate, ..] => {
                ours = rate.parse().ok().map(|r| (what, r));
                continue;
            }
            ["ratio", "ours/raw", ratio] => {
                if let (Some((raw_what, raw)), Some((ours_what, ours)), Ok(ratio)) =
                    (raw.take(), ours.take(), ratio.parse::<f64>())
                    && raw_what == what
                    && ours_what == what
                {
                    found.push(Comparison {
                        baseline_label: format!("raw client, {what}"),
                        label: what,
                        ours,
                        baseline: raw,
                        ratio,
                    });
                }
                continue;
            }
            _ => {}
        }
        if !line.starts_with(char::is_whitespace) && table_row(line).is_none() {
            heading = line.trim().to_owned();
        }
        let Some(row) = table_row(line) else {
            continue;
        };
        match row.numbers[..] {
            [rate] => {
                baseline = Some(TableRow {
                    label: row.label,
                    numbers: vec![rate],
                })
            }
            [ours, ratio] => {
                if let Some(base) = &baseline {
                    found.push(Comparison {
                        label: row.label,
                        baseline_label: base.label.clone(),
                        ours,
                        baseline: base.numbers[0],
                        ratio,
                    });
                }
            }
            [raw, ours, ratio] => found.push(Comparison {
                baseline_label: format!("raw client, {}", row.label),
                label: row.label,
                ours,
                baseline: raw,
                ratio,
            }),
            _ => {}
        }
    }
    found
}

/// What the PostgreSQL bench printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PostgresReport {
    /// Its settings: the `postgres bench:` line without that prefix.
    pub(crate) settings: Option<String>,
    /// Each of our rows against the raw tokio-postgres row heading its group.
    pub(crate) rows: Vec<Comparison>,
}

/// Reads the PostgreSQL bench's output: groups of the Redis shape (a `raw …  rate` line, then
/// each of ours as `label  rate  ratio`), after its `postgres bench:` line.
pub(crate) fn postgres_report(output: &str) -> PostgresReport {
    PostgresReport {
        settings: line_with(output, "postgres bench:")
            .map(|line| line.trim_start_matches("postgres bench:").trim().to_owned()),
        rows: comparisons(output),
    }
}

/// A line of the CQRS bench's report: `label  <rate> commands/s  <ratio>x cqrs-es`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CqrsLine {
    /// Commands per session.
    pub(crate) session: u32,
    /// The variant (`orchestrator/repository`, `cqrs-es/mem-store`, …).
    pub(crate) label: String,
    /// Commands (or events, for the floor) per second.
    pub(crate) rate: f64,
    /// The ratio to `cqrs-es`.
    pub(crate) ratio: f64,
}

/// Reads the CQRS bench's report (it prints it on stderr).
pub(crate) fn cqrs_report(output: &str) -> Vec<CqrsLine> {
    let mut session = None;
    let mut found = Vec::new();
    for line in output.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("-- sessions of ") {
            session = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u32>().ok());
            continue;
        }
        let (Some(session), Some((label, rest))) = (session, trimmed.split_once("  ")) else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let rate = words.first().and_then(|w| w.parse::<f64>().ok());
        let ratio = words
            .iter()
            .find_map(|w| w.strip_suffix('x').and_then(|n| n.parse::<f64>().ok()));
        if let (Some(rate), Some(ratio)) = (rate, ratio) {
            found.push(CqrsLine {
                session,
                label: label.trim().to_owned(),
                rate,
                ratio,
            });
        }
    }
    found
}

/// The rows of the saga bench's `per-step cost vs raw append` table:
/// `(store, step ns, append ns, ratio)`.
pub(crate) fn saga_report(output: &str) -> Vec<(String, f64, f64, f64)> {
    output
        .lines()
        .skip_while(|line| !line.starts_with("per-step cost vs raw append"))
        .filter_map(table_row)
        .filter_map(|row| match row.numbers[..] {
            [step, append, ratio] => Some((row.label, step, append, ratio)),
            _ => None,
        })
        .collect()
}

/// A row of the end-to-end bench's table: the facade from `publish` to the handler, next to
/// the same store's plain appends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct E2eLine {
    /// `store/transport` (`memory/memory`, `file/Redis`, …).
    pub(crate) combination: String,
    /// Tasks publishing at once.
    pub(crate) concurrency: u32,
    /// Events per measurement.
    pub(crate) events: u64,
    /// End-to-end events per second.
    pub(crate) rate: f64,
    /// Median latency, publish → handler entry, in microseconds.
    pub(crate) p50_us: f64,
    /// 99th-percentile latency, in microseconds.
    pub(crate) p99_us: f64,
    /// The same store's plain append rate, same run.
    pub(crate) append_rate: f64,
    /// End to end ÷ plain append, as the bench reports it (its median of per-round ratios).
    pub(crate) ratio: f64,
    /// Events ÷ (first publish → last `publish` returned): how fast the publishers went.
    pub(crate) publish_rate: f64,
    /// The slowest event's latency, in microseconds (`None` from a bench that did not print
    /// it).
    pub(crate) max_us: Option<f64>,
}

/// A combination (or one of its concurrencies) the end-to-end bench did not measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct E2eAbsence {
    /// `Kafka/Kafka`, or `Kafka/Kafka at concurrency 64`.
    pub(crate) what: String,
    /// Why, as the bench printed it.
    pub(crate) why: String,
    /// Whether it failed (rather than being skipped: no broker, no feature).
    pub(crate) failed: bool,
}

/// Reads the end-to-end bench's output: the rows of its table (after the line that opens
/// with `facade end to end`, each `combination  concurrency events rate p50 p99 append
/// ratio publish-rate`), and what it did not measure (`e2e skipped: <what>: <why>`,
/// `e2e failed: <what>: <why>`).
pub(crate) fn e2e_report(output: &str) -> (Vec<E2eLine>, Vec<E2eAbsence>) {
    let absences = output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            match line.strip_prefix("e2e skipped: ") {
                Some(rest) => Some((rest, false)),
                None => line.strip_prefix("e2e failed: ").map(|rest| (rest, true)),
            }
        })
        .map(|(rest, failed)| {
            let (what, why) = rest.split_once(": ").unwrap_or((rest, ""));
            E2eAbsence {
                what: what.to_owned(),
                why: why.to_owned(),
                failed,
            }
        })
        .collect();
    let rows = output
        .lines()
        .skip_while(|line| !line.starts_with("facade end to end"))
        .filter_map(table_row)
        .filter_map(|row| match row.numbers[..] {
            [
                concurrency,
                events,
                rate,
                p50_us,
                p99_us,
                append_rate,
                ratio,
                publish_rate,
                ref max_us @ ..,
            ] if max_us.len() <= 1 => Some(E2eLine {
                combination: row.label,
                concurrency: concurrency as u32,
                events: events as u64,
                rate,
                p50_us,
                p99_us,
                append_rate,
                ratio,
                publish_rate,
                max_us: max_us.first().copied(),
            }),
            _ => None,
        })
        .collect();
    (rows, absences)
}

/// The first line of `output` containing `needle`, trimmed.
pub(crate) fn line_with<'a>(output: &'a str, needle: &str) -> Option<&'a str> {
    output
        .lines()
        .find(|line| line.contains(needle))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_split_at_the_padding() {
        let row = table_row("raw XADD, pipelined 100                        383000");
        assert_eq!(
            row,
            Some(TableRow {
                label: "raw XADD, pipelined 100".to_owned(),
                numbers: vec![383_000.0],
            })
        );
        assert_eq!(table_row("redis bench: redis://x, payload 200 B"), None);
        assert_eq!(table_row("work        raw msg/s  ours msg/s"), None);
        let row = table_row("   build event + append only      1.5  2.0x").unwrap();
        assert_eq!(row.numbers, vec![1.5, 2.0]);
    }

    #[test]
    fn redis_groups_and_rabbitmq_rows() {
        let redis = "\
redis bench: redis://127.0.0.1:6379, payload 200 B of JSON (420 B as a CloudEvent), medians
                                         median msgs/s  ours/raw median
raw XADD, one at a time                         13600
RedisTransport::publish                         12000             0.88
raw XREADGROUP COUNT 100 + XACK                170000
RedisTransport consume + ack                   150000             0.88
  (raw + cloudevents::decode each)             160000             0.94
";
        let found = comparisons(redis);
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].label, "RedisTransport::publish");
        assert_eq!(found[0].baseline_label, "raw XADD, one at a time");
        assert_eq!((found[0].ours, found[0].baseline), (12_000.0, 13_600.0));
        assert_eq!(found[2].label, "(raw + cloudevents::decode each)");
        assert_eq!(found[2].baseline, 170_000.0);

        let kafka = "\
kafka bench: broker 127.0.0.1:9092, 5 reps, produce 100000 (10000 in flight)
produce  raw  median     900000 msg/s   [880k 900k 910k]
produce  ours median     850000 msg/s   [840k 850k 860k]
produce  ratio ours/raw 0.94
";
        let found = comparisons(kafka);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].label, "produce");
        assert_eq!(
            (found[0].ours, found[0].baseline, found[0].ratio),
            (850_000.0, 900_000.0, 0.94)
        );

        // The store rows: a heading line, then indented lines without it.
        let kafka_store = "\
kafka store bench: broker 127.0.0.1:9092, 3 reps; single appends: 5000 by 64 tasks
store append, single events, 64 in flight
    raw  median       8527 msg/s   [9k 9k 8k]
    ours median       8381 msg/s   [8k 8k 9k]
    ratio ours/raw 0.98
store append, batches of 100
    raw  median      12024 msg/s   [12k 12k 12k]
    ours median      11317 msg/s   [11k 12k 11k]
    ratio ours/raw 0.94
";
        let found = comparisons(kafka_store);
        let labels: Vec<&str> = found.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "store append, single events, 64 in flight",
                "store append, batches of 100"
            ]
        );
        assert_eq!((found[1].ours, found[1].baseline), (11_317.0, 12_024.0));

        let rabbit = "\
work                                            raw msg/s   ours msg/s ours/raw
publish persistent, 500 in flight                   18300        17000     0.93
";
        let found = comparisons(rabbit);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].ratio, 0.93);
        assert_eq!((found[0].ours, found[0].baseline), (17_000.0, 18_300.0));
    }

    #[test]
    fn postgres_groups_and_settings() {
        // A run of the bench, 2026-12-07 23:22 UTC (the `postgres bench:` line shortened).
        let output = "\
postgres bench: postgres://***@127.0.0.1:5432/test, PostgreSQL 15.20, synchronous_commit = on, payload 200 B of JSON (417 B as a CloudEvent), 5 rounds, medians
                                           median events/s  ours/raw median
raw INSERT, 1 writer                                 3117
PostgresEventStore::append, 1 writer                 2071             0.66
raw INSERT, 16 writers                              11248
PostgresEventStore::append, 16 writers              10711             1.05
raw INSERT unnest 100, 1 writer                     80452
PostgresEventStore::append, 100 events              60857             0.77
raw SELECT pages of 1000, no decoding              518693
PostgresEventStore::read_all, pages of 1000         237161             0.44
raw SELECT pages of 1000, no decoding              518693
PostgresEventStore::subscribe, catch-up            255883             0.50
raw INSERT queue row, 1 publisher                    3969
PostgresTransport::publish                           2816             0.71
raw claim 100 + DELETE each                          8760
PostgresTransport consume + ack each                 5637             0.65
raw claim 100 + DELETE the 100                      70476
PostgresTransport consume, 100 acks in flight          37509             0.54
(ours/raw is the median of the per-round ratios to the first line of each group; target >= 0.8)
";
        let report = postgres_report(output);
        assert_eq!(
            report.settings.as_deref(),
            Some(
                "postgres://***@127.0.0.1:5432/test, PostgreSQL 15.20, synchronous_commit = on, \
                 payload 200 B of JSON (417 B as a CloudEvent), 5 rounds, medians"
            )
        );
        let labels: Vec<&str> = report.rows.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "PostgresEventStore::append, 1 writer",
                "PostgresEventStore::append, 16 writers",
                "PostgresEventStore::append, 100 events",
                "PostgresEventStore::read_all, pages of 1000",
                "PostgresEventStore::subscribe, catch-up",
                "PostgresTransport::publish",
                "PostgresTransport consume + ack each",
                "PostgresTransport consume, 100 acks in flight",
            ]
        );
        let batched = &report.rows[2];
        assert_eq!(batched.baseline_label, "raw INSERT unnest 100, 1 writer");
        assert_eq!(
            (batched.ours, batched.baseline, batched.ratio),
            (60_857.0, 80_452.0, 0.77)
        );
        // Both reads are compared with the same raw SELECTs.
        assert_eq!(report.rows[4].baseline, 518_693.0);
        // A label longer than the bench's padding still splits from its figures.
        let acks = &report.rows[7];
        assert_eq!(acks.baseline_label, "raw claim 100 + DELETE the 100");
        assert_eq!((acks.ours, acks.ratio), (37_509.0, 0.54));
        // Without PostgreSQL: no settings, no rows.
        let skipped = postgres_report(
            "postgres bench skipped: PostgreSQL at postgres://***@127.0.0.1:5432/test does not answer\n",
        );
        assert_eq!(skipped, PostgresReport::default());
    }

    #[test]
    fn cqrs_and_saga_reports() {
        let cqrs = "\
== command round trip: median commands/s over 7 rounds ==
-- sessions of 10 commands (streams grow to 10 events)
   build event + append only         900000 events/s      4.50x cqrs-es (the store's own floor)
   orchestrator/repository           400000 commands/s     2.00x cqrs-es
   cqrs-es/mem-store                 200000 commands/s     1.00x cqrs-es
";
        let found = cqrs_report(cqrs);
        assert_eq!(found.len(), 3);
        assert_eq!(found[1].session, 10);
        assert_eq!(found[1].label, "orchestrator/repository");
        assert_eq!((found[1].rate, found[1].ratio), (400_000.0, 2.0));

        let saga = "\
saga/in-memory/raw_append/1  time: [1 us 2 us 3 us]

per-step cost vs raw append (medians of 9 rounds)
store                             step (ns)    append (ns)    ratio
in-memory                              1500            900     1.67
file (fsync every append)            900000         800000     1.12
";
        let found = saga_report(saga);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].0, "file (fsync every append)");
        assert_eq!(found[1].3, 1.12);
    }

    #[test]
    fn e2e_rows_and_skips() {
        let e2e = "\
e2e bench: EventOrchestrator::publish → 1 subscriber's handler, payload 200 B of JSON, 5 rounds
e2e skipped: Kafka/Kafka: Kafka at 127.0.0.1:9092 is unreachable (connection refused)
e2e: memory/memory at concurrency 1, 20000 events
e2e failed: Redis/Redis at concurrency 64: end to end, round 2: redis failed: timeout

facade end to end (publish → handler) vs plain append, medians of 5 rounds
combination          concurrency   events   e2e ev/s    p50 µs    p99 µs  append ev/s  e2e/append publish ev/s     max µs
memory/memory                  1    20000     150000       6.1      30.2       900000        0.17       800000       95.5
RabbitMQ/RabbitMQ             64     3000       2500    8000.0   21000.5         2600        0.96         2550
(e2e/append is the median of the per-round ratios; target >= 0.7)
";
        let (rows, absences) = e2e_report(e2e);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].combination, "memory/memory");
        assert_eq!((rows[0].concurrency, rows[0].events), (1, 20_000));
        assert_eq!(
            (rows[0].rate, rows[0].p50_us, rows[0].p99_us),
            (150_000.0, 6.1, 30.2)
        );
        assert_eq!(
            (rows[0].append_rate, rows[0].ratio, rows[0].publish_rate),
            (900_000.0, 0.17, 800_000.0)
        );
        // The slowest event's latency, when the bench printed it.
        assert_eq!((rows[0].max_us, rows[1].max_us), (Some(95.5), None));
        assert_eq!(rows[1].combination, "RabbitMQ/RabbitMQ");
        assert_eq!(rows[1].concurrency, 64);
        assert_eq!(
            absences,
            [
                E2eAbsence {
                    what: "Kafka/Kafka".to_owned(),
                    why: "Kafka at 127.0.0.1:9092 is unreachable (connection refused)".to_owned(),
                    failed: false,
                },
                E2eAbsence {
                    what: "Redis/Redis at concurrency 64".to_owned(),
                    why: "end to end, round 2: redis failed: timeout".to_owned(),
                    failed: true,
                }
            ]
        );
        // Nothing before the table's heading is a row.
        assert!(
            e2e_report("memory/memory  1  2  3  4  5  6  7\n")
                .0
                .is_empty()
        );
    }

    #[test]
    fn criterion_results() {
        let benchmark = json::parse(
            r#"{"group_id":"append","function_id":"store_batch_of_100","value_str":null,
                "throughput":{"Elements":100},"full_id":"append/store_batch_of_100",
                "directory_name":"append/store_batch_of_100","title":"append/store_batch_of_100"}"#,
        )
        .unwrap();
        let estimates = json::parse(
            r#"{"mean":{"point_estimate":2.0e5},"median":{"confidence_interval":
                {"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0},
                "point_estimate":2.0e5,"standard_error":1.0}}"#,
        )
        .unwrap();
        let estimate = parse_result(&benchmark, &estimates).unwrap();
        assert_eq!(estimate.id, "append/store_batch_of_100");
        assert_eq!(estimate.rate(), Some(500_000.0));
    }
}
