//! Turning bench results into `BENCHMARKS.md`: one table per area, each row our figure,
//! the baseline measured in the same run, the ratio and the target.

mod postgres;
mod server;

use std::fmt::Write as _;
use std::time::Duration;

use super::Outcome;
use super::parse::{self, Estimate};

/// Everything one `cargo xtask bench` run produced.
pub(crate) struct Run<'a> {
    /// The machine line.
    pub(crate) machine: String,
    /// Whether it was a `--quick` smoke run.
    pub(crate) quick: bool,
    /// Wall time of the whole run.
    pub(crate) took: Duration,
    /// Each bench's outcome, by bench name.
    pub(crate) outcomes: &'a [(&'static str, Outcome)],
    /// Every criterion result.
    pub(crate) estimates: &'a [Estimate],
}

#[cfg(test)]
impl<'a> Run<'a> {
    /// A full run of a minute on 2 cores with these outcomes and no criterion results, for
    /// the report's tests.
    pub(crate) fn for_test(outcomes: &'a [(&'static str, Outcome)]) -> Self {
        Self {
            machine: "2 cores".to_owned(),
            quick: false,
            took: Duration::from_secs(60),
            outcomes,
            estimates: &[],
        }
    }
}

/// A measured figure.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Figure {
    /// Work per second, with its unit (`events/s`).
    Rate(f64, &'static str),
    /// Nanoseconds per unit of work (`per step`).
    Cost(f64, &'static str),
}

/// What a row must reach.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// ours/baseline at least this.
    RatioAtLeast(f64),
    /// ours/baseline at most this (costs).
    RatioAtMost(f64),
    /// Our rate at least this, whatever the baseline.
    RateAtLeast(f64),
    /// ours/baseline at least the first, and our rate at least the second.
    RatioAndRateAtLeast(f64, f64),
    /// A reference figure, no target.
    Reference,
}

/// One line of a table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    /// What was measured.
    what: String,
    /// Our figure.
    ours: Figure,
    /// The baseline's name and figure.
    baseline: Option<(String, Figure)>,
    /// ours / baseline.
    ratio: Option<f64>,
    /// The target.
    target: Target,
}

impl Row {
    /// Whether the target is met; `None` for reference rows.
    fn met(&self) -> Option<bool> {
        match (self.target, self.ratio, self.ours) {
            (Target::RatioAtLeast(t), Some(r), _) => Some(r >= t),
            (Target::RatioAtMost(t), Some(r), _) => Some(r <= t),
            (Target::RateAtLeast(t), _, Figure::Rate(rate, _)) => Some(rate >= t),
            (Target::RatioAndRateAtLeast(t, floor), Some(r), Figure::Rate(rate, _)) => {
                Some(r >= t && rate >= floor)
            }
            _ => None,
        }
    }

    /// The verdict's words: `met`, `**missed**` (with the part met, for a target of two
    /// parts of which one is), or nothing for reference rows.
    fn verdict(&self) -> String {
        match (self.met(), self.target, self.ratio, self.ours) {
            (None, ..) => String::new(),
            (Some(true), ..) => "met".to_owned(),
            (
                Some(false),
                Target::RatioAndRateAtLeast(t, floor),
                Some(r),
                Figure::Rate(rate, _),
            ) if r >= t || rate >= floor => {
                let part = if r >= t {
                    Target::RatioAtLeast(t)
                } else {
                    Target::RateAtLeast(floor)
                };
                format!("**missed** ({} met)", part.text())
            }
            (Some(false), ..) => "**missed**".to_owned(),
        }
    }
}

/// An area of the report: a heading, the bench that measures it, its rows.
struct Area {
    /// The heading.
    title: String,
    /// The bench whose outcome explains missing rows.
    bench: &'static str,
    /// The rows found.
    rows: Vec<Row>,
    /// A paragraph before the table (settings, what the baseline does), if any.
    note: Option<String>,
}

