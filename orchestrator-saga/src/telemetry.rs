//! Metric names, recorded through the `metrics` facade.
//!
//! Every metric carries the label `saga` (the definition's name). The step histogram also
//! carries `step`, `phase` (`action` or `compensation`) and `outcome` (`ok`, `error`,
//! `timeout`). Tracing: each saga run is a span `saga` (fields `saga`, `saga_id`) and each
//! step attempt a child span `saga.step` (fields `step`, `attempt`, `phase`); no context
//! data is put in spans or logs.

/// Counter: sagas started (recovered sagas are not counted again).
pub const SAGAS_STARTED: &str = "orchestrator_saga_started_total";
/// Counter: sagas that completed.
pub const SAGAS_COMPLETED: &str = "orchestrator_saga_completed_total";
/// Counter: sagas that failed and were compensated.
pub const SAGAS_COMPENSATED: &str = "orchestrator_saga_compensated_total";
/// Counter: sagas that failed and could not be compensated (ended `CompensationFailed`).
pub const SAGAS_FAILED: &str = "orchestrator_saga_failed_total";
/// Histogram: the duration of each step and compensation attempt, in seconds.
pub const STEP_DURATION: &str = "orchestrator_saga_step_duration_seconds";

/// Describes the metrics to the installed recorder (units and help texts). Call it once
/// after installing a recorder; recording works without it.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(SAGAS_STARTED, "Sagas started.");
    describe_counter!(SAGAS_COMPLETED, "Sagas whose every step completed.");
    describe_counter!(SAGAS_COMPENSATED, "Sagas that failed and were compensated.");
    describe_counter!(
        SAGAS_FAILED,
        "Sagas that failed and could not be compensated."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Duration of each saga step and compensation attempt."
    );
}
