//! The query server's section of the report: the GraphQL events query next to reading the
//! store directly, and WebSocket fan-out to many subscribers.

use std::fmt::Write as _;

use super::{Run, absence, cell, cost_text, output, rate_text};
use crate::bench::parse::{self, ServerFanOutLine, ServerReport};

/// The heading of the section.
const TITLE: &str = "Query server (GraphQL events query, WebSocket fan-out)";
/// Issue 22's fan-out target: this many events per second …
const TARGET_RATE: f64 = 10_000.0;
/// … to this many subscribers, none lost.
const TARGET_SUBSCRIBERS: u32 = 100;

/// What the server bench printed (empty if it did not run).
fn report(run: &Run<'_>) -> ServerReport {
    output(run, "server")
        .map(|(stdout, _)| parse::server_report(stdout))
        .unwrap_or_default()
}

/// The stores whose fan-out was measured, in order, each with the highest rate sustained.
fn best_rates(report: &ServerReport) -> Vec<(&str, Option<f64>)> {
    let mut stores: Vec<&str> = Vec::new();
    for line in &report.fan_outs {
        if !stores.contains(&line.store.as_str()) {
            stores.push(&line.store);
        }
    }
    stores
        .into_iter()
        .map(|store| {
            let best = report
                .fan_outs
                .iter()
                .filter(|l| l.store == store && l.sustained)
                .map(|l| l.target_rate)
                .reduce(f64::max);
            (store, best)
        })
        .collect()
}

/// Whether a store's fan-out met the target: the target rate tried and sustained.
fn target_met(report: &ServerReport, store: &str) -> bool {
    report
        .fan_outs
        .iter()
        .any(|l| l.store == store && l.target_rate >= TARGET_RATE && l.sustained)
}

/// Seconds, milliseconds or microseconds, from microseconds (a backlog's latencies run to
/// seconds).
fn us_text(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else {
        cost_text(us * 1e3)
    }
}

/// Server CPU per delivered message, ns: what one more subscriber of one more event costs.
fn server_cpu_per_message(line: &ServerFanOutLine) -> Option<f64> {
    (line.delivered_rate > 0.0).then(|| line.cores.0 * 1e9 / line.delivered_rate)
}

/// One fan-out row of the markdown table.
fn fan_out_row(line: &ServerFanOutLine) -> String {
    format!(
        "| {} | {}/s | {}/s | {} msgs/s | {} of {} | {} | {} | {} | {:.2} | {} | {:.2} | {} |",
        cell(&line.store),
        rate_text(line.target_rate),
        rate_text(line.published_rate),
        rate_text(line.delivered_rate),
        rate_text(line.lost),
        rate_text(line.expected),
        us_text(line.latency_us.0),
        us_text(line.latency_us.1),
        us_text(line.latency_us.2),
        line.cores.0,
        server_cpu_per_message(line).map_or_else(|| "—".to_owned(), cost_text),
        line.cores.1,
        if line.sustained { "yes" } else { "no" },
    )
}

/// The section; counts its verdicts into `met` and `missed`.
pub(super) fn markdown(run: &Run<'_>, md: &mut String, met: &mut usize, missed: &mut Vec<String>) {
    let _ = writeln!(md, "## {TITLE}\n");
    let report = report(run);
    if report.queries.is_empty() && report.fan_outs.is_empty() && report.failures.is_empty() {
        let _ = writeln!(md, "Not measured: {}.\n", absence(run, "server"));
        return;
    }
    let _ = writeln!(
        md,
        "A server on 127.0.0.1 in the bench's process. **Events query:** one page of 1,000 \
         events (200 B JSON payloads) through GraphQL over one keep-alive HTTP/1.1 connection, \
         request sent → whole body received. The baseline, measured alternately with it, is \
         what a program holding the store does for the same answer: `read_all` of the same \
         events with the same filter, each payload decoded, the same fields serialized in \
         the same shape with serde_json. The ratio is direct ÷ query at the median: higher \
         is better, 1.00 would mean the API costs nothing. **Fan-out:** 100 WebSocket \
         subscribers (graphql-transport-ws, live `events` subscription) while one publisher \
         calls `publish` at a paced rate; latency is the `publish` call → the subscriber \
         has the message; rates are tried from 10k/s down until one is sustained (nothing \
         lost, the publisher at 95% of the rate, deliveries at 90% of rate × subscribers). \
         Server cores: CPU of the server runtime's threads (HTTP, WebSocket, GraphQL, the \
         relay) ÷ wall time, and ÷ messages delivered per second, the server's CPU per \
         message; process cores include the subscribers and the publisher, on the same \
         cores."
    );
    if let Some((stdout, _)) = output(run, "server")
        && let Some(line) = parse::line_with(stdout, "server bench:")
    {
        let settings = line.trim_start_matches("server bench:").trim();
        let _ = writeln!(md, "\nSettings: {settings}.");
    }
    let _ = writeln!(md);
    if !report.queries.is_empty() {
        let _ = writeln!(
            md,
            "| store | query p50 | query p99 | direct p50 (same run) | direct p99 | direct ÷ query | target |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
        for line in &report.queries {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.2}× | (reference) |",
                cell(&line.store),
                us_text(line.query_us.0),
                us_text(line.query_us.1),
                us_text(line.direct_us.0),
                us_text(line.direct_us.1),
                line.ratio
            );
        }
        let _ = writeln!(md);
    }
    if !report.fan_outs.is_empty() {
        let _ = writeln!(
            md,
            "| store | rate asked | publisher reached | delivered | lost | p50 | p99 | max | server cores | server CPU per message | process cores | sustained |"
        );
        let _ = writeln!(
            md,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for line in &report.fan_outs {
            let _ = writeln!(md, "{}", fan_out_row(line));
        }
        let _ = writeln!(md);
    }
    for (store, best) in best_rates(&report) {
        let verdict = if target_met(&report, store) {
            *met += 1;
            "met"
        } else {
            missed.push(format!("{TITLE}: {store}, fan-out"));
            "**missed**"
        };
        let best = best.map_or_else(
            || "none of the rates tried".to_owned(),
            |rate| format!("{}/s", rate_text(rate)),
        );
        let _ = writeln!(
            md,
            "Fan-out target, {store} store: {}/s to {TARGET_SUBSCRIBERS} subscribers, none \
             lost: {verdict} (highest rate sustained: {best}).\n",
            rate_text(TARGET_RATE)
        );
    }
    for failure in &report.failures {
        missed.push(format!("{TITLE}: {failure}"));
        let _ = writeln!(md, "Failed: {failure}.\n");
    }
}