/// `1.23M/s`, `456k/s`, `13.6k/s`, `512/s`.
fn rate_text(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2}M", rate / 1e6)
    } else if rate >= 1e5 {
        format!("{:.0}k", rate / 1e3)
    } else if rate >= 1e3 {
        format!("{:.1}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

/// `850 ns`, `12.3 µs`, `4.10 ms`.
fn cost_text(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e4 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

impl Figure {
    /// The figure with its unit.
    fn text(self) -> String {
        match self {
            Figure::Rate(rate, unit) => format!("{} {unit}", rate_text(rate)),
            Figure::Cost(ns, unit) => format!("{} {unit}", cost_text(ns)),
        }
    }
}

impl Target {
    /// The target as DESIGN.md states it.
    fn text(self) -> String {
        match self {
            Target::RatioAtLeast(t) => format!("≥ {t}×"),
            Target::RatioAtMost(t) => format!("≤ {t}×"),
            Target::RateAtLeast(t) => format!("≥ {}/s", rate_text(t)),
            Target::RatioAndRateAtLeast(t, floor) => format!("≥ {t}×, ≥ {}/s", rate_text(floor)),
            Target::Reference => "(reference)".to_owned(),
        }
    }
}

/// A row comparing two criterion results by rate.
fn criterion_row(
    estimates: &[Estimate],
    what: &str,
    ours: &str,
    baseline: (&str, &str),
    unit: &'static str,
    target: Target,
) -> Option<Row> {
    let find = |id: &str| {
        estimates
            .iter()
            .find(|e| e.id == id)
            .and_then(Estimate::rate)
    };
    let ours = find(ours)?;
    let base = find(baseline.1);
    Some(Row {
        what: what.to_owned(),
        ours: Figure::Rate(ours, unit),
        baseline: base.map(|b| (baseline.0.to_owned(), Figure::Rate(b, unit))),
        ratio: base.map(|b| ours / b),
        target,
    })
}

/// The output of bench `name`, if it ran.
fn output<'a>(run: &'a Run<'_>, name: &str) -> Option<(&'a str, &'a str)> {
    run.outcomes.iter().find_map(|(n, outcome)| match outcome {
        Outcome::Ran { stdout, stderr, .. } if *n == name => {
            Some((stdout.as_str(), stderr.as_str()))
        }
        _ => None,
    })
}

/// Every area, with the rows this run measured.
fn areas(run: &Run<'_>) -> Vec<Area> {
    let e = run.estimates;
    let mut areas = Vec::new();

    let mpsc = "tokio mpsc bounded(1024), task → task";
    let bus = [
        (
            "bus, 1 subscriber (publish → no-op handler)",
            "publish_to_handle/bus/1_subscribers",
            "publish_to_handle/raw_mpsc/1_subscribers",
        ),
        (
            "bus, 4 subscribers (events published)",
            "publish_to_handle/bus/4_subscribers",
            "publish_to_handle/raw_mpsc/4_subscribers",
        ),
    ];
    let mut bus_rows: Vec<Row> = bus
        .iter()
        .filter_map(|(what, ours, raw)| {
            criterion_row(
                e,
                what,
                ours,
                (mpsc, raw),
                "events/s",
                Target::RatioAtLeast(0.5),
            )
        })
        .collect();
    // For reference: the in-process transport driven one event at a time through the
    // `Transport` / `DeliveryStream` trait methods (a boxed future per publish and per
    // `next`), which is not how the bus drives it (batches, no boxed publish); it splits
    // the bus's cost, the target is judged on the bus rows above.
    bus_rows.extend(criterion_row(
        e,
        "in-process transport alone, one event per trait call (reference)",
        "publish_to_handle/transport_only/1_subscribers",
        (mpsc, "publish_to_handle/raw_mpsc/1_subscribers"),
        "events/s",
        Target::Reference,
    ));
    // For reference: the publisher builds each envelope as it publishes, as applications
    // do; the target is judged on the rows above (prepared envelopes).
    bus_rows.extend(criterion_row(
        e,
        "bus, 1 subscriber, publisher builds each event (reference)",
        "publish_to_handle/bus_building/1_subscribers",
        (
            "tokio mpsc bounded(1024), publisher builds each event",
            "publish_to_handle/raw_mpsc_building/1_subscribers",
        ),
        "events/s",
        Target::Reference,
    ));
    areas.push(Area {
        title: "In-process bus".to_owned(),
        bench: "bus",
        rows: bus_rows,
        note: None,
    });

    let raw = "raw write of the same frames + sync_data";
    let append = [
        (
            "append a batch of 100, fsync per append",
            "append/store_batch_of_100",
        ),
        (
            "100 single-event appends in flight (group commit)",
            "append/store_100_appends_in_flight",
        ),
    ];
    areas.push(Area {
        title: "Embedded store append (200 B payloads, one sync per 100 events)".to_owned(),
        bench: "store",
        rows: append
            .iter()
            .filter_map(|(what, ours)| {
                let base = (raw, "append/raw_write_each_then_sync_data");
                criterion_row(e, what, ours, base, "events/s", Target::RatioAtLeast(0.5))
            })
            .collect(),
        note: None,
    });

    let replay = [
        (
            "replay 100,000 events (read_all, checksums, decode)",
            "replay/store_replay_read_all_decode",
            Target::RateAtLeast(2e6),
        ),
        (
            "codec decode only (the bound of any replay)",
            "replay/codec_decode_only",
            Target::Reference,
        ),
    ];
    areas.push(Area {
        title: "Replay".to_owned(),
        bench: "store",
        rows: replay
            .iter()
            .filter_map(|(what, ours, target)| {
                let base = (
                    "raw sequential read + decode",
                    "replay/raw_sequential_read_decode",
                );
                criterion_row(e, what, ours, base, "events/s", *target)
            })
            .collect(),
        note: None,
    });

    for (bench, title) in [
        ("redis", "Redis"),
        ("rabbitmq", "RabbitMQ"),
        (
            "kafka",
            "Kafka (a tansu of the bench's own, sqlite storage)",
        ),
    ] {
        areas.push(backend_area(run, bench, title));
    }
    areas.extend(postgres::areas(run));

    areas.push(Area {
        title: "Saga step overhead (engine's marginal cost per step vs one raw append)".to_owned(),
        bench: "saga",
        rows: output(run, "saga")
            .map(|(stdout, _)| parse::saga_report(stdout))
            .unwrap_or_default()
            .into_iter()
            .map(|(store, step, append, ratio)| Row {
                what: format!("saga step, {store} store"),
                ours: Figure::Cost(step, "per step"),
                baseline: Some((
                    "append of the same record, exact version".to_owned(),
                    Figure::Cost(append, "per append"),
                )),
                ratio: Some(ratio),
                target: Target::RatioAtMost(2.0),
            })
            .collect(),
        note: None,
    });

    areas.push(cqrs_area(run));

    let codec = [
        ("CloudEvents JSON decode", "codec/cloudevents/decode", true),
        ("CloudEvents JSON encode", "codec/cloudevents/encode", false),
        ("bincode envelope decode", "codec/bincode/decode", true),
        ("bincode envelope encode", "codec/bincode/encode", false),
    ];
    areas.push(Area {
        title: "Codecs (for reference; decoders next to serde_json decoding the payload alone)"
            .to_owned(),
        bench: "codec",
        rows: codec
            .iter()
            .filter_map(|(what, ours, decode)| {
                let base = (
                    "serde_json::Value from the payload alone",
                    "codec/serde_json_payload/decode_value",
                );
                let mut row = criterion_row(e, what, ours, base, "ops/s", Target::Reference)?;
                if !decode {
                    row.baseline = None;
                    row.ratio = None;
                }
                Some(row)
            })
            .collect(),
        note: None,
    });
    areas
}

/// The rows a backend bench printed.
fn backend_area(run: &Run<'_>, bench: &'static str, title: &str) -> Area {
    let rows = output(run, bench)
        .map(|(stdout, _)| parse::comparisons(stdout))
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            // DESIGN.md's targets are for publishing and consuming; a store's append (the
            // Redis bench measures it against the same XADD) and lines in parentheses are
            // shown for reference.
            let reference = c.label.starts_with('(') || c.label.contains("EventStore");
            let single_appends = c.label.starts_with("store append, single");
            let client = match bench {
                "redis" => "raw redis-rs",
                "rabbitmq" => "raw lapin",
                _ => "raw rdkafka",
            };
            Row {
                what: c.label,
                ours: Figure::Rate(c.ours, "msgs/s"),
                baseline: Some((
                    c.baseline_label.replace("raw client", client),
                    Figure::Rate(c.baseline, "msgs/s"),
                )),
                ratio: Some(c.ratio),
                // Issue 23's targets for the broker stores' appends: single events with 64
                // in flight at least half the raw producer's rate, batches 0.8×.
                target: if reference {
                    Target::Reference
                } else if single_appends {
                    Target::RatioAtLeast(0.5)
                } else {
                    Target::RatioAtLeast(0.8)
                },
            }
        })
        .collect();
    Area {
        title: format!("{title} publish and consume"),
        bench,
        rows,
        note: None,
    }
}

