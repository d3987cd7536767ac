//! Metric names, recorded through the `metrics` facade.
//!
//! Labels: `command` or `query` (the registered name; unknown names are labelled
//! `unknown`), `outcome` (`ok`, `replayed`, or the error: `validation`, `unauthorized`,
//! `conflict`, `rejected`, `handler_error`, `no_handler`, …), `aggregate` (the aggregate
//! type), `read_model`. Tracing: each command is a span `cqrs.command` (fields `command`,
//! `command_id`), each aggregate command a child span `cqrs.aggregate` (fields `aggregate`,
//! `stream`), each query a span `cqrs.query` (field `query`); no payload data goes into
//! spans or logs.

/// Histogram: each command's duration through the bus, in seconds (labels `command`,
/// `outcome`).
pub const COMMAND_DURATION: &str = "orchestrator_cqrs_command_duration_seconds";
/// Counter: commands and queries that failed validation (labels `kind`, `name`).
pub const VALIDATION_FAILURES: &str = "orchestrator_cqrs_validation_failures_total";
/// Counter: commands the authorization hook refused (label `command`).
pub const UNAUTHORIZED: &str = "orchestrator_cqrs_unauthorized_total";
/// Counter: commands answered with the stored outcome of an earlier one with the same id
/// (label `command`).
pub const IDEMPOTENT_REPLAYS: &str = "orchestrator_cqrs_idempotent_replays_total";
/// Counter: appends of aggregate events that met a newer stream version (label
/// `aggregate`).
pub const CONFLICTS: &str = "orchestrator_cqrs_conflicts_total";
/// Counter: reloads and retries after a conflict (label `aggregate`).
pub const RETRIES: &str = "orchestrator_cqrs_retries_total";
/// Counter: aggregate snapshots saved (label `aggregate`).
pub const SNAPSHOTS: &str = "orchestrator_cqrs_snapshots_total";
/// Histogram: each query's duration, in seconds (labels `query`, `cache` — `hit`, `miss`
/// or `off` — and `outcome`).
pub const QUERY_DURATION: &str = "orchestrator_cqrs_query_duration_seconds";
/// Counter: queries answered from the cache (label `query`).
pub const CACHE_HITS: &str = "orchestrator_cqrs_cache_hits_total";
/// Counter: cache lookups that found nothing fresh (labels `query`, `reason` — `absent`,
/// `expired` or `invalidated`).
pub const CACHE_MISSES: &str = "orchestrator_cqrs_cache_misses_total";
/// Gauge: the global position each read model has seen (label `read_model`).
pub const READ_MODEL_POSITION: &str = "orchestrator_cqrs_read_model_position";

/// Describes the metrics to the installed recorder (units and help texts). Call it once
/// after installing a recorder; recording works without it.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(COMMAND_DURATION, Unit::Seconds, "Duration of each command.");
    describe_counter!(
        VALIDATION_FAILURES,
        "Commands and queries that failed validation."
    );
    describe_counter!(UNAUTHORIZED, "Commands refused by the authorization hook.");
    describe_counter!(
        IDEMPOTENT_REPLAYS,
        "Commands answered with an earlier outcome of the same id."
    );
    describe_counter!(
        CONFLICTS,
        "Aggregate appends that met a newer stream version."
    );
    describe_counter!(RETRIES, "Aggregate commands retried after a conflict.");
    describe_counter!(SNAPSHOTS, "Aggregate snapshots saved.");
    describe_histogram!(QUERY_DURATION, Unit::Seconds, "Duration of each query.");
    describe_counter!(CACHE_HITS, "Queries answered from the cache.");
    describe_counter!(
        CACHE_MISSES,
        "Query cache lookups that found nothing fresh."
    );
    describe_gauge!(
        READ_MODEL_POSITION,
        "Global position each read model has seen."
    );
}