/// The section's lines of the terminal summary.
pub(super) fn terminal(run: &Run<'_>, out: &mut String) {
    let report = report(run);
    if report.queries.is_empty() && report.fan_outs.is_empty() && report.failures.is_empty() {
        let _ = writeln!(out, "  {TITLE}: {}", absence(run, "server"));
        return;
    }
    let _ = writeln!(out, "  {TITLE}:");
    for line in &report.queries {
        let _ = writeln!(
            out,
            "    events query, {}: p50 {}, p99 {}; direct p50 {} ({:.2}x)",
            line.store,
            us_text(line.query_us.0),
            us_text(line.query_us.1),
            us_text(line.direct_us.0),
            line.ratio
        );
    }
    for (store, best) in best_rates(&report) {
        let _ = writeln!(
            out,
            "    fan-out, {store}: highest sustained {} to {TARGET_SUBSCRIBERS} subscribers; target {}/s {}",
            best.map_or_else(|| "none".to_owned(), |r| format!("{}/s", rate_text(r))),
            rate_text(TARGET_RATE),
            if target_met(&report, store) {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    for failure in &report.failures {
        let _ = writeln!(out, "    FAILED: {failure}");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{Outcome, Run, markdown, terminal_summary};

    #[test]
    fn the_server_section() {
        let stdout = "\
server bench: orchestrator-server on 127.0.0.1, payload 200 B of JSON, stores: memory

events query, one page of 1000 events over HTTP/1.1 (keep-alive) vs reading the store directly
store     query p50 µs  query p99 µs  direct p50 µs  direct p99 µs  direct/query  response B  direct B
memory          5012.3        7000.1         1500.0         2000.0          0.30      350000    349000

websocket fan-out, 100 subscribers (graphql-transport-ws, live events), publish → received, 3 s per rate
store    target ev/s  published ev/s  delivered msg/s  delivered  expected  lost  p50 µs  p99 µs  max µs  server cores  process cores  sustained
memory         10000            9990           150000     900000   3000000  2100000  400000  900000  950000          1.10           1.95         no
memory          2000            2000           199000     600000    600000        0    1500    9000   20000          0.90           1.80        yes
";
        let outcomes = [(
            "server",
            Outcome::Ran {
                stdout: stdout.to_owned(),
                stderr: String::new(),
                took: Duration::from_secs(60),
            },
        )];
        let run = Run::for_test(&outcomes);
        let md = markdown(&run);
        assert!(
            md.contains("| memory | 5.01 ms | 7.00 ms | 1.50 ms | 2.00 ms | 0.30× | (reference) |"),
            "{md}"
        );
        assert!(
            md.contains("| memory | 2.0k/s | 2.0k/s | 199k msgs/s | 0 of 600k | 1.50 ms | 9.00 ms | 20.00 ms | 0.90 | 4523 ns | 1.80 | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| memory | 10.0k/s | 10.0k/s | 150k msgs/s | 2.10M of 3.00M | 400.00 ms | 900.00 ms | 950.00 ms |"),
            "{md}"
        );
        assert!(
            md.contains(
                "Fan-out target, memory store: 10.0k/s to 100 subscribers, none lost: **missed** \
                 (highest rate sustained: 2.0k/s)."
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "- missed: Query server (GraphQL events query, WebSocket fan-out): memory, fan-out"
            ),
            "{md}"
        );
        let terminal = terminal_summary(&run);
        assert!(
            terminal.contains("fan-out, memory: highest sustained 2.0k/s"),
            "{terminal}"
        );
    }
}