/// The CQRS bench's report as rows.
fn cqrs_area(run: &Run<'_>) -> Area {
    let lines = output(run, "cqrs")
        .map(|(_, stderr)| parse::cqrs_report(stderr))
        .unwrap_or_default();
    let mut rows = Vec::new();
    for line in &lines {
        if line.label.starts_with("cqrs-es") {
            continue;
        }
        let base = lines
            .iter()
            .find(|l| l.session == line.session && l.label.starts_with("cqrs-es"));
        let floor = line.label.starts_with("build event");
        rows.push(Row {
            what: format!("{}, sessions of {} commands", line.label, line.session),
            ours: Figure::Rate(line.rate, if floor { "events/s" } else { "commands/s" }),
            baseline: base.map(|b| {
                (
                    format!("cqrs-es 0.5, {}", b.label),
                    Figure::Rate(b.rate, "commands/s"),
                )
            }),
            ratio: Some(line.ratio),
            target: if floor {
                Target::Reference
            } else {
                Target::RatioAtLeast(1.5)
            },
        });
    }
    Area {
        title: "CQRS command round trip (load with snapshot, handle, append; in-memory store)"
            .to_owned(),
        bench: "cqrs",
        rows,
        note: None,
    }
}

/// End to end ÷ plain append at least this (DESIGN.md: the relay must not be the
/// bottleneck).
const E2E_RATIO: f64 = 0.7;

