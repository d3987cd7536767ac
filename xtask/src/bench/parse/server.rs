//! The server bench's output: the events-query rows, the fan-out rows, the failures.

use super::table_row;

/// A row of the server bench's events-query table: one page of events through GraphQL over
/// HTTP, next to reading the same page from the store directly.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServerQueryLine {
    /// The store served (`memory`, `file`).
    pub(crate) store: String,
    /// Query latency, median and 99th percentile, µs.
    pub(crate) query_us: (f64, f64),
    /// The direct read (read, decode, serialize the same answer), median and p99, µs.
    pub(crate) direct_us: (f64, f64),
    /// Direct median ÷ query median (higher is better).
    pub(crate) ratio: f64,
}

/// A row of the server bench's WebSocket fan-out table: one rate tried.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServerFanOutLine {
    /// The store served.
    pub(crate) store: String,
    /// The publishing rate asked for, events/s.
    pub(crate) target_rate: f64,
    /// The rate the publisher reached.
    pub(crate) published_rate: f64,
    /// Messages delivered per second, all subscribers together.
    pub(crate) delivered_rate: f64,
    /// Messages expected (events × subscribers) and lost.
    pub(crate) expected: f64,
    /// Messages that did not arrive.
    pub(crate) lost: f64,
    /// Publish → received: median, 99th percentile and slowest, µs.
    pub(crate) latency_us: (f64, f64, f64),
    /// Cores busy in the server runtime's threads, and in the whole process.
    pub(crate) cores: (f64, f64),
    /// Whether the bench judged the rate sustained.
    pub(crate) sustained: bool,
}

/// What the server bench printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ServerReport {
    /// The events-query rows.
    pub(crate) queries: Vec<ServerQueryLine>,
    /// The fan-out rows, every rate tried.
    pub(crate) fan_outs: Vec<ServerFanOutLine>,
    /// `server failed: <what>` lines: events lost without the server saying so, and the like.
    pub(crate) failures: Vec<String>,
}

/// Reads the server bench's output: the rows after the line opening with `events query`
/// (`store  query-p50 query-p99 direct-p50 direct-p99 ratio response-bytes direct-bytes`),
/// those after the line opening with `websocket fan-out` (`store  target published
/// delivered-rate delivered expected lost p50 p99 max server-cores process-cores yes|no`),
/// and its `server failed:` lines.
pub(crate) fn server_report(output: &str) -> ServerReport {
    #[derive(Clone, Copy)]
    enum Section {
        Query,
        FanOut,
    }
    let mut report = ServerReport::default();
    let mut section = None;
    for line in output.lines() {
        if line.starts_with("events query") {
            section = Some(Section::Query);
            continue;
        }
        if line.starts_with("websocket fan-out") {
            section = Some(Section::FanOut);
            continue;
        }
        if let Some(failure) = line.trim().strip_prefix("server failed: ") {
            report.failures.push(failure.to_owned());
            continue;
        }
        match section {
            Some(Section::Query) => {
                if let Some(row) = table_row(line)
                    && let [p50, p99, direct_p50, direct_p99, ratio, _, _] = row.numbers[..]
                {
                    report.queries.push(ServerQueryLine {
                        store: row.label,
                        query_us: (p50, p99),
                        direct_us: (direct_p50, direct_p99),
                        ratio,
                    });
                }
            }
            Some(Section::FanOut) => {
                let (rest, sustained) = match line.trim_end().rsplit_once(' ') {
                    Some((rest, "yes")) => (rest, true),
                    Some((rest, "no")) => (rest, false),
                    _ => continue,
                };
                if let Some(row) = table_row(rest)
                    && let [
                        target_rate,
                        published_rate,
                        delivered_rate,
                        _delivered,
                        expected,
                        lost,
                        p50,
                        p99,
                        max,
                        server_cores,
                        process_cores,
                    ] = row.numbers[..]
                {
                    report.fan_outs.push(ServerFanOutLine {
                        store: row.label,
                        target_rate,
                        published_rate,
                        delivered_rate,
                        expected,
                        lost,
                        latency_us: (p50, p99, max),
                        cores: (server_cores, process_cores),
                        sustained,
                    });
                }
            }
            None => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_rows_and_failures() {
        let output = "\
server bench: orchestrator-server on 127.0.0.1 (axum + async-graphql), payload 200 B of JSON
memory  1  2  3  4  5  6  7

events query, one page of 1000 events over HTTP/1.1 (keep-alive) vs reading the store directly
store     query p50 µs  query p99 µs  direct p50 µs  direct p99 µs  direct/query  response B  direct B
memory          5012.3        7000.1         1500.0         2000.0          0.30      350000    349000
file            6000.0        9000.0         2500.5         3000.0          0.42      350000    349000
(direct: store.read_all of the same 1001 events)

websocket fan-out, 100 subscribers (graphql-transport-ws, live events), publish → received, 3 s per rate
store    target ev/s  published ev/s  delivered msg/s  delivered  expected  lost  p50 µs  p99 µs  max µs  server cores  process cores  sustained
memory         10000            9990           150000     900000   3000000  2100000  400000  900000  950000          1.10           1.95         no
memory          2000            2000           199000     600000    600000        0    1500    9000   20000          0.90           1.80        yes
(sustained: nothing lost)
server: memory at 10000/s: 100 of 100 subscribers cut off with SLOW_CONSUMER
server: memory: highest sustained rate 2000 events/s to 100 subscribers
server failed: file fan-out at 10000/s: subscriber 3: expected event 7, got 9 (no error said so)
";
        let report = server_report(output);
        assert_eq!(report.queries.len(), 2, "{report:?}");
        assert_eq!(report.queries[0].store, "memory");
        assert_eq!(report.queries[0].query_us, (5012.3, 7000.1));
        assert_eq!(report.queries[1].direct_us, (2500.5, 3000.0));
        assert_eq!(report.queries[1].ratio, 0.42);
        assert_eq!(report.fan_outs.len(), 2);
        let cut_off = &report.fan_outs[0];
        assert_eq!(
            (cut_off.target_rate, cut_off.published_rate, cut_off.lost),
            (10_000.0, 9_990.0, 2_100_000.0)
        );
        assert!(!cut_off.sustained);
        let kept_up = &report.fan_outs[1];
        assert_eq!(kept_up.latency_us, (1500.0, 9000.0, 20000.0));
        assert_eq!(kept_up.cores, (0.90, 1.80));
        assert_eq!(
            (kept_up.expected, kept_up.delivered_rate),
            (600_000.0, 199_000.0)
        );
        assert!(kept_up.sustained);
        assert_eq!(
            report.failures,
            ["file fan-out at 10000/s: subscriber 3: expected event 7, got 9 (no error said so)"]
        );
        assert_eq!(server_report("nothing here"), ServerReport::default());
    }
}
