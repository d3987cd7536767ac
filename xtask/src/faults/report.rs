//! `FAULTS.md`: one table per kind of fault, every figure each scenario printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::Outcome;

/// Everything one `cargo xtask faults` run produced.
pub(crate) struct Run<'a> {
    /// The machine line.
    pub(crate) machine: String,
    /// Whether it was the short (CI) suite.
    pub(crate) short: bool,
    /// Wall time, build included.
    pub(crate) took: Duration,
    /// Each scenario's outcome, by name.
    pub(crate) outcomes: &'a [(String, Outcome)],
}

/// `passed`, `skipped: …` or `FAILED: …`.
pub(crate) fn verdict(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Passed(_) => "passed".to_owned(),
        Outcome::Skipped(why) => format!("skipped: {why}"),
        Outcome::Failed(why) => format!("FAILED: {why}"),
    }
}

/// A table: its heading, what it shows, its columns as (title, field).
struct Table {
    prefix: &'static str,
    title: &'static str,
    about: &'static str,
    columns: &'static [(&'static str, &'static str)],
}

const TABLES: &[Table] = &[
    Table {
        prefix: "restart-",
        title: "Broker restart during a publish/consume run",
        about: "Publishers send every event (half one at a time, half in batches, sending \
                again what fails); one consumer acks everything. At 30% published the broker \
                restarts: Redis — a spare redis-server (AOF, fsync always) gets `SHUTDOWN` and \
                starts again; RabbitMQ — `rabbitmqctl stop_app`, 2 s, `start_app` (a guard \
                always starts it again); Kafka — a spare tansu (sqlite) gets SIGKILL, 1 s, \
                and starts again on the same data. *Duplicates* are deliveries beyond the \
                first of each event; each must be accounted for: on Redis and RabbitMQ as a \
                delivery flagged as a redelivery (attempt > 1) or, on RabbitMQ, a copy of a \
                batch published again after its confirms were lost; on Kafka (whose consumer \
                groups do not flag redeliveries) by reading the topic back: it must hold every \
                event exactly once, so every extra delivery was a re-read of an uncommitted \
                offset.",
        columns: &[
            ("backend", "target"),
            ("events", "events"),
            ("lost", "lost"),
            ("deliveries", "deliveries"),
            ("duplicates", "duplicates"),
            ("flagged redeliveries", "flagged_redeliveries"),
            ("events published again", "republished_events"),
            ("entries in Redis stream", "entries_in_stream"),
            ("records in Kafka topic", "records_in_topic"),
            ("acks lost", "ack_errors"),
            ("publish retries", "publish_retries"),
            ("broker away (ms)", "downtime_ms"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "saga-crash",
        title: "SIGKILL of a process running sagas, then recover()",
        about: "100 sagas of four compensable steps on the embedded file store (a third fail \
                at step 3, a third at step 4, the rest complete). A process running them is \
                killed with SIGKILL at a random moment (0–200 ms after it opens the store; 10 sagas run at once, steps take 30–150 ms), \
                again and again; each new process calls `recover()`, starts the sagas still \
                missing and carries on; a last one runs to the end. Every action and \
                compensation appends a line keyed by its idempotency key to a side-effect file. \
                Checked: every saga Completed or Compensated; exactly one action key per \
                completed step and one compensation key per completed step of each compensated \
                saga, none for anything else. Lines repeated with the same key (a kill between \
                the side effect and its log record) are counted as re-runs the key absorbs.",
        columns: &[
            ("sagas", "sagas"),
            ("completed", "completed"),
            ("compensated", "compensated"),
            ("other", "other_status"),
            ("kills", "kills"),
            ("kills mid-run", "kills_mid_run"),
            ("resumed by recover()", "resumed_by_recover"),
            ("action lines / keys", "action_effects|action_keys"),
            (
                "compensation lines / keys",
                "compensation_effects|compensation_keys",
            ),
            ("re-runs absorbed by the key", "reruns_absorbed_by_key"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "publisher-crash-",
        title: "SIGKILL of a publishing process: store-first delivery",
        about: "A process publishes through `EventOrchestrator` with 64 tasks, as fast as it \
                can, and is killed with SIGKILL 50–600 ms after it starts, once per round; \
                each new process carries on, and a last one lets the outbox relay drain. Every \
                publish that returned writes the event id to an *acked* file, every handled \
                delivery to a *handled* file. With the in-process transport the subscriber is \
                in the killed process (what the kill takes out of its queues must come back \
                from the relay's checkpoint); with Redis it is a named consumer group in the \
                parent. Checked: every acknowledged publish is in the store, and every stored \
                event was delivered at least once (*missing* counts both failures). \
                *Redeliveries* are deliveries beyond the first: events the relay published \
                again after the checkpoint it resumed from.",
        columns: &[
            ("store + transport", "target"),
            ("kills", "rounds"),
            ("acknowledged", "acked"),
            ("stored", "stored"),
            ("delivered", "delivered"),
            ("redeliveries", "redeliveries"),
            ("missing", "missing"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "publisher-outage-",
        title: "Broker outage under a publishing application",
        about: "8 tasks publish through `EventOrchestrator` on the file store with a broker \
                transport: a spare redis-server (AOF, fsync always), or a spare RabbitMQ node \
                of the scenario's own (own node name, ports, database and Erlang cookie; the \
                shared RabbitMQ is never stopped). At 30% published the broker stops cleanly \
                (Redis `SHUTDOWN`, RabbitMQ SIGTERM), stays away 3 s and starts again on the \
                same data; *broker away* includes its stop and its boot (RabbitMQ takes \
                several seconds). Checked: no publish fails (it only appends), events are \
                published while the broker is away, and once it is back the outbox relay \
                delivers every event to a named subscription.",
        columns: &[
            ("transport", "target"),
            ("events", "events"),
            ("published while away", "published_during_outage"),
            ("publish errors", "publish_errors"),
            ("delivered", "delivered"),
            ("redeliveries", "redeliveries"),
            ("lost", "lost"),
            ("broker away (ms)", "downtime_ms"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "relay-failover-",
        title: "SIGKILL of the relaying process: relay failover",
        about: "Several processes publish through `EventOrchestrator` on one Redis store and \
                Redis transport (a spare redis-server), 2 tasks each, one event per 10 ms. \
                Only the holder of the store's relay lease (the key `lease:relay.default`, \
                `SET NX PX`, 5 s, renewed every 5/3 s; its value names the holder's process \
                id) relays. The parent reads the key, SIGKILLs the holder after it relayed \
                1.5 s, and measures *takeover* (until another live process holds the key) \
                and *flow back* (until the subscriber, a named group in the parent, receives \
                an event published after the kill); then it kills the new holder, until one \
                process is left, which drains and ends. Checked: every takeover within the \
                limit (lease time + a standby's retry interval + 2 s); publishes kept being \
                acknowledged while nobody relayed; every acknowledged publish stored; every \
                stored event delivered at least once. *Duplicates* are deliveries beyond the \
                first: events a new holder published again from the dead one's last \
                checkpoint (the relay checkpoints every 1,000 events, or 1 s after the last \
                one it published: under this steady stream, every 1,000 events).",
        columns: &[
            ("processes", "children"),
            ("kills", "kills"),
            ("takeover (s)", "takeover_s"),
            ("limit (s)", "takeover_limit_s"),
            ("flow back (s)", "flow_back_s"),
            ("published while unrelayed", "published_while_unrelayed"),
            ("acknowledged", "acked"),
            ("stored", "stored"),
            ("delivered", "delivered"),
            ("duplicates", "duplicates"),
            ("missing", "missing"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "saga-takeover-",
        title: "SIGKILL of one of two processes running sagas: takeover",
        about: "Two processes run saga-crash's saga (four compensable steps, a third fail at \
                step 3, a third at step 4) on one Redis store (a spare redis-server), each \
                starting its sagas one per 40 ms, each with `watch_orphans` every 500 ms. A \
                running saga is held under its lease (`lease:saga.<id>`, 5 s, renewed by its \
                runner). The first process is SIGKILLed after a random number of its starts \
                (in the middle third); the other must resume its unfinished sagas once their \
                leases expire. Side-effect lines carry the invocation's idempotency key, the \
                process id and the time span. Checked: every saga Completed or Compensated; \
                one action key per completed step, one compensation key per completed step of \
                each compensated saga; no saga run by both processes while both lived (no \
                overlapping invocations of one saga in two processes, no invocation by the \
                survivor of the dead one's sagas before the kill, no resume before it); the \
                first takeover within the limit (lease time + watch interval + 2 s). \
                *Taken over* counts sagas resumed unfinished; the takeover times run from the \
                kill to the first and the last of them. The *queued* run lets each process run \
                one saga at a time and kills the first some seconds in, so that sagas wait for \
                a slot longer than their lease lasts while both processes live.",
        columns: &[
            ("sagas", "sagas"),
            ("started by the killed one", "started_by_killed"),
            ("at once", "concurrent"),
            ("killed after", "killed_after"),
            ("completed", "completed"),
            ("compensated", "compensated"),
            ("other", "other_status"),
            ("taken over", "taken_over"),
            (
                "takeover first / last (s)",
                "takeover_first_s|takeover_last_s",
            ),
            ("limit (s)", "takeover_limit_s"),
            ("run by both", "run_by_both"),
            ("action lines / keys", "action_effects|action_keys"),
            (
                "compensation lines / keys",
                "compensation_effects|compensation_keys",
            ),
            ("re-runs absorbed by the key", "reruns_absorbed_by_key"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "writers-",
        title: "Concurrent writers on one stream",
        about: "8 tasks append one event at a time to the same stream, at once. Stores with \
                exact expected versions (in-memory, file, Redis) are used the way lost updates \
                happen: each writer appends at the version it last saw and, on a conflict, \
                takes the store's version and tries again. RabbitMQ and Kafka have no exact \
                expected version: their writers append with `Any`. Afterwards the stream must \
                hold every event exactly once, at versions 1…N with no gap, each writer's \
                events in its order. Redis and RabbitMQ are the shared brokers; Kafka is a \
                tansu of the scenario's own (sqlite storage).",
        columns: &[
            ("store", "target"),
            ("appends", "appends"),
            ("stored", "stored"),
            ("lost", "lost"),
            ("stored twice", "repeated"),
            ("version gaps", "version_gaps"),
            ("out of order", "out_of_order"),
            ("conflicts retried", "conflicts_retried"),
            ("exact version", "exact_expected_version"),
            ("appends/s", "appends_per_s"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "slow-handler",
        title: "A slow handler on the in-process bus: bounded memory",
        about: "One publisher publishes as fast as it can (200-byte JSON payloads, a fresh \
                envelope each); the handler sleeps 1 ms every 100 events, so it is about ten \
                times slower. The bounded queue must hold the publisher back: every event \
                handled, the backlog never over the queue's capacity, and the peak resident \
                set of the whole process (VmHWM from /proc/self/status) under the stated \
                bound.",
        columns: &[
            ("events", "events"),
            ("handled", "handled"),
            ("lost", "lost"),
            ("largest backlog", "max_backlog"),
            ("queue capacity", "queue_capacity"),
            ("peak RSS (KiB)", "peak_rss_kib"),
            ("RSS before (KiB)", "rss_before_kib"),
            ("bound (KiB)", "rss_limit_kib"),
            ("events/s", "events_per_s"),
            ("run (s)", "seconds"),
        ],
    },
    Table {
        prefix: "soak-memory",
        title: "Soak: the default facade's memory stays bounded",
        about: "`EventOrchestrator` on the in-memory store, capped (evicting the events its \
                outbox relay has published), one publisher as fast as it can and one \
                subscriber. Every event handled, the store keeping no more than its cap, and \
                the peak resident set (VmHWM) after every event no more than the stated \
                factor of the peak after the first tenth.",
        columns: &[
            ("events", "events"),
            ("handled", "handled"),
            ("cap", "cap"),
            ("kept", "kept"),
            ("peak RSS after 1/10 (KiB)", "rss_tenth_kib"),
            ("peak RSS (KiB)", "peak_rss_kib"),
            ("growth", "growth"),
            ("limit", "growth_limit"),
            ("events/s", "events_per_s"),
            ("run (s)", "seconds"),
        ],
    },
];

/// A cell: one field, or `a / b` for `a|b`; `—` when missing.
fn cell(fields: &BTreeMap<String, String>, spec: &str) -> String {
    spec.split('|')
        .map(|key| {
            fields
                .get(key)
                .map_or_else(|| "—".to_owned(), |v| v.replace('_', " "))
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The whole `FAULTS.md`.
pub(crate) fn markdown(run: &Run<'_>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Fault suite\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask faults{}`: what happens to events, sagas and appends when \
         brokers restart, processes die and writers collide. {}\n",
        if run.short { " --short" } else { "" },
        if run.short {
            "**The short (CI) suite: 10,000 events per restart, 8 × 1,000 appends, 100,000 \
             events through the slow handler, 200,000 through the soak.**"
        } else {
            "The full suite: 100,000 events per restart, 8 × 10,000 appends, 1,000,000 events \
             through the slow handler and through the soak (`--short` is the CI-sized one)."
        }
    );
    let _ = writeln!(md, "**Machine:** {}.\n", run.machine);
    let _ = writeln!(
        md,
        "**Run:** {:.1} minutes, build included.\n",
        run.took.as_secs_f64() / 60.0
    );
    for table in TABLES {
        let rows: Vec<&(String, Outcome)> = run
            .outcomes
            .iter()
            .filter(|(name, _)| name.starts_with(table.prefix))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(md, "## {}\n\n{}\n", table.title, table.about);
        let titles: Vec<&str> = table.columns.iter().map(|(t, _)| *t).collect();
        let _ = writeln!(md, "| scenario | {} | |", titles.join(" | "));
        let _ = writeln!(md, "|---|{}---|", "---:|".repeat(titles.len()));
        for (name, outcome) in rows {
            match outcome {
                Outcome::Passed(fields) => {
                    let cells: Vec<String> = table
                        .columns
                        .iter()
                        .map(|(_, spec)| cell(fields, spec))
                        .collect();
                    let _ = writeln!(md, "| `{name}` | {} | passed |", cells.join(" | "));
                }
                other => {
                    let blanks = vec!["—"; titles.len()].join(" | ");
                    let _ = writeln!(
                        md,
                        "| `{name}` | {blanks} | {} |",
                        verdict(other).replace('|', "\\|")
                    );
                }
            }
        }
        let _ = writeln!(md);
    }
    let passed = run
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Passed(_)))
        .count();
    let _ = writeln!(
        md,
        "## Summary\n\n{passed} of {} scenarios passed.",
        run.outcomes.len()
    );
    for (name, outcome) in run.outcomes {
        if !matches!(outcome, Outcome::Passed(_)) {
            let _ = writeln!(md, "- `{name}`: {}", verdict(outcome));
        }
    }
    md
}

/// One line per scenario with its key figures, for the terminal.
pub(crate) fn terminal_summary(outcomes: &[(String, Outcome)]) -> String {
    let mut out = String::from("fault suite summary:\n");
    for (name, outcome) in outcomes {
        let figures = match outcome {
            Outcome::Passed(fields) => fields
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "scenario" | "target"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            other => verdict(other),
        };
        let _ = writeln!(out, "  {name:<18} {figures}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_figures_and_failures() {
        let fields: BTreeMap<String, String> = [
            ("target", "redis"),
            ("events", "10000"),
            ("lost", "0"),
            ("duplicates", "3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let outcomes = vec![
            ("restart-redis".to_owned(), Outcome::Passed(fields)),
            (
                "restart-kafka".to_owned(),
                Outcome::Skipped("no tansu".to_owned()),
            ),
            (
                "slow-handler".to_owned(),
                Outcome::Failed("a | b".to_owned()),
            ),
        ];
        let md = markdown(&Run {
            machine: "2 cores".to_owned(),
            short: true,
            took: Duration::from_secs(90),
            outcomes: &outcomes,
        });
        assert!(
            md.contains("| `restart-redis` | redis | 10000 | 0 | — | 3 |"),
            "{md}"
        );
        assert!(md.contains("| skipped: no tansu |"), "{md}");
        assert!(md.contains("FAILED: a \\| b"), "{md}");
        assert!(md.contains("1 of 3 scenarios passed."), "{md}");
        assert!(!md.contains("Concurrent writers"), "{md}");
    }
}