/// The end-to-end bench's rows and what it did not measure.
fn e2e(run: &Run<'_>) -> (Vec<parse::E2eLine>, Vec<parse::E2eAbsence>) {
    output(run, "e2e")
        .map(|(stdout, _)| parse::e2e_report(stdout))
        .unwrap_or_default()
}

/// The p50 ceiling of a row, in microseconds, where there is one: everything in process
/// (memory/memory) at concurrency 1.
fn e2e_p50_target(line: &parse::E2eLine) -> Option<f64> {
    (line.combination == "memory/memory" && line.concurrency == 1).then_some(50.0)
}

/// The slowest event's latency at most this many times the median, in process with many
/// publishers (issue 23: back-pressure fair between publishers).
const E2E_FAIRNESS: f64 = 10.0;

/// Whether the row has the fairness target: everything in process, many publishers.
fn e2e_fairness_target(line: &parse::E2eLine) -> bool {
    matches!(
        line.combination.as_str(),
        "memory/memory" | "file/in-process"
    ) && line.concurrency > 1
}

/// Whether a row meets its targets (a fairness target without the slowest latency printed
/// is not met).
fn e2e_met(line: &parse::E2eLine) -> bool {
    line.ratio >= E2E_RATIO
        && e2e_p50_target(line).is_none_or(|ceiling| line.p50_us <= ceiling)
        && (!e2e_fairness_target(line)
            || line
                .max_us
                .is_some_and(|max| max <= E2E_FAIRNESS * line.p50_us))
}

/// A row's targets as DESIGN.md and issue 23 state them.
fn e2e_target_text(line: &parse::E2eLine) -> String {
    let mut text = format!("≥ {E2E_RATIO}×");
    if let Some(ceiling) = e2e_p50_target(line) {
        text.push_str(&format!(", p50 ≤ {}", cost_text(ceiling * 1e3)));
    }
    if e2e_fairness_target(line) {
        text.push_str(&format!(", max ≤ {E2E_FAIRNESS}× p50"));
    }
    text
}

/// The section of the end-to-end bench; counts its verdicts into `met` and `missed`.
fn e2e_markdown(run: &Run<'_>, md: &mut String, met: &mut usize, missed: &mut Vec<String>) {
    let title = "Facade end to end (publish → handler)";
    let _ = writeln!(md, "## {title}\n");
    let (rows, absences) = e2e(run);
    if rows.is_empty() && absences.is_empty() {
        let _ = writeln!(md, "Not measured: {}.\n", absence(run, "e2e"));
        return;
    }
    let _ = writeln!(
        md,
        "`EventOrchestrator::publish` to one subscriber's handler: `publish` returns once the \
         event is stored, the outbox relay carries it to the transport. Latency is from the \
         call to `publish` to the handler's entry; events/s is events ÷ (first publish → last \
         event handled). The baseline is the same store's plain `append` of the same events, \
         one per call at the same concurrency, in the same round; the ratio is the median of \
         the rounds' ratios. The publishers' rate is events ÷ (first publish → last `publish` \
         returned): next to events/s, it tells a relay that lags from publishers that were \
         slowed down. The latency target is for memory/memory at concurrency 1, everything \
         in process; the fairness target (the slowest event within 10× the median) for the \
         in-process rows at concurrency 64."
    );
    if let Some((stdout, _)) = output(run, "e2e")
        && let Some(line) = parse::line_with(stdout, "e2e bench:")
    {
        let settings = line.trim_start_matches("e2e bench:").trim();
        let _ = writeln!(md, "\nSettings: {settings}.");
    }
    let _ = writeln!(md);
    if !rows.is_empty() {
        let _ = writeln!(
            md,
            "| store/transport | concurrency | events/s | p50 | p99 | max | publishers' rate | plain append (same run) | ratio | target | |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    }
    for line in &rows {
        let verdict = if e2e_met(line) {
            *met += 1;
            "met"
        } else {
            missed.push(format!(
                "{title}: {}, concurrency {}",
                line.combination, line.concurrency
            ));
            "**missed**"
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2}× | {} | {verdict} |",
            cell(&line.combination),
            line.concurrency,
            Figure::Rate(line.rate, "events/s").text(),
            cost_text(line.p50_us * 1e3),
            cost_text(line.p99_us * 1e3),
            line.max_us
                .map_or_else(|| "—".to_owned(), |max| cost_text(max * 1e3)),
            Figure::Rate(line.publish_rate, "events/s").text(),
            Figure::Rate(line.append_rate, "events/s").text(),
            line.ratio,
            e2e_target_text(line),
        );
    }
    if !rows.is_empty() {
        let _ = writeln!(md);
    }
    for absent in &absences {
        let verdict = if absent.failed {
            missed.push(format!("{title}: {} (failed)", absent.what));
            "failed"
        } else {
            "skipped"
        };
        let _ = writeln!(
            md,
            "Not measured: {}: {verdict}: {}.\n",
            absent.what, absent.why
        );
    }
}

/// Why bench `name` has no figures, if it has none.
fn absence(run: &Run<'_>, name: &str) -> String {
    match run.outcomes.iter().find(|(n, _)| *n == name) {
        Some((_, Outcome::Skipped(why))) => format!("skipped: {why}"),
        Some((_, Outcome::Failed(why))) => {
            format!("failed: {}", why.lines().next().unwrap_or_default())
        }
        Some((_, Outcome::Ran { .. })) => {
            "ran, but printed no figures this report knows how to read".to_owned()
        }
        None => "not run (left out of this run)".to_owned(),
    }
}

/// A markdown table cell: `|` would end it.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The whole `BENCHMARKS.md`.
pub(crate) fn markdown(run: &Run<'_>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench`{} — every figure next to its baseline measured in the \
         same run on the same machine (the raw client or primitive doing the same work), and \
         the project's target for it. Rates are medians. Machines here are shared and noisy: \
         read the ratios, not the absolute figures.\n",
        if run.quick {
            " **--quick (a smoke run: short measurements, not figures to quote)**"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "**Machine:** {}.\n", run.machine);
    let _ = writeln!(
        md,
        "**Run:** {:.1} minutes, build included. Criterion benches ran with {}; the backend \
         benches are their own binaries (rounds, medians and ratios as they print them). \
         Each bench's output is kept under `<target>/xtask-bench/`.\n",
        run.took.as_secs_f64() / 60.0,
        if run.quick {
            "`--warm-up-time 0.5 --measurement-time 1 --sample-size 10`"
        } else {
            "`--warm-up-time 1 --measurement-time 3` (groups that set their own times keep them)"
        }
    );
    let _ = writeln!(
        md,
        "Ratios are ours ÷ baseline, so higher is better — except saga steps, where both \
         figures are costs and the target is a ceiling. Replay's target is absolute.\n"
    );
    let mut met = 0;
    let mut missed = Vec::new();
    for area in areas(run) {
        let _ = writeln!(md, "## {}\n", area.title);
        if area.rows.is_empty() {
            let _ = writeln!(md, "Not measured: {}.\n", absence(run, area.bench));
            continue;
        }
        if let Some(note) = &area.note {
            let _ = writeln!(md, "{note}\n");
        }
        let _ = writeln!(
            md,
            "| measurement | orchestrator | baseline (same run) | ratio | target | |"
        );
        let _ = writeln!(md, "|---|---:|---|---:|---:|---|");
        for row in &area.rows {
            let baseline = row.baseline.as_ref().map_or_else(
                || "—".to_owned(),
                |(name, f)| format!("{} ({name})", f.text()),
            );
            let ratio = row
                .ratio
                .map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×"));
            match row.met() {
                Some(true) => met += 1,
                Some(false) => missed.push(format!("{}: {}", area.title, row.what)),
                None => {}
            }
            let verdict = row.verdict();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {ratio} | {} | {verdict} |",
                cell(&row.what),
                row.ours.text(),
                cell(&baseline),
                row.target.text()
            );
        }
        let _ = writeln!(md);
        if area.bench == "saga"
            && let Some((stdout, _)) = output(run, "saga")
            && let Some(line) = parse::line_with(stdout, "10,000 concurrent sagas")
        {
            let _ = writeln!(md, "Memory: {line}\n");
        }
    }
    e2e_markdown(run, &mut md, &mut met, &mut missed);
    server::markdown(run, &mut md, &mut met, &mut missed);
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(md, "{met} targets met, {} missed.", missed.len());
    for what in &missed {
        let _ = writeln!(md, "- missed: {what}");
    }
    let _ = writeln!(md, "\n| bench | outcome |\n|---|---|");
    for (name, outcome) in run.outcomes {
        let text = match outcome {
            Outcome::Ran { took, .. } => format!("ran in {:.0} s", took.as_secs_f64()),
            Outcome::Skipped(why) => format!("skipped: {why}"),
            Outcome::Failed(why) => format!("failed: {}", why.lines().next().unwrap_or_default()),
        };
        let _ = writeln!(md, "| `{name}` | {} |", cell(&text));
    }
    md
}

/// A short plain-text version of the tables, for the terminal.
pub(crate) fn terminal_summary(run: &Run<'_>) -> String {
    let mut out = String::from("bench summary (ours vs same-run baseline):\n");
    for area in areas(run) {
        if area.rows.is_empty() {
            let _ = writeln!(out, "  {}: {}", area.title, absence(run, area.bench));
            continue;
        }
        let _ = writeln!(out, "  {}:", area.title);
        for row in &area.rows {
            let ratio = row.ratio.map_or_else(String::new, |r| format!("{r:.2}x"));
            let verdict = match row.met() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            };
            let _ = writeln!(
                out,
                "    {:<60} {:>18} {:>7} {:>9} {verdict}",
                row.what,
                row.ours.text(),
                ratio,
                row.target.text()
            );
        }
    }
    let (rows, absences) = e2e(run);
    if rows.is_empty() && absences.is_empty() {
        let _ = writeln!(out, "  Facade end to end: {}", absence(run, "e2e"));
    } else {
        let _ = writeln!(out, "  Facade end to end (publish → handler):");
    }
    for line in &rows {
        let _ = writeln!(
            out,
            "    {:<60} {:>18} {:>7} {:>9} {} (p50 {}, p99 {}, max {})",
            format!("{}, concurrency {}", line.combination, line.concurrency),
            Figure::Rate(line.rate, "events/s").text(),
            format!("{:.2}x", line.ratio),
            e2e_target_text(line),
            if e2e_met(line) { "met" } else { "MISSED" },
            cost_text(line.p50_us * 1e3),
            cost_text(line.p99_us * 1e3),
            line.max_us
                .map_or_else(|| "—".to_owned(), |max| cost_text(max * 1e3)),
        );
    }
    for absent in &absences {
        let verdict = if absent.failed { "FAILED" } else { "skipped" };
        let _ = writeln!(out, "    {}: {verdict}: {}", absent.what, absent.why);
    }
    server::terminal(run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(id: &str, median_ns: f64, elements: f64) -> Estimate {
        Estimate {
            id: id.to_owned(),
            median_ns,
            elements: Some(elements),
        }
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(rate_text(1_234_567.0), "1.23M");
        assert_eq!(rate_text(456_789.0), "457k");
        assert_eq!(rate_text(13_600.0), "13.6k");
        assert_eq!(rate_text(512.0), "512");
        assert_eq!(cost_text(850.0), "850 ns");
        assert_eq!(cost_text(12_345.0), "12.3 µs");
        assert_eq!(cost_text(4_100_000.0), "4.10 ms");
    }

    #[test]
    fn a_report_with_a_met_a_missed_and_a_skipped_area() {
        let estimates = [
            estimate("publish_to_handle/bus/1_subscribers", 20e6, 20_000.0),
            estimate("publish_to_handle/raw_mpsc/1_subscribers", 10e6, 20_000.0),
            estimate("replay/store_replay_read_all_decode", 100e6, 100_000.0),
            estimate("replay/raw_sequential_read_decode", 50e6, 100_000.0),
        ];
        let outcomes = [
            (
                "bus",
                Outcome::Ran {
                    stdout: String::new(),
                    stderr: String::new(),
                    took: Duration::from_secs(30),
                },
            ),
            (
                "redis",
                Outcome::Skipped("Redis at 127.0.0.1:6379 is down (refused)".to_owned()),
            ),
        ];
        let run = Run {
            machine: "2 cores".to_owned(),
            quick: false,
            took: Duration::from_secs(60),
            outcomes: &outcomes,
            estimates: &estimates,
        };
        let md = markdown(&run);
        assert!(
            md.contains(
                "| bus, 1 subscriber (publish → no-op handler) | 1.00M events/s | 2.00M events/s"
            ),
            "{md}"
        );
        assert!(md.contains("| 0.50× | ≥ 0.5× | met |"), "{md}");
        assert!(
            md.contains("| 1.00M events/s |") && md.contains("| ≥ 2.00M/s | **missed** |"),
            "{md}"
        );
        assert!(
            md.contains("Not measured: skipped: Redis at 127.0.0.1:6379 is down (refused)."),
            "{md}"
        );
        assert!(md.contains("1 targets met, 1 missed."), "{md}");
        assert!(
            md.contains("## Facade end to end (publish → handler)\n\nNot measured: not run"),
            "{md}"
        );
    }

    #[test]
    fn the_end_to_end_section() {
        let stdout = "\
e2e bench: payload 200 B of JSON, 5 rounds, medians
e2e skipped: Kafka/Kafka: Kafka at 127.0.0.1:9092 is unreachable (refused)
e2e failed: Redis/Redis at concurrency 64: end to end, round 2: timeout
facade end to end (publish → handler) vs plain append, medians of 5 rounds
combination          concurrency   events   e2e ev/s    p50 µs    p99 µs  append ev/s  e2e/append publish ev/s     max µs
memory/memory                  1    20000     150000      60.0     130.0       300000        0.50       290000      400.0
memory/memory                 64    50000     400000     100.0    1000.0       500000        0.80       450000      900.0
file/in-process               64    10000     100000     500.0    3000.0       120000        0.83       100000     9000.0
Redis/Redis                    1     2000       5000     210.0     900.0         6000        0.83         5500    20000.0
";
        let outcomes = [(
            "e2e",
            Outcome::Ran {
                stdout: stdout.to_owned(),
                stderr: String::new(),
                took: Duration::from_secs(100),
            },
        )];
        let run = Run {
            machine: "2 cores".to_owned(),
            quick: false,
            took: Duration::from_secs(100),
            outcomes: &outcomes,
            estimates: &[],
        };
        let md = markdown(&run);
        assert!(
            md.contains(
                "at concurrency 64.\n\nSettings: payload 200 B of JSON, 5 rounds, medians.\n\n|"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| memory/memory | 1 | 150k events/s | 60.0 µs | 130.0 µs | 400.0 µs | 290k events/s | \
                 300k events/s | 0.50× | ≥ 0.7×, p50 ≤ 50.0 µs | **missed** |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| memory/memory | 64 | 400k events/s | 100.0 µs | 1.00 ms | 900.0 µs | 450k events/s | 500k events/s | 0.80× | ≥ 0.7×, max ≤ 10× p50 | met |"),
            "{md}"
        );
        // In process with many publishers, the slowest event must be within 10× the median:
        // 9 ms against 500 µs is not.
        assert!(
            md.contains("| file/in-process | 64 | 100k events/s | 500.0 µs | 3.00 ms | 9.00 ms | 100k events/s | 120k events/s | 0.83× | ≥ 0.7×, max ≤ 10× p50 | **missed** |"),
            "{md}"
        );
        assert!(md.contains("| Redis/Redis | 1 | 5.0k events/s |"), "{md}");
        assert!(
            md.contains(
                "Not measured: Kafka/Kafka: skipped: Kafka at 127.0.0.1:9092 is unreachable (refused)."
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "Not measured: Redis/Redis at concurrency 64: failed: end to end, round 2: timeout."
            ),
            "{md}"
        );
        assert!(md.contains("2 targets met, 3 missed."), "{md}");
        assert!(
            md.contains("- missed: Facade end to end (publish → handler): Redis/Redis at concurrency 64 (failed)"),
            "{md}"
        );
        assert!(
            md.contains(
                "- missed: Facade end to end (publish → handler): memory/memory, concurrency 1"
            ),
            "{md}"
        );
        let terminal = terminal_summary(&run);
        assert!(
            terminal.contains("memory/memory, concurrency 64"),
            "{terminal}"
        );
        assert!(terminal.contains("Kafka/Kafka: skipped"), "{terminal}");
    }
}
